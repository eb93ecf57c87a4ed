"""A researcher's own pieces, from their own code: the modules a config names in `plugins: [my_lab.signals]`
and every installed package's `sekd.plugins` entry points are imported before a config is checked, in every
process that checks one (the command line, the sweeper's check of each cell, each job, each rank), so a
name they register is valid wherever a built-in's is. Child processes (a launcher's jobs, torchrun's ranks,
Slurm's tasks) also import what the parent imported, through SEKD_PLUGINS. A run's identity holds each
plugin piece it uses: its module, the module's version and a hash of its package's source.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import os
import sys
from pathlib import Path
from typing import Any, Iterable

from sekd.core.errors import ConfigError

ENTRY_POINTS = "sekd.plugins"  # [project.entry-points."sekd.plugins"] my_lab = "my_lab.pieces"
ENV = "SEKD_PLUGINS"  # the plugin modules a parent process imported, comma-separated, for its children


class PluginError(ConfigError):
    """A plugin that cannot be imported, or that registers a name another module holds."""


def load(modules: Iterable[str] = ()) -> list[str]:
    """Import the installed entry points, the parent's plugins and `modules` (each once); returns every
    plugin module now imported. Raises PluginError, one line naming the module."""
    for module in entry_point_modules():
        import_plugin(module, key=f"the {ENTRY_POINTS} entry points")
    for module in _inherited():
        import_plugin(module, key=ENV)
    for module in modules:
        import_plugin(module)
    return plugin_modules()


def pass_on() -> None:
    """What a wrapper script imported before `sekd.train.main()` (modules that registered pieces) reaches
    the processes it starts: a launcher's jobs and torchrun's ranks start from this environment. A piece
    the script itself defines (`__main__`) cannot be imported by them."""
    found = [m for m in plugin_modules() if m != "__main__" and getattr(sys.modules.get(m), "__file__", None)]
    if found:
        os.environ[ENV] = ",".join(sorted({*_inherited(), *found}))


def _inherited() -> list[str]:
    return [m for m in os.environ.get(ENV, "").split(",") if m]


@functools.cache
def entry_point_modules() -> tuple[str, ...]:
    """The modules installed packages declare in the `sekd.plugins` entry-point group."""
    from importlib.metadata import entry_points

    return tuple(sorted({ep.module for ep in entry_points(group=ENTRY_POINTS)}))


def config_folders() -> list[Path]:
    """The `conf/` folder of each installed plugin's top-level package, found without importing it: its
    config groups (conf/position/my_policy.yaml, conf/experiment/my_row.yaml) join Hydra's search path."""
    from importlib.util import find_spec

    found = []
    for module in entry_point_modules():
        try:
            spec = find_spec(module.partition(".")[0])
        except (ImportError, ValueError):
            continue  # importing it names the fault, in one line, when a config is checked
        for location in (spec and spec.submodule_search_locations) or []:
            if (Path(location) / "conf").is_dir():
                found.append(Path(location) / "conf")
    return found


def import_plugin(module: str, key: str = "plugins") -> None:
    """Import one plugin module; a failure or a name registered twice is one line naming the module."""
    from sekd.core.registry import RegistryError

    if not isinstance(module, str) or not module.strip():
        raise PluginError(f"{key}: {module!r} must be a module name (my_lab.signals)")
    if module in sys.modules:
        return
    try:
        importlib.import_module(module)
    except RegistryError as err:
        sys.modules.pop(module, None)  # half imported: a later try must import it again, not find it
        raise PluginError(f"{key}: plugin {module!r}: {err}; give the piece a name of its own") from None
    except Exception as err:  # noqa: BLE001 - any import failure of the user's code is one line
        sys.modules.pop(module, None)
        cause = f"{type(err).__name__}: {err}".splitlines()[0]
        raise PluginError(f"{key}: plugin {module!r} failed to import ({cause})") from None


def _registries() -> dict[str, Any]:
    """The registries a plugin may add to, by the config key that names a piece of each."""
    from sekd.data.qa import QA_SOURCES
    from sekd.data.sources import SOURCES
    from sekd.evaluation.suites import SUITES
    from sekd.selection.classes import CLASSES
    from sekd.selection.criteria import CRITERIA
    from sekd.selection.policies import POLICIES
    from sekd.selection.samples import SAMPLE_SELECTORS
    from sekd.selection.signals import SIGNALS

    return {
        "position.signal": SIGNALS,
        "position.policy": POLICIES,
        "criterion.name": CRITERIA,
        "classes.name": CLASSES,
        "samples.name": SAMPLE_SELECTORS,
        "data.name": (SOURCES, QA_SOURCES),
        "eval.suite": SUITES,
    }


def plugin_modules() -> list[str]:
    """Every module outside sekd that registered a piece in this process."""
    from sekd.core.registry import PLUGIN_MODULES

    return sorted(PLUGIN_MODULES)


def _ours(module: str) -> bool:
    return module == "sekd" or module.startswith("sekd.")


# ---- what a run records of the plugin pieces it uses -------------------------------------------


def used(tree: dict[str, Any]) -> list[dict[str, Any]]:
    """The plugin pieces a resolved config names: key, name, module, version and source hash. Built-in
    pieces are left out, so a run of sekd's own pieces keeps its identity whatever plugins are loaded;
    a changed plugin source gives a run of its pieces a new identity (a new run, not a skipped one)."""
    out: list[dict[str, Any]] = []
    if not plugin_modules():
        return out  # nothing but sekd's own pieces (and no registry imported to find that out)
    for key, registries in _registries().items():
        group, _, leaf = key.partition(".")
        name = (tree.get(group) or {}).get(leaf)
        for registry in registries if isinstance(registries, tuple) else (registries,):
            if isinstance(name, str) and name in registry and not _ours(registry.origin(name)):
                module = registry.origin(name)
                out.append({"key": key, "name": name, "module": module, **source_identity(module)})
    return out


def source_identity(module: str) -> dict[str, Any]:
    """The version of the distribution that holds `module` (else its package's __version__, else None)
    and a hash of its package's Python source (every .py file below the top-level package, or the one
    file of a top-level module or script)."""
    top = sys.modules.get(module.partition(".")[0]) or sys.modules.get(module)
    return {"version": _version(module, top), "source": _source_hash(top)}


def _version(module: str, top: Any) -> str | None:
    from importlib.metadata import PackageNotFoundError, packages_distributions, version

    for dist in packages_distributions().get(module.partition(".")[0], []):
        try:
            return version(dist)
        except PackageNotFoundError:
            continue
    found = getattr(top, "__version__", None)
    return str(found) if found is not None else None


def _source_hash(top: Any) -> str | None:
    paths = getattr(top, "__path__", None)
    if paths:  # a package: every module in it, so a helper the piece calls counts too
        files = sorted(f for p in paths for f in Path(p).rglob("*.py") if "__pycache__" not in f.parts)
        root = Path(list(paths)[0])
    elif getattr(top, "__file__", None):
        files, root = [Path(top.__file__)], Path(top.__file__).parent
    else:
        return None
    digest = hashlib.sha256()
    for f in files:
        digest.update(str(f.relative_to(root) if f.is_relative_to(root) else f.name).encode() + b"\0")
        digest.update(f.read_bytes() + b"\0")
    return digest.hexdigest()[:16]
