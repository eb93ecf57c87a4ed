"""`sekd-train` (also `python -m sekd.train`): one run = compose -> train -> score -> record (sekd/app).

    sekd-train experiment=se_kd seed=1338
    sekd-train -m experiment=full_kd,random_pos,se_kd seed=1337,1338,1339
"""
from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from sekd.app import execute
from sekd.app.compose import CONF, fail
from sekd.errors import ConfigError


@hydra.main(version_base="1.3", config_path=CONF, config_name="config")
def app(cfg: DictConfig) -> None:
    """The Hydra app: one job, or one cell of a multirun."""
    from hydra.core.hydra_config import HydraConfig

    # as typed: reading the items would resolve an ${oc.env:...} in them, and the records must not hold it
    execute(cfg, OmegaConf.to_container(HydraConfig.get().overrides.task, resolve=False))


def main() -> None:
    """`sekd-train`: a bad command line (an unknown key, a value out of range) stops with one line and
    exit status 2 before Hydra starts a job or makes its folder; then Hydra runs the app."""
    from sekd.config import check_command_line

    try:
        check_command_line(sys.argv[1:], CONF, "config")
    except ConfigError as err:
        fail(err)
    app()


if __name__ == "__main__":
    main()
