"""`sekd-report` without --table: one row per configuration (never a tiny-model run averaged with an embedded
one, nor a 50-example score with a full one), seeds counting scored runs, every cell formatted alike, and a
broken record skipped with one line. Records as sekd/app/record.py writes them (tests/test_report_tables.record)."""

import copy
import json

import pandas as pd
import pytest

from sekd.stores.runs import resolved
from sekd.report.results import main as report_main
from tests.helpers import compose_cfg
from tests.test_report_tables import deep_update, record


@pytest.fixture(scope="module")
def configs():
    return {
        name: resolved(compose_cfg(over))
        for name, over in {
            "se_kd": ["experiment=se_kd"],
            "se_kd_tiny": ["experiment=se_kd", "model=tiny"],
            "full_kd": ["experiment=full_kd"],
            "student": ["experiment=student"],
        }.items()
    }


def table(out) -> pd.DataFrame:
    """table.md as strings, indexed by Method."""
    lines = [ln for ln in (out / "table.md").read_text().splitlines() if ln.startswith("|")]
    rows = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines]
    return pd.DataFrame(rows[2:], columns=rows[0]).set_index("Method")


def report(root, out, capsys):
    rc = report_main([str(root), "--out", str(out)])
    return rc, capsys.readouterr()


def test_a_tiny_model_run_is_not_averaged_with_an_embedded_one(configs, tmp_path, capsys):
    runs = tmp_path / "runs"
    for seed, ppl in ((1, 20.0), (2, 22.0)):
        record(configs["se_kd"], "se_kd", seed, (60.0, ppl, 10.0), runs)
    for seed, ppl in ((1, 8e7), (2, 9e7)):
        record(configs["se_kd_tiny"], "se_kd", seed, (30.0, ppl, 40.0), runs)
    # where a run's files and logs went and how many threads it used change no result: same row
    moved = deep_update(
        copy.deepcopy(configs["se_kd"]),
        {
            "paths": {"root": "elsewhere", "cache": "/c"},
            "logging": {"wandb": "disabled"},
            "train": {"threads": 4},
            "eval": {"batch_size": 2},
            "stage": "score",
        },
    )
    record(moved, "se_kd", 3, (61.0, 21.0, 11.0), runs)
    rc, _ = report(runs, tmp_path / "out", capsys)
    assert rc == 0
    t = table(tmp_path / "out")
    assert sorted(t.index) == [
        "Student entropy (SE-KD) (model.name=embedded)",
        "Student entropy (SE-KD) (model.name=tiny)",
    ]
    emb, tiny = (
        t.loc["Student entropy (SE-KD) (model.name=embedded)"],
        t.loc["Student entropy (SE-KD) (model.name=tiny)"],
    )
    assert (emb["seeds"], tiny["seeds"]) == ("3", "2")
    assert emb["PPL"] == f"{pd.Series([20.0, 22.0, 21.0]).mean():.2f} ± {pd.Series([20.0, 22.0, 21.0]).std():.2f}"
    assert tiny["PPL"] == f"{8.5e7:.2f} ± {pd.Series([8e7, 9e7]).std():.2f}"
    csv = pd.read_csv(tmp_path / "out" / "results.csv")
    assert len(csv) == 5 and csv.groupby("method")["seed"].count().to_dict() == {
        "Student entropy (SE-KD) (model.name=embedded)": 3,
        "Student entropy (SE-KD) (model.name=tiny)": 2,
    }


def test_a_differing_key_names_the_row_and_presets_alone_keep_their_label(configs, tmp_path, capsys):
    runs = tmp_path / "runs"
    record(configs["full_kd"], "full_kd", 1, (60.0, 20.0, 10.0), runs)
    record(
        deep_update(copy.deepcopy(configs["full_kd"]), {"train": {"lr": 0.01}}), "full_kd", 1, (58.0, 25.0, 12.0), runs
    )
    record(configs["student"], "student", 1, (50.0, 30.0, 20.0), runs)
    assert report(runs, tmp_path / "out", capsys)[0] == 0
    methods = table(tmp_path / "out").index.tolist()
    assert methods[0] == "Student (no distillation)"  # alone in its preset: its label as it is
    assert sorted(methods[1:]) == ["Full KD (train.lr=0.002)", "Full KD (train.lr=0.01)"]


def test_limited_evaluations_are_their_own_row_and_say_so(configs, tmp_path, capsys):
    runs = tmp_path / "runs"
    for seed in (1, 2):
        record(configs["full_kd"], "full_kd", seed, (60.0 + seed, 20.0, 10.0), runs)
        record(
            deep_update(copy.deepcopy(configs["full_kd"]), {"eval": {"limit": 50}}),
            "full_kd",
            seed,
            (70.0 + seed, 15.0, 9.0),
            runs,
        )
    record(deep_update(copy.deepcopy(configs["student"]), {"eval": {"limit": 50}}), "student", 1, (50.0, 1, 1), runs)
    assert report(runs, tmp_path / "out", capsys)[0] == 0
    t = table(tmp_path / "out")
    assert t.index[0] == "Student (no distillation) (limit=50)" and sorted(t.index[1:]) == [
        "Full KD",
        "Full KD (limit=50)",
    ]
    assert t.loc["Full KD", "Acc."] == "61.5 ± 0.7" and t.loc["Full KD (limit=50)", "Acc."] == "71.5 ± 0.7"


def test_seeds_count_scored_runs_and_single_seed_cells_look_like_the_rest(configs, tmp_path, capsys):
    runs = tmp_path / "runs"
    record(configs["full_kd"], "full_kd", 1, (60.0, 83362304.0, 0.0), runs)
    unscored = record(configs["full_kd"], "full_kd", 2, (0.0, 0.0, 0.0), runs)
    unscored["metrics"] = {}  # trained, never scored (a scoring job that has not run yet)
    (tmp_path / "runs" / "runs" / unscored["run_dir"].split("/")[-1] / "record.json").write_text(json.dumps(unscored))
    assert report(runs, tmp_path / "out", capsys)[0] == 0
    row = table(tmp_path / "out").loc["Full KD"]
    assert row["seeds"] == "1"
    assert (row["Acc."], row["PPL"], row["ECE"]) == ("60.0 ± –", "83362304.00 ± –", "0.0 ± –")
    text = (tmp_path / "out" / "table.md").read_text()
    assert "e+07" not in text and "| 0 " not in text


def test_a_record_of_the_wrong_shape_or_encoding_is_skipped_with_one_line(configs, tmp_path, capsys):
    runs = tmp_path / "runs"
    good = record(configs["full_kd"], "full_kd", 1, (60.0, 20.0, 10.0), runs)
    bad = {
        "list": [1, 2],
        "metrics": {**good, "metrics": [1, 2]},
        "seed": {**good, "seed": "one"},
        "nopreset": {k: v for k, v in good.items() if k != "preset"},
        "config": {**good, "config": "x"},
    }
    paths = []
    for name, blob in bad.items():
        (runs / name).mkdir()
        (runs / name / "record.json").write_text(json.dumps(blob))
        paths.append(runs / name / "record.json")
    (runs / "latin1").mkdir()
    (runs / "latin1" / "record.json").write_bytes(
        json.dumps({**good, "label": "Full KD é"}, ensure_ascii=False).encode("latin-1")
    )
    paths.append(runs / "latin1" / "record.json")
    rc, io = report(runs, tmp_path / "out", capsys)
    assert rc == 0 and "Traceback" not in io.err
    lines = io.err.strip().splitlines()
    assert len(lines) == len(paths)
    for path in paths:
        (line,) = [ln for ln in lines if f"skipping {path}:" in ln]
        assert line.startswith("sekd-report: skipping ")
    assert "not UTF-8" in next(ln for ln in lines if "latin1" in ln)
    assert table(tmp_path / "out").loc["Full KD", "seeds"] == "1"
    # the paper-layout tables read the same way
    assert report_main([str(runs), "--table", "T2"]) == 0
    assert len(capsys.readouterr().err.strip().splitlines()) == len(paths)
