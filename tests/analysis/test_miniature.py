"""analysis/miniature.py on synthetic records (tests/test_report_tables.record): the distillation-length and
pretrained-pair tables, the Full KD loss curve from metrics.jsonl, the PNGs and CSVs its CLI writes."""

from __future__ import annotations

import copy
import json

import pandas as pd
import pytest

from analysis import miniature
from sekd.stores.runs import resolved
from tests.helpers import compose_cfg
from tests.test_report_tables import deep_update, record

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def configs():
    return {p: resolved(compose_cfg([f"experiment={p}"])) for p in ("student", "full_kd", "se_kd")}


def write(configs, root, preset, steps, acc, *, student_steps=300, seed=1337):
    cfg = deep_update(
        copy.deepcopy(configs[preset]),
        {"train": {"steps": steps}, "model": {"embedded": {"student": {"steps": student_steps}}}},
    )
    rec = record(cfg, preset, seed, (acc, 1000.0 / acc, 50.0), root)
    if preset != "student":  # record() writes 20 steps: the run's own count is what the tables read
        path = root / "runs" / rec["run_dir"].rsplit("/", 1)[1] / "record.json"
        path.write_text(json.dumps({**rec, "steps": steps}))
        (path.parent / "metrics.jsonl").write_text(
            "".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in range(5, steps + 1, 5))
        )


def test_tables_curves_and_files(configs, tmp_path):
    root = tmp_path / "m"
    write(configs, root, "student", None, 14.0)
    for steps, (full, se) in {25: (15.0, 14.0), 100: (17.0, 15.0), 300: (19.0, 16.5)}.items():
        write(configs, root, "full_kd", steps, full)
        write(configs, root, "se_kd", steps, se)
    write(configs, root, "full_kd", 300, 20.0, student_steps=1200)  # another pretrained pair
    df = miniature.runs([root])
    steps = miniature.steps_table(df)
    assert steps["preset"].tolist() == ["student", *["full_kd"] * 3, *["se_kd"] * 3]
    assert steps.loc[steps["preset"].eq("full_kd"), ["train_steps", "acc_mean"]].values.tolist() == [
        [25, 15.0],
        [100, 17.0],
        [300, 19.0],
    ]
    sizes = miniature.sizes_table(df)
    assert sizes.loc[sizes["preset"].eq("full_kd"), "student_steps"].tolist() == [300, 1200]
    curves = miniature.loss_curves(df)
    assert set(curves["student_steps"]) == {300, 1200} and curves["step"].max() == 300
    out, csv = tmp_path / "png", tmp_path / "csv"
    assert miniature.main([str(root), "--out", str(out), "--csv", str(csv)]) == 0
    for name in ("miniature_steps.png", "miniature_loss.png", "miniature_sizes.png"):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC
    assert pd.read_csv(csv / "miniature_steps.csv").shape[0] == len(steps)


def test_an_empty_folder_fails_clearly(tmp_path, capsys):
    assert miniature.main([str(tmp_path)]) == 1
    assert "no scored record.json" in capsys.readouterr().err


def test_the_held_out_loss_finds_the_pair_where_the_run_built_it(monkeypatch, tmp_path):
    """A record keeps paths.cache as written; read literally it would rebuild the pair in a folder named
    '${oc.env:...}'. Resolved, it is the run's cache."""
    written = {"paths": {"cache": "${oc.env:SEKD_CACHE_DIR,.sekd_cache}"}}
    monkeypatch.delenv("SEKD_CACHE_DIR", raising=False)
    assert str(miniature.artifacts_dir(written)) == ".sekd_cache"
    monkeypatch.setenv("SEKD_CACHE_DIR", str(tmp_path))
    assert miniature.artifacts_dir(written) == tmp_path


def test_spearman_against_the_paper_is_per_seed(tmp_path):
    """Rows ordered as the paper orders them give rho = 1 under one seed, reversed -1 under the other: mean 0; a seed
    that ran only some rows is left out."""
    ref = pd.read_csv(miniature.tables.REFERENCE)
    rows = ref[ref["table"].eq("T2") & ~ref["preset"].isin(["student", "teacher"])].drop_duplicates("acc")
    root = tmp_path / "t2"
    for preset, acc in zip(rows["preset"], rows["acc"]):
        cfg = resolved(compose_cfg([f"experiment={preset}"]))
        record(cfg, preset, 1337, (acc - 60, 10.0, 5.0), root)
        record(cfg, preset, 1338, (60 - acc, 10.0, 5.0), root)
        if preset in set(rows["preset"][:3]):  # a seed that ran 3 of the rows: no rho comparable with the others'
            record(cfg, preset, 1339, (acc - 60, 10.0, 5.0), root)
    r = miniature.spearman_vs_paper(miniature.runs([root]), "T2")
    assert (r["seeds"], r["rows"]) == (2, len(rows))
    assert r["mean"] == pytest.approx(0.0) and r["std"] == pytest.approx(2**0.5)


def test_pretraining_curves_mark_the_kept_step(configs, tmp_path):
    cache = tmp_path / "cache"
    for role, vals in {"teacher": [3.5, 3.1, 3.3], "student": [4.0, 3.6, 3.5]}.items():
        folder = cache / "embedded" / f"model-{role}-abc"
        folder.mkdir(parents=True)
        (folder / "inputs.json").write_text(json.dumps({"role": role, "spec": {"steps": 150, "hidden_size": 64}}))
        (folder / "pretrain_curve.json").write_text(
            json.dumps([{"step": 50 * (i + 1), "train_loss": v - 0.5, "val_loss": v} for i, v in enumerate(vals)])
        )
    curves = miniature.pretrain_curves(cache)
    assert curves.groupby("role")["kept"].first().to_dict() == {"student": 150, "teacher": 100}
    root = tmp_path / "m"
    write(configs, root, "student", None, 14.0)
    assert miniature.main([str(root), "--out", str(tmp_path / "png"), "--pretrain", str(cache)]) == 0
    assert (tmp_path / "png" / "miniature_pretrain.png").read_bytes()[:8] == PNG_MAGIC
    assert miniature.main([str(root), "--out", str(tmp_path / "png"), "--pretrain", str(tmp_path / "none")]) == 1
