"""The sweeps on Hydra's search path: `sekd-train --config-name demo` finds sweeps/demo.yaml from any folder,
in a checkout and in an installed package alike (which ships them as sekd/sweeps). `--config-dir sweeps`
still works in a checkout. An installed plugin's `conf/` folder (sekd.plugins.config_folders) follows, so
its presets and config groups are chosen like sekd's own (`experiment=my_row`)."""

from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.search_path_plugin import SearchPathPlugin

from sekd.config.folders import SWEEPS
from sekd.plugins import config_folders


class SekdSweeps(SearchPathPlugin):
    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        search_path.append(provider="sekd-sweeps", path=f"file://{SWEEPS}")
        for folder in config_folders():
            search_path.append(provider="sekd-plugin", path=f"file://{folder}")
