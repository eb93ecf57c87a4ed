"""A real tiny run: Hydra -> pretrained embedded pair -> KD -> HF checkpoint -> lm-eval -> record -> report."""

import json
import math

import pandas as pd
import pytest

import sekd
from sekd.report.results import main as report_main
from tests.helpers import TINY, sekd_train, tiny_cache


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    tiny_cache(tmp_path_factory, root / "cache")  # the pair prebuilt (tests/test_train_timing.py times its building)
    common = [*TINY, "logging=offline", "eval.limit=24", f"paths.root={root}", f"paths.cache={root}/cache"]
    for preset, seed in (("full_kd", 1337), ("full_kd", 1338), ("student", 1337), ("student", 1338)):
        res = sekd_train([*common, f"experiment={preset}", f"seed={seed}", "train.steps=3"])
        assert res.returncode == 0, res.stderr[-4000:]
        if (preset, seed) == ("student", 1338):  # it trains nothing: the seed cannot change its scores
            assert "is already done (record.json exists); skipping" in res.stdout, res.stdout[-2000:]
    return root


def records(root):
    return [json.loads(p.read_text()) for p in sorted(root.glob("runs/*/eval-*/record.json"))]


def test_record_holds_what_the_issue_lists(runs):
    recs = records(runs)
    assert len(recs) == 3
    full = [r for r in recs if r["preset"] == "full_kd"]
    for r in full:
        for key in (
            "config",
            "config_hash",
            "metrics",
            "seed",
            "wall_time_s",
            "peak_memory_mb",
            "tokens_seen",
            "tokens_supervised",
            "git_commit",
        ):
            assert r.get(key) is not None, key
        assert r["config"]["train"]["steps"] == 3 and r["steps"] == 3
        assert r["tokens_seen"] == 3 * 2 * 4 * 64  # steps x accum x micro-batch x seq_len
        assert 0 < r["tokens_supervised"] <= r["tokens_seen"]
        m = r["metrics"]
        assert 0 <= m["acc"] <= 100 and 0 <= m["ece"] <= 100 and m["ppl"] > 1
        assert all(math.isfinite(v) for v in m.values())
    assert full[0]["config_hash"] != full[1]["config_hash"]  # the seed is part of the result
    assert {r["sekd_version"] for r in recs} == {sekd.__version__}  # which sekd made it


def test_run_folder_has_checkpoint_lm_eval_output_and_wandb_files(runs):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for r in records(runs):
        run = runs / "runs" / r["run_dir"].split("/")[-1]
        scores = run / r["eval_dir"].split("/")[-1]
        raw = json.loads((scores / "lm_eval" / "results.json").read_text())
        assert set(raw["results"]) >= {"sekd_choice_test", "sekd_lastword_test"}
        assert (scores / "config.yaml").exists() and (scores / "overrides.yaml").exists()
        assert any((run / "wandb").glob("offline-run-*/run-*.wandb"))
        if r["mode"] == "distill":
            model = AutoModelForCausalLM.from_pretrained(run / "model")
            tok = AutoTokenizer.from_pretrained(run / "model")
            assert model.config.vocab_size >= len(tok)
            assert [json.loads(ln)["step"] for ln in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


def test_the_undistilled_student_is_scored_once_whatever_the_seed(runs):
    folders = sorted(p.name for p in (runs / "runs").iterdir())
    assert [f for f in folders if f.startswith("student")] == [f for f in folders if f.startswith("student-")]
    assert len([f for f in folders if f.startswith("student")]) == 1  # seeds 1337 and 1338 share it
    assert len([f for f in folders if f.startswith("full_kd-s")]) == 2  # distillation depends on the seed
    assert [r["seed"] for r in records(runs) if r["preset"] == "student"] == [1337]


def test_distillation_changes_the_student(runs):
    recs = {(r["preset"], r["seed"]): r for r in records(runs)}
    student = recs[("student", 1337)]["metrics"]
    distilled = recs[("full_kd", 1337)]["metrics"]
    assert distilled["ppl"] != student["ppl"]


def test_report_gathers_records_with_mean_and_std(runs, tmp_path, capsys):
    assert report_main([str(runs / "runs"), "--out", str(tmp_path)]) == 0
    df = pd.read_csv(tmp_path / "results.csv")
    assert len(df) == 3 and set(df["preset"]) == {"full_kd", "student"}
    assert {"acc", "ppl", "ece", "wall_time_s", "tokens_supervised"} <= set(df.columns)
    table = (tmp_path / "table.md").read_text()
    lines = [ln for ln in table.splitlines() if ln.startswith("|")]
    assert len(lines) == 2 + 2  # header, rule, two methods
    full_row = next(ln for ln in lines[2:] if "Full KD" in ln)  # past the header ("Acc. vs Full KD")
    acc = df[df.preset == "full_kd"]["acc"]
    assert f"{acc.mean():.1f} ± {acc.std():.1f}" in full_row
    assert "Student (no distillation)" in lines[2]  # the undistilled student comes first
    assert "Full KD" in capsys.readouterr().out


def test_report_on_an_empty_folder_fails_clearly(tmp_path, capsys):
    assert report_main([str(tmp_path)]) == 1
    assert "no record.json" in capsys.readouterr().err
