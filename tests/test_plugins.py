"""sekd/plugins.py: importing a researcher's modules, the one line for a bad one, where a piece came from,
and what a run's identity holds of the plugin pieces it uses. End to end: tests/test_plugin_runs.py."""

from __future__ import annotations

import os
import sys

import pytest

from sekd import plugins
from sekd.core.errors import ConfigError
from sekd.selection.criteria import CRITERIA
from sekd.stores.runs import config_hash
from tests.helpers import compose_cfg

PIECE = """
import sekd
from sekd.selection.criteria import forward_kl


@sekd.criterion("{name}")
def scaled(s, t, y, *, temperature=1.0, row=None, u=None):
    return {scale} * forward_kl(s, t, y, temperature=temperature)
"""


@pytest.fixture
def lab(tmp_path, monkeypatch):
    """A package on sys.path whose module registers a criterion, forgotten again after the test (its name
    leaves the registry, its modules sys.modules)."""
    package = tmp_path / f"lab_{tmp_path.name}"
    package.mkdir()
    (package / "__init__.py").write_text("__version__ = '0.3'\n")
    (package / "pieces.py").write_text(PIECE.format(name=f"kl_{tmp_path.name}", scale=2.0))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv(plugins.ENV, "")  # restored at teardown: load() passes its modules on through it
    yield package
    for name in [m for m in sys.modules if m.startswith(package.name)]:
        del sys.modules[name]
    CRITERIA._entries.pop(f"kl_{tmp_path.name}", None)


def test_a_loaded_plugin_names_its_module_and_passes_it_to_child_processes(lab):
    module = f"{lab.name}.pieces"
    assert module in plugins.load([module])
    assert CRITERIA.origin(f"kl_{lab.parent.name}") == module
    assert CRITERIA.origin("forward_kl") == "sekd.selection.criteria"  # the built-ins' own modules
    assert os.environ[plugins.ENV] == ""  # loading passes nothing on: a config's plugins reach a job by its config
    plugins.pass_on()  # what sekd.train.main() does first: a wrapper's imports reach the processes it starts
    assert module in os.environ[plugins.ENV].split(",")


def test_a_piece_registered_inside_a_function_is_that_module_s(monkeypatch):
    """As under pytest-xdist, whose main module (execnet's) no child process can import."""
    from sekd.selection.criteria import criterion, forward_kl

    monkeypatch.setenv(plugins.ENV, "")
    criterion("kl_inside_a_test")(forward_kl.fn)
    try:
        assert CRITERIA.origin("kl_inside_a_test") == __name__
    finally:
        CRITERIA._entries.pop("kl_inside_a_test")


def test_a_run_of_a_plugin_piece_holds_its_module_version_and_source(lab):
    module, name = f"{lab.name}.pieces", f"kl_{lab.parent.name}"
    plugins.load([module])
    [piece] = plugins.used({"criterion": {"name": name}, "position": {"policy": "top_k"}})
    assert piece["key"] == "criterion.name" and piece["module"] == module and piece["version"] == "0.3"
    cfg = compose_cfg([f"plugins=[{module}]", f"criterion.name={name}"])
    before = config_hash(cfg)
    (lab / "helpers.py").write_text("# a helper the piece might call: part of the package's source\n")
    assert plugins.used({"criterion": {"name": name}})[0]["source"] != piece["source"]
    assert config_hash(cfg) != before


def test_built_in_pieces_keep_their_identity_whatever_plugins_are_loaded(lab):
    bare = config_hash(compose_cfg(["criterion.name=forward_kl"]))
    plugins.load([f"{lab.name}.pieces"])
    assert config_hash(compose_cfg([f"plugins=[{lab.name}.pieces]", "criterion.name=forward_kl"])) == bare


def test_a_plugin_that_fails_is_refused_and_can_be_imported_once_fixed(lab):
    (lab / "broken.py").write_text("raise ImportError('needs numpy 3')\n")
    with pytest.raises(
        plugins.PluginError, match=r"^plugins: plugin '.*broken' failed to import \(ImportError: needs numpy 3\)$"
    ):
        plugins.load([f"{lab.name}.broken"])
    (lab / "broken.py").write_text("VALUE = 1\n")
    plugins.load([f"{lab.name}.broken"])  # not left half imported in sys.modules
    assert sys.modules[f"{lab.name}.broken"].VALUE == 1
    assert issubclass(plugins.PluginError, ConfigError)  # exit 2, before any model loads


def test_a_plugin_that_takes_a_registered_name_is_refused_naming_both_modules(lab):
    (lab / "clash.py").write_text(PIECE.format(name="reverse_kl", scale=1.0))
    with pytest.raises(plugins.PluginError) as err:
        plugins.load([f"{lab.name}.clash"])
    assert str(err.value) == (
        f"plugins: plugin '{lab.name}.clash': criterion 'reverse_kl' is already registered by "
        "sekd.selection.criteria; give the piece a name of its own"
    )
    assert CRITERIA.origin("reverse_kl") == "sekd.selection.criteria"


@pytest.mark.parametrize("bad", ["", "  "])
def test_a_plugin_entry_must_be_a_module_name(bad):
    with pytest.raises(plugins.PluginError, match="must be a module name"):
        plugins.import_plugin(bad)


def test_a_module_a_parent_passed_on_that_is_gone_names_the_variable(monkeypatch):
    monkeypatch.setenv(plugins.ENV, "lab_gone.pieces")
    with pytest.raises(plugins.PluginError, match=r"^SEKD_PLUGINS: plugin 'lab_gone.pieces' failed to import"):
        plugins.load()
