"""A researcher's own pieces, end to end (sekd/plugins.py): a module named in `plugins` runs in every job of
a local sweep, as does one a wrapper script imported before `sekd.train.main()`; an installed package's
`sekd.plugins` entry point is found; a plugin that fails, or takes a built-in's name, is one line; a run
of a plugin piece is the same run from a sweep and from one command, and a new run once its source changes.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from sekd import load_results
from sekd.report.results import load_records, summarize
from tests.helpers import ROOT, TINY, sekd_train

OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
FAST = [*TINY, "train.steps=2", "eval.limit=16", "position.signal=student_entropy"]

LAB = '''
"""A lab's policy: every stride-th valid position, whatever u says (a baseline a researcher might try)."""
from dataclasses import dataclass

import torch

import sekd


@dataclass(frozen=True)
class StrideOptions:
    stride: int = 2

    def __post_init__(self):
        sekd.at_least("stride", self.stride, 1)


@sekd.policy("stride", StrideOptions)
def stride(u, valid, *, stride, generator=None, step=0):
    T = valid.shape[1]
    return sekd.Draws.from_mask(valid & (torch.arange(T, device=valid.device) % stride == 0))
'''

WRAPPED = '''
"""A criterion only a wrapper script imports: half the forward KL."""
import sekd
from sekd.selection.criteria import forward_kl


@sekd.criterion("half_kl")
def half_kl(s, t, y, *, temperature=1.0, row=None, u=None):
    return 0.5 * forward_kl(s, t, y, temperature=temperature)
'''

WRAPPER = """
import lab_wrapped  # registers half_kl before sekd reads a config

from sekd.train import main

main()
"""


@pytest.fixture
def lab(tmp_path) -> Path:
    """A folder on PYTHONPATH holding the lab's modules (not installed: found by name)."""
    src = tmp_path / "src"
    (src / "lab_pieces").mkdir(parents=True)
    (src / "lab_pieces" / "__init__.py").write_text(textwrap.dedent(LAB))
    (src / "lab_wrapped.py").write_text(textwrap.dedent(WRAPPED))
    (src / "wrapper.py").write_text(textwrap.dedent(WRAPPER))
    return src


def on_path(*folders: Path) -> dict[str, str]:
    return {**OFFLINE, "PYTHONPATH": os.pathsep.join([*map(str, folders), str(ROOT)])}


def records(root: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(root.glob("runs/*/eval-*/record.json"))]


def wrapper_run(lab: Path, args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(lab / "wrapper.py"), *args],
        cwd=ROOT,
        env={**os.environ, **on_path(lab)},
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_plugins_run_in_every_local_job_and_a_changed_source_is_a_new_run(lab, tmp_path):
    root = tmp_path / "out"
    args = [*FAST, "plugins=[lab_pieces]", "position.policy=stride", f"paths.root={root}"]
    sweep = wrapper_run(lab, ["-m", *args, "criterion.name=forward_kl,half_kl", "hydra/launcher=local"])
    assert sweep.returncode == 0, sweep.stderr[-3000:]
    done = records(root)
    assert sorted(r["config"]["criterion"]["name"] for r in done) == ["forward_kl", "half_kl"]
    for rec in done:  # each job imported the key's module; the wrapper's came through the environment
        [policy] = [p for p in rec["plugins"] if p["key"] == "position.policy"]
        assert policy["name"] == "stride" and policy["module"] == "lab_pieces" and len(policy["source"]) == 16
    assert [p["module"] for r in done for p in r["plugins"] if p["key"] == "criterion.name"] == ["lab_wrapped"]

    again = sekd_train([*args, "criterion.name=forward_kl"], env=on_path(lab))
    assert again.returncode == 0, again.stderr[-3000:]
    assert "already done" in again.stdout and len(records(root)) == 2  # the sweep's cell, the same run

    module = lab / "lab_pieces" / "__init__.py"
    module.write_text(module.read_text() + "\n# stride now counts from 0 (a changed source)\n")
    changed = sekd_train([*args, "criterion.name=forward_kl"], env=on_path(lab))
    assert changed.returncode == 0, changed.stderr[-3000:]
    after = records(root)
    assert len(after) == 3  # trained again: the plugin's source is part of the run
    sources = {p["source"] for r in after for p in r["plugins"] if p["key"] == "position.policy"}
    assert len(sources) == 2
    table = summarize(load_records([root]))  # the two sources of one configuration: two rows, not two seeds
    assert len(table) == 3 and list(table[("seeds", "n")]) == [1, 1, 1]
    assert load_records([root])["plugins"].str.contains("position.policy=stride (lab_pieces None, ", regex=False).all()
    assert documented_columns() <= set(load_results(root).columns)  # docs/api.md's table of load_results


def documented_columns() -> set[str]:
    """The column names docs/api.md lists for `sekd.load_results` (patterns like `config.*` left out)."""
    page = (ROOT / "docs" / "api.md").read_text()
    table = page[page.index("| column | what |") :].split("\n\n")[0]
    cells = [line.split("|")[1] for line in table.splitlines()[2:]]
    names = {n for cell in cells for n in re.findall(r"`([^`]+)`", cell)}
    return {n for n in names if "*" not in n and "<" not in n}


def installed(site: Path, lab: Path) -> None:
    """A distribution as pip leaves it in site-packages: its dist-info, whose entry_points.txt names the
    module in the `sekd.plugins` group (importlib.metadata finds it on sys.path)."""
    info = site / "lab_pieces-1.2.3.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: lab-pieces\nVersion: 1.2.3\n")
    (info / "entry_points.txt").write_text("[sekd.plugins]\nlab = lab_pieces\n")
    (info / "top_level.txt").write_text("lab_pieces\n")
    (site / "lab_pieces").symlink_to(lab / "lab_pieces")


ROW = """
# @package _global_
defaults:
  - override /position: lab_stride
preset: lab_row
label: Lab row
"""


def test_an_installed_entry_point_is_loaded_without_naming_it(lab, tmp_path):
    site = tmp_path / "site"
    installed(site, lab)
    conf = lab / "lab_pieces" / "conf"  # the package's own config groups, on Hydra's search path once installed
    (conf / "experiment").mkdir(parents=True)
    (conf / "position").mkdir()
    (conf / "experiment" / "lab_row.yaml").write_text(ROW)
    (conf / "position" / "lab_stride.yaml").write_text(
        "signal: student_entropy\npolicy: stride\noptions: {stride: 3}\n"
    )
    code = "from sekd.plugins import load, used; load(); print(used({'position': {'policy': 'stride'}})[0]['version'])"
    found = subprocess.run(
        [sys.executable, "-c", code], env={**os.environ, **on_path(site)}, capture_output=True, text=True, timeout=120
    )
    assert found.returncode == 0, found.stderr[-2000:]
    assert found.stdout.strip() == "1.2.3"  # the distribution's version, recorded with the run
    plan = sekd_train([*FAST, "experiment=lab_row", "--plan"], env=on_path(site))
    assert plan.returncode == 0, plan.stderr[-2000:]
    shown = sekd_train([*FAST, "experiment=lab_row", "--cfg", "job"], env=on_path(site))
    assert "policy: stride" in shown.stdout and "stride: 3" in shown.stdout, shown.stderr[-2000:]
    bare = sekd_train([*FAST, "position.policy=stride", "--plan"], env=OFFLINE)
    assert bare.returncode == 2 and "position.policy='stride' is not allowed" in bare.stderr


BROKEN = {
    "fails": (
        "import torch\nraise RuntimeError('lab is broken')\n",
        "plugin 'lab_bad' failed to import (RuntimeError: lab is broken)",
    ),
    "takes_a_name": (
        "import sekd\n@sekd.criterion('forward_kl')\ndef kl(s, t, y, *, temperature=1.0):\n    return s.sum(-1)\n",
        "plugin 'lab_bad': criterion 'forward_kl' is already registered by sekd.selection.criteria",
    ),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_a_bad_plugin_is_one_line_naming_the_module(case, tmp_path):
    source, line = BROKEN[case]
    (tmp_path / "lab_bad.py").write_text(source)
    for args in ([], ["-m", "seed=1,2"]):  # one run's command line, and the sweeper's check of each cell
        res = sekd_train([*args, *FAST, "plugins=[lab_bad]", f"paths.root={tmp_path / 'out'}"], env=on_path(tmp_path))
        assert res.returncode == 2, res.stderr[-2000:]
        refusals = [ln for ln in res.stderr.splitlines() if ln.startswith("sekd: config error")]
        assert len(refusals) == (2 if args else 1), res.stderr  # one line per cell
        assert all(line in shown for shown in refusals) and "Traceback" not in res.stderr, res.stderr
    assert not (tmp_path / "out" / "runs").exists()


def test_a_plugin_named_in_the_config_runs_on_both_torchrun_ranks(lab, tmp_path):
    """Each rank is its own `sekd-train`: each imports the config's plugins before it checks the config."""
    from tests.test_distributed import TORCHRUN, args

    argv = args(tmp_path / "two", "se_kd", 2, "plugins=[lab_pieces]", "position.policy=stride", steps=1)
    two = subprocess.run(
        [*TORCHRUN, *argv, "train.distributed=ddp"],
        cwd=ROOT,
        env={**os.environ, **on_path(lab), "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    [stats] = (tmp_path / "two").glob("runs/*/train_stats.json")
    assert json.loads(stats.read_text())["steps"] == 1
