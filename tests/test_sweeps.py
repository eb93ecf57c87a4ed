"""Every cell of every sweep composes and validates, under both profiles, before anything is submitted."""

import itertools

import pandas as pd
import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from sekd.app.checks import validate
from sekd.evaluation.suites import get_suite
from sekd.report.tables import REFERENCE
from tests.helpers import ROOT, composed

SWEEPS = ROOT / "sweeps"
OTHERS = {"demo", "miniature", "smoke_slurm"}  # not paper grids; tests/test_config.py covers demo and miniature
NAMES = sorted(p.stem for p in SWEEPS.glob("*.yaml") if p.stem not in OTHERS and not p.stem.startswith("miniature_"))
# measurements of the embedded miniature itself (docs/miniature.md), not paper grids: one seed, their own axes
MINIATURE = sorted(p.stem for p in SWEEPS.glob("miniature_*.yaml"))
VALIDATION = {"v1", "v2", "k_budget", "l_budget"}  # scored on validation data, as the paper chooses k and l
GRID_KEYS = {"experiment", "seed", "position.k", "samples.l", "classes"}  # presets and the few values that vary
MODELS = {"embedded": "embedded", "paper": "qwen3_8b_to_1.7b"}


def sweep_file(name):
    return yaml.safe_load((SWEEPS / f"{name}.yaml").read_text())


def grid(name):
    """The cartesian product of hydra.sweeper.params, as lists of `key=value` overrides."""
    params = sweep_file(name)["hydra"]["sweeper"]["params"]
    parsed = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in params.items()])
    axes = [
        [f"{o.key_or_group}={v}" for v in o.sweep_string_iterator()]
        if o.is_sweep_override()
        else [f"{o.key_or_group}={o.value()}"]
        for o in parsed
    ]
    return [list(cell) for cell in itertools.product(*axes)]


def test_there_is_a_sweep_per_table_and_figure():
    assert set(NAMES) == {"t2", "t3", "t4", "t5", "t7", "v1", "v2", "k_budget", "l_budget", "sparse_targets"}


@pytest.mark.parametrize("name", NAMES)
def test_a_sweep_names_presets_and_the_values_that_vary(name):
    spec = sweep_file(name)
    assert set(spec) <= {"defaults", "hydra", "logging"}, "a sweep never copies a preset's (or a group's) values"
    assert set(spec.get("logging", {})) <= {"group"}  # only its wandb group: the sweep's own name
    assert spec.get("logging", {}).get("group", name) == name
    assert {"profile": "embedded"} in spec["defaults"]
    params = spec["hydra"]["sweeper"]["params"]
    assert set(params) <= GRID_KEYS and "experiment" in params
    # the paper's seeds; Table 5 (GSM8K) ran 1340-1342
    assert str(params["seed"]).split(",") == (["1340", "1341", "1342"] if name == "t5" else ["1337", "1338", "1339"])
    assert spec["hydra"]["mode"] == "MULTIRUN"


@pytest.mark.parametrize("name", [n for n in NAMES if n.startswith(("t", "v"))])
def test_a_table_sweep_runs_every_row_of_its_table(name):
    ref = pd.read_csv(REFERENCE)
    wanted = set(ref.loc[ref["table"].eq(name.upper()), "preset"].dropna())
    presets = {c[0].removeprefix("experiment=") for c in grid(name)}
    assert wanted and wanted <= presets


@pytest.mark.slow  # every cell of every sweep, under both profiles
@pytest.mark.xdist_group("compose")  # beside tests/test_config_hashes.py's, which compose the same cells
@pytest.mark.parametrize("profile", ["embedded", "paper"])
@pytest.mark.parametrize("name", NAMES)
def test_every_cell_composes_and_validates(name, profile):
    cells = grid(name)
    assert len(cells) == len({tuple(c) for c in cells}) >= 3
    # Composing costs ~0.2 s and a seed is a plain value, so compose each cell once and set its seeds.
    by_method = {}
    for cell in cells:
        by_method.setdefault(tuple(o for o in cell if not o.startswith("seed=")), []).append(cell)
    for method, seeded in by_method.items():
        # composed once a process: tests/test_config_hashes.py composes the same cells (same overrides)
        cfg = composed(SWEEPS, name, [f"hydra.searchpath=[file://{ROOT / 'conf'}]", f"profile={profile}", *method])
        assert "profile" not in cfg  # the profile only selects groups; no new top-level key
        assert cfg.model.name == MODELS[profile] and cfg.paths.root == f"outputs/{profile}"
        assert cfg.eval.split == ("validation" if name in VALIDATION else "test")
        if profile == "paper":
            assert cfg.eval.suite == ("validation" if name in VALIDATION else "paper")
        get_suite(cfg.eval.suite, cfg.eval.split)  # the suite runs on that split (scoring would refuse)
        for override in method:  # the grid's values reach the config
            key, value = override.split("=", 1)
            got = cfg.preset if key == "experiment" else OmegaConf.select(cfg, key)
            if (ROOT / "conf" / key).is_dir() and key != "experiment":  # a group: its option's file
                option = yaml.safe_load((ROOT / "conf" / key / f"{value}.yaml").read_text())
                assert OmegaConf.to_container(got) == option, (override, got)
            else:
                assert str(got) == value, (override, got)
        for cell in seeded:
            (seed,) = [int(o.split("=")[1]) for o in cell if o.startswith("seed=")]
            OmegaConf.update(cfg, "seed", seed)
            validate(cfg)


@pytest.mark.slow
@pytest.mark.parametrize("name", MINIATURE)
def test_every_cell_of_a_miniature_sweep_composes_and_validates(name):
    """docs/miniature.md's measurements run on the embedded pair; every cell is a valid run."""
    with initialize_config_dir(config_dir=str(SWEEPS), version_base="1.3"):
        for cell in grid(name):
            cfg = compose(config_name=name, overrides=[f"hydra.searchpath=[file://{ROOT / 'conf'}]", *cell])
            assert cfg.model.name == "embedded" and cfg.paths.root == "outputs/miniature"
            for override in cell:
                key, value = override.split("=", 1)
                got = cfg.preset if key == "experiment" else OmegaConf.select(cfg, key)
                assert str(got) == value, (override, got)
            validate(cfg)
