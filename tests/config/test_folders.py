"""sekd/config/folders.py and the sweeps on Hydra's search path: the configs and sweeps an installed package
ships (sekd/conf, sekd/sweeps) win over a checkout's; a sweep is found by name from any folder; and
`sekd-train --version` prints sekd's version, not Hydra's. The wheel itself: scripts/wheel-check.sh."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import sekd
from sekd.config import folders
from tests.helpers import ROOT


def test_a_checkout_reads_its_own_conf_and_sweeps():
    assert Path(folders.CONF) == ROOT / "conf" and Path(folders.SWEEPS) == ROOT / "sweeps"


def test_the_folders_a_package_ships_win(monkeypatch, tmp_path):
    package = tmp_path / "site-packages" / "sekd"
    (package / "conf").mkdir(parents=True)
    monkeypatch.setattr(folders, "PACKAGE", package)
    assert folders.config_folder("conf") == str(package / "conf")
    assert folders.config_folder("sweeps") == str(tmp_path / "site-packages" / "sweeps")  # none shipped: beside


def test_a_sweep_is_found_by_name_on_hydras_search_path(tmp_path):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=folders.CONF, version_base="1.3"):
        demo = compose(config_name="demo", return_hydra_config=True)
    assert demo.hydra.sweeper.params.experiment == "student,teacher,full_kd,random_pos,se_kd,se_kd3x"
    assert any(p.provider == "sekd-sweeps" for p in demo.hydra.runtime.config_sources)


def test_version_is_sekds(tmp_path):
    res = subprocess.run(
        [sys.executable, "-m", "sekd.train", "--version"], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0 and res.stdout.strip() == f"sekd {sekd.__version__}", res.stderr
