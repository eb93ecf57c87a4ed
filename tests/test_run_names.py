"""One configuration, one run, one name (#24 part 5). Two routes to the same settings, SE-KD with the KL signal
(`experiment=se_kd position.signal=kl`) and the KL preset (`experiment=top_kl`), through the real CLI on the tiny
pair: the first trains and is named by what it changed, the second finds that run finished and makes no folder,
and the report has one row. The report's naming of records as sekd/app/record.py writes them, in-process."""

from __future__ import annotations

import json
import re

import pytest

from sekd.report.results import assign_methods, load_records, summarize
from sekd.report.results import main as report_main
from sekd.stores.runs import file_safe, resolved
from tests.helpers import TINY, compose_cfg, sekd_train, tiny_cache
from tests.test_report_tables import record as fake_record  # its name: no process (tests/conftest.py)

ROUTE_A = ["experiment=se_kd", "position.signal=kl"]
ROUTE_B = ["experiment=top_kl"]


@pytest.fixture(scope="module")
def two_routes(tmp_path_factory):
    """Route A trains and scores (2 steps, 8 examples); route B, the same settings, runs after it."""
    root = tmp_path_factory.mktemp("names")
    tiny_cache(tmp_path_factory, root / "cache")
    common = [*TINY, "train.steps=2", "eval.limit=8", f"paths.root={root}", f"paths.cache={root}/cache"]
    first = sekd_train([*ROUTE_A, *common, "logging=offline"])  # wandb offline: its run id and group
    assert first.returncode == 0, first.stderr[-3000:]
    second = sekd_train([*ROUTE_B, *common])
    assert second.returncode == 0, second.stderr[-3000:]
    return root, first, second


def test_the_first_route_is_named_by_what_it_changes(two_routes):
    root, first, _ = two_routes
    [folder] = (root / "runs").iterdir()
    assert re.fullmatch(r"se_kd-s1337-[0-9a-f]{12}", folder.name)  # the folder keeps its preset's name
    [rec] = [json.loads(p.read_text()) for p in folder.glob("eval-*/record.json")]
    assert rec["preset"] == "se_kd" and rec["label"] == "Student entropy (SE-KD)"  # kept, as they were
    assert rec["name"].startswith("se_kd (position.signal=kl, model=tiny, data.seq_len=64, ")
    assert rec["name"].endswith(", train.steps=2, eval.limit=8)")
    assert "train.threads" not in rec["name"] and "logging" not in rec["name"] and "paths" not in rec["name"]
    assert rec["changes"][0] == "position.signal=kl" and "experiment=se_kd" not in rec["changes"]
    assert f"sekd: {rec['name']} seed=1337 -> {folder}" in first.stdout, first.stdout[-2000:]
    [wandb_run] = folder.glob("wandb/offline-run-*")  # wandb's id: the safe name, the seed, the config hash
    assert wandb_run.name.endswith(f"-{file_safe(rec['name'], 40)}-s1337-{rec['config_hash']}")
    assert rec["name"].encode() in next(wandb_run.glob("run-*.wandb")).read_bytes()  # its group
    assert "logging=offline" not in rec["name"]


def test_the_second_route_finds_the_run_finished_and_makes_no_folder(two_routes):
    root, _, second = two_routes
    [folder] = (root / "runs").iterdir()
    assert f"sekd: {folder} is already done (record.json exists); skipping" in second.stdout, second.stdout[-2000:]
    assert len(list(folder.glob("eval-*/record.json"))) == 1


def test_the_report_has_one_row_named_by_the_change(two_routes, tmp_path, capsys):
    root, _, _ = two_routes
    assert report_main([str(root / "runs"), "--out", str(tmp_path)]) == 0
    capsys.readouterr()
    rows = [ln for ln in (tmp_path / "table.md").read_text().splitlines() if ln.startswith("| Student entropy")]
    assert len(rows) == 1 and "position.signal=kl" in rows[0], rows
    assert rows[0].count("position.signal") == 1 and rows[0].count("limit=8") == 1 and "eval.limit" not in rows[0]


# ---- the report's names, from records as sekd-train writes them ------------------------------------------------


@pytest.fixture(scope="module")
def configs():
    return {
        "se_kd": resolved(compose_cfg(["experiment=se_kd"])),
        "se_kd_kl": resolved(compose_cfg(["experiment=se_kd", "position.signal=kl"])),
        "top_kl": resolved(compose_cfg(["experiment=top_kl"])),
        "se_kd_tiny": resolved(compose_cfg(["experiment=se_kd", "model=tiny", "eval.limit=5"])),
    }


def methods(recs) -> list[str]:
    return list(assign_methods(load_records([], recs))["method"])


def test_a_lone_run_with_overrides_shows_what_they_change(configs, tmp_path):
    rec = fake_record(configs["se_kd_kl"], "se_kd", 1, (50.0, 20.0, 5.0), tmp_path)
    assert methods([rec]) == ["Student entropy (SE-KD)"]  # a record from before names: as it was
    rec["changes"] = ["position.signal=kl"]
    assert methods([rec]) == ["Student entropy (SE-KD) (position.signal=kl)"]


def test_a_key_the_run_changed_and_its_preset_differs_in_is_shown_once(configs, tmp_path):
    plain = fake_record(configs["se_kd"], "se_kd", 1, (50.0, 20.0, 5.0), tmp_path / "a")
    changed = {**fake_record(configs["se_kd_kl"], "se_kd", 1, (51.0, 19.0, 5.0), tmp_path / "b")}
    changed["changes"] = ["position.signal=kl"]
    assert methods([plain, changed]) == [
        "Student entropy (SE-KD) (position.signal=student_entropy)",
        "Student entropy (SE-KD) (position.signal=kl)",
    ]


def test_a_group_override_stands_for_its_keys_and_the_limit_is_marked_once(configs, tmp_path):
    plain = fake_record(configs["se_kd"], "se_kd", 1, (50.0, 20.0, 5.0), tmp_path / "a")
    tiny = fake_record(configs["se_kd_tiny"], "se_kd", 1, (30.0, 9e7, 40.0), tmp_path / "b")
    tiny["changes"] = ["model=tiny", "eval.limit=5"]
    plain_method, tiny_method = methods([plain, tiny])
    assert plain_method == "Student entropy (SE-KD) (model.name=embedded)"
    assert tiny_method == "Student entropy (SE-KD) (model=tiny, limit=5)"


def test_seeds_of_one_configuration_through_two_presets_are_one_row(configs, tmp_path):
    first = fake_record(configs["se_kd_kl"], "se_kd", 1, (50.0, 20.0, 5.0), tmp_path / "a")
    first["changes"] = ["position.signal=kl"]
    second = fake_record(configs["top_kl"], "top_kl", 2, (52.0, 18.0, 5.0), tmp_path / "b")
    rows = summarize(load_records([], [first, second]))
    assert list(rows[("method", "")]) == ["Student entropy (SE-KD) (position.signal=kl)"]
    assert list(rows[("seeds", "n")]) == [2] and list(rows[("acc", "mean")]) == [51.0]
    alone = load_records([], [second])  # the preset's own run, alone: its own name, no change
    assert list(summarize(alone)[("method", "")]) == ["KL"]
