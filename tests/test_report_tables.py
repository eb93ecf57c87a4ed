"""`sekd-report --table T`: the paper's rows in its order, ours (mean ± std) beside its numbers, from fake runs."""

import contextlib
import copy
import hashlib
import io
import json

import pandas as pd
import pytest

from sekd.stores.runs import resolved
from sekd.report.results import main as report_main
from sekd.report.tables import COLUMNS, REFERENCE, TABLES, build_reference, hours
from tests.helpers import ROOT, compose_cfg

SEEDS = (1337, 1338, 1339)
# preset -> (acc, ppl, ece) per seed; the teacher beats every distilled row, so bold must skip it
METRICS = {
    "student": [(14.0, 900.0, 70.0), (14.5, 905.0, 69.0), (14.2, 910.0, 69.5)],
    "teacher": [(30.0, 100.0, 50.0), (30.5, 101.0, 50.5), (29.5, 99.0, 49.5)],
    "full_kd": [(17.0, 500.0, 61.0), (18.0, 520.0, 62.0), (17.5, 480.0, 60.5)],
    "random_pos": [(16.0, 600.0, 64.0), (16.8, 640.0, 63.0)],  # one seed short
    "se_kd": [(18.5, 450.0, 63.0), (19.0, 470.0, 62.5), (18.0, 455.0, 62.0)],
    "top_kl": [(17.2, 430.0, 59.0), (17.9, 440.0, 59.5), (17.1, 425.0, 58.0)],
    "top_smp": [(15.0, 700.0, 65.0), (15.4, 690.0, 66.0)],
    "se_kd3x": [(14.7, 800.0, 66.0), (14.9, 790.0, 66.5), (15.1, 780.0, 67.0)],
}
# runs that other tables own: they must not leak into T2
BUDGET = ("se_kd", 1337, {"position": {"k": 0.01}}, (5.0, 9000.0, 90.0))
VALID = [("se_kd", s, {"eval": {"split": "validation"}}, (40.0 + i, 0.0, 0.0)) for i, s in enumerate(SEEDS[:2])]
GSM8K = [("full_kd", s, {"data": {"name": "jsonl"}}, (60.0 + i, 8.0, 0.0)) for i, s in enumerate((1340, 1341))]


def deep_update(tree, change):
    for k, v in change.items():
        deep_update(tree[k], v) if isinstance(v, dict) else tree.__setitem__(k, v)
    return tree


def record(config, preset, seed, values, root, *, gsm8k=None, costs=None, wall=10.0):
    """What sekd/app/record.py writes (same keys), with made-up numbers."""
    acc, ppl, ece = values
    h = hashlib.sha256(json.dumps([config, seed], sort_keys=True).encode()).hexdigest()[:12]
    run = root / "runs" / f"{preset}-s{seed}-{h}"
    metrics = {"acc": acc, "ppl": ppl, "ece": ece, "sekd_choice_test/acc": acc / 100}
    if gsm8k is not None:
        metrics["gsm8k"] = gsm8k
    distill = config["mode"] == "distill"
    if costs is None:
        costs = (
            {
                "teacher_loaded": distill,
                "prepass_seconds": 0.0,
                "prepass_reused": False,
                "prepass_forward_tokens": {},
                "cache_build_seconds": 0.0,
                "cache": None,
                "cache_bytes_read": 0,
                "teacher_forward_tokens": 40704,
            }
            if distill
            else {}
        )
    rec = {
        "preset": preset,
        "label": config["label"],
        "mode": config["mode"],
        "seed": seed,
        "config_hash": h,
        "run_dir": str(run),
        "model": str(run / "model"),
        "metrics": metrics,
        "tokens_seen": 40704 if distill else 0,
        "tokens_supervised": 8268 if distill else 0,
        "steps": 20 if distill else 0,
        "train_time_s": wall - 2,
        "costs": costs,
        "train_samples": 159,
        "available_samples": 798,
        "wall_time_s": wall,
        "peak_memory_mb": 800.0,
        "git_commit": "0" * 40,
        "overrides": [f"experiment={preset}", f"seed={seed}"],
        "config": {**config, "seed": seed},
        "slurm_job_id": None,
        "slurm_array_task_id": None,
        "host": "test",
        "finished_at": f"2026-01-01T00:00:{seed % 60:02d}",
    }
    run.mkdir(parents=True)
    (run / "record.json").write_text(json.dumps(rec))
    return rec


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Fake runs: T2's baselines and two signals (the rest missing), T7's SE-KD3X built once then reused,
    a budget run, validation runs and GSM8K-regime runs."""
    root = tmp_path_factory.mktemp("tables")
    configs = {p: resolved(compose_cfg([f"experiment={p}"])) for p in METRICS}
    recs = []
    for preset, per_seed in METRICS.items():
        for i, values in enumerate(per_seed):
            costs = None
            if preset == "se_kd3x":  # the first seed builds the teacher cache, the others reuse it
                costs = {
                    "prepass_seconds": 1.5 if i == 0 else 0.0,
                    "cache_build_seconds": 3.0 if i == 0 else 0.0,
                    "cache_bytes_read": 4259352,
                    "teacher_forward_tokens": 20352 if i == 0 else 0,
                    "prepass_forward_tokens": {"student": 100, "teacher": 0},
                    "teacher_loaded": i == 0,
                }
            recs.append(record(configs[preset], preset, SEEDS[i], values, root, costs=costs, wall=10.0 + i))
    for preset, seed, change, values in [BUDGET, *VALID, *GSM8K]:
        cfg = deep_update(copy.deepcopy(configs[preset]), change)
        recs.append(record(cfg, preset, seed, values, root, gsm8k=values[0] + 10 if preset == "full_kd" else None))
    return root, recs


@pytest.fixture(scope="module")
def report(runs, tmp_path_factory):
    root, _ = runs
    out = tmp_path_factory.mktemp("out")
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = report_main([str(root), "--out", str(out), *[a for t in TABLES for a in ("--table", t)]])
    assert rc == 0
    return out, buf.getvalue()


def ours(recs, preset, *, split="test", data=("embedded",)):
    """The fake runs a paper row should average: the preset as it is, on the table's split and regime."""
    rows = [
        r
        for r in recs
        if r["preset"] == preset
        and r["config"]["eval"]["split"] == split
        and r["config"]["data"]["name"] in data
        and r["config"]["position"]["k"] != BUDGET[2]["position"]["k"]
    ]
    return pd.DataFrame([r["metrics"] for r in rows])


def table_csv(out, t):
    return pd.read_csv(out / f"table_{t}.csv")


def cells(out, t):
    """The markdown table as a DataFrame of strings, indexed by method."""
    lines = [ln for ln in (out / f"table_{t}.md").read_text().splitlines() if ln.startswith("|")]
    rows = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines]
    return pd.DataFrame(rows[2:], columns=rows[0]).set_index("Method")


@pytest.mark.parametrize("t", TABLES)
def test_every_table_renders_the_papers_rows_in_order(report, t):
    out, stdout = report
    ref = pd.read_csv(REFERENCE).query("table == @t")
    csv = table_csv(out, t)
    assert csv["method"].tolist() == ref["method"].tolist()
    if t in ("T2", "T3", "T4", "T5", "V1", "V2"):
        rows = pd.read_csv(ROOT / "sekd" / "report" / "paper" / "paper_rows.csv").query("table == @t")
        assert csv["method"].tolist() == rows["method"].tolist()
    assert {"n_seeds", *(f"{c}_{s}" for c in COLUMNS[t] for s in ("ours_mean", "ours_std", "paper", "best"))} <= set(
        csv.columns
    )
    md = (out / f"table_{t}.md").read_text()
    assert md.strip() in stdout
    assert len(cells(out, t)) == len(ref) and "nan" not in md.lower()
    tex = (out / f"table_{t}.tex").read_text()
    assert "\\begin{tabular}" in tex and "\\end{tabular}" in tex
    assert sum(ln.rstrip().endswith("\\\\") for ln in tex.splitlines()) == len(ref) + 1  # header + rows


def test_mean_and_std_over_seeds_match_pandas_with_the_papers_value_beside(report, runs):
    out, _ = report
    csv = table_csv(out, "T2").set_index("preset")
    md = cells(out, "T2")
    header = {"acc": "Acc.", "ppl": "PPL", "ece": "ECE"}
    for preset, method in (
        ("full_kd", "Full KD"),
        ("random_pos", "RandomPos 20%"),
        ("se_kd", "Student entropy (SE-KD)"),
        ("student", "Qwen3-1.7B (no distillation)"),
    ):
        df = ours(runs[1], preset)
        row = csv.loc[preset]
        assert row["n_seeds"] == len(df)
        for m in ("acc", "ppl", "ece"):
            assert row[f"{m}_ours_mean"] == pytest.approx(df[m].mean())
            assert row[f"{m}_ours_std"] == pytest.approx(df[m].std())  # sample std (ddof = 1), as pandas
            assert f"{df[m].mean():.1f} ± {df[m].std():.1f}" in md.loc[method, header[m]]
        assert md.loc[method, "Acc."].endswith(f"({row['acc_paper']:.1f})")


def test_missing_runs_and_metrics_are_dashes_never_zero(report):
    out, _ = report
    md, csv = cells(out, "T2"), table_csv(out, "T2").set_index("method")
    assert md.loc["AT-KD"].drop("n").tolist() == ["– (63.8)", "– (19.8)", "– (7.3)", "– (26.7)"]
    assert md.loc["AT-KD", "n"] == "0" and csv.loc["AT-KD", ["acc_ours_mean", "acc_ours_std"]].isna().all()
    assert md["IFEval"].str.startswith("– (").all()  # the embedded suite has no IFEval
    t7 = cells(out, "T7")
    assert t7.loc["TopSmp KL"].drop("n").tolist() == ["– (14h42m)", "– (9h37m)", "–", "–", "– (64.2)"]


def test_bold_marks_the_best_of_our_distilled_rows(report):
    out, _ = report
    md, csv = cells(out, "T2"), table_csv(out, "T2").set_index("preset")
    for col, m, best in (("Acc.", "acc", "se_kd"), ("PPL", "ppl", "top_kl"), ("ECE", "ece", "top_kl")):
        bold = md[col].str.startswith("**")
        assert bold.sum() == 1 and csv.loc[csv[f"{m}_best"]].index.tolist() == [best]
        assert csv.loc[best, "label"] in md.index[bold]
    assert not csv.loc[["student", "teacher"], ["acc_best", "ppl_best", "ece_best"]].any().any()  # not ours to bold
    assert "\\textbf{" in (out / "table_T2.tex").read_text()


def test_budget_validation_and_gsm8k_runs_stay_in_their_own_tables(report, runs):
    out, _ = report
    recs = runs[1]
    t2 = table_csv(out, "T2").set_index("preset")
    assert t2.loc["se_kd", "n_seeds"] == 3  # not the k = 1% budget run, not the validation runs
    assert t2.loc["se_kd", "acc_ours_mean"] == pytest.approx(ours(recs, "se_kd")["acc"].mean())
    v1 = table_csv(out, "V1").set_index("preset")
    assert v1.loc["se_kd", "n_seeds"] == 2
    assert v1.loc["se_kd", "acc_ours_mean"] == pytest.approx(ours(recs, "se_kd", split="validation")["acc"].mean())
    assert v1.loc["full_kd", "n_seeds"] == 0
    t5 = table_csv(out, "T5").set_index("label")
    gsm = ours(recs, "full_kd", data=("jsonl",))
    assert t5.loc["Full KD", "n_seeds"] == 2
    assert t5.loc["Full KD", "gsm8k_ours_mean"] == pytest.approx(gsm["gsm8k"].mean())
    assert t5.loc["Full KD (on-policy)", "n_seeds"] == 0  # no on-policy mode: never matched
    assert t2.loc["full_kd", "n_seeds"] == 3


def test_t7_splits_se_kd3x_into_cache_construction_and_reuse(report):
    out, _ = report
    t7 = table_csv(out, "T7").set_index("method")
    built, reused = t7.loc["SE-KD3X (cache construction)"], t7.loc["SE-KD3X (reuse offline cache)"]
    assert (built["n_seeds"], reused["n_seeds"]) == (1, 2)
    assert built["teacher_tokens_ours_mean"] == 20352 and reused["teacher_tokens_ours_mean"] == 0
    assert built["selection_s_ours_mean"] == 1.5 and reused["wall_s_ours_mean"] == pytest.approx(11.5)
    assert built["wall_s_paper"] == hours("8h46m") == 8 * 3600 + 46 * 60
    md = cells(out, "T7")
    assert md.loc["SE-KD3X (cache construction)", "Wall time"] == "**10.0s ± –** (8h46m)"  # fastest; one seed
    assert md.loc["TopSmp student entropy", "Wall time"] == "10.5s ± 0.7s (7h01m)"


def test_latex_escapes_and_typesets(report):
    tex = (report[0] / "table_T3.tex").read_text()
    assert "Top 20\\% (SE-KD)" in tex and "Pos RS-KD* 20\\%" in tex and "$\\pm$" in tex and "--" in tex


def test_without_table_the_plain_report_is_unchanged(runs, tmp_path, capsys):
    assert report_main([str(runs[0]), "--out", str(tmp_path)]) == 0
    assert {p.name for p in tmp_path.iterdir()} == {"results.csv", "table.md"}
    assert "Student entropy (SE-KD)" in capsys.readouterr().out


def test_runs_of_two_models_are_refused(runs, tmp_path, capsys):
    recs = runs[1][:2]
    other = copy.deepcopy(recs[1]["config"])
    other["model"]["name"] = "qwen3_8b_to_1.7b"
    record(recs[0]["config"], recs[0]["preset"], 1, (1.0, 1.0, 1.0), tmp_path)
    record(other, recs[1]["preset"], 2, (1.0, 1.0, 1.0), tmp_path)
    assert report_main([str(tmp_path), "--table", "T2"]) == 2
    assert "several models" in capsys.readouterr().err


def test_paper_profile_runs_match_their_presets(tmp_path):
    """The profile changes model, data, train and eval, never the method: a Qwen3 run still fills its row."""
    cfg = resolved(
        compose_cfg(["experiment=se_kd", "model=qwen3_8b_to_1.7b", "data=fineweb_edu", "train=paper", "eval=paper"])
    )
    record(cfg, "se_kd", 1337, (64.0, 7.0, 27.0), tmp_path / "runs")
    assert report_main([str(tmp_path / "runs"), "--table", "T2", "--out", str(tmp_path / "out")]) == 0
    t2 = table_csv(tmp_path / "out", "T2").set_index("preset")
    assert t2.loc["se_kd", "n_seeds"] == 1 and t2.loc["se_kd", "acc_ours_mean"] == 64.0


def test_the_reference_is_regenerated_from_the_papers_csvs():
    tables = pd.DataFrame(
        {
            "table": ["T2", "T5", "T5", "T9"],
            "section": ["baseline", "off-policy", "on-policy", "x"],
            "method": ["Full KD", "SE-KD", "SE-KD", "y"],
            "acc": [64.4, 63.9, 63.7, 1.0],
            "ifeval": [20.5, None, None, None],
            "ppl": [7.3, 8.0, 9.5, None],
            "ece": [27.3, None, None, None],
            "gsm8k_acc": [None, 69.5, 70.0, None],
            "notes": None,
        }
    )
    eff = pd.DataFrame(
        {
            "table": ["T7", "T7", "T9"],
            "configuration": ["TopSmp KL", "SE-KD3X (reuse offline cache)", "z"],
            "wall": ["14h42m", "3h58m", "1 min"],
            "notes": ["sample-selection scoring 9h37m; acc 64.2", "acc 64.4", None],
        }
    )
    rows = pd.DataFrame(
        {
            "table": ["T2", "T5", "T5"],
            "section": ["baseline", "off-policy", "on-policy"],
            "method": ["Full KD", "SE-KD", "SE-KD"],
            "preset": ["full_kd", "se_kd", "on_policy_se_kd"],
        }
    )
    ref = build_reference(tables, eff, rows)
    assert ref["table"].tolist() == ["T2", "T5", "T5", "T7", "T7"]
    assert ref["preset"].iloc[:3].tolist() == ["full_kd", "se_kd", "on_policy_se_kd"]  # the section tells them apart
    t7 = ref[ref["table"].eq("T7")].set_index("method")
    assert t7.loc["TopSmp KL", ["acc", "wall_s", "selection_s"]].tolist() == [64.2, 52920.0, 34620.0]
    assert t7.loc["SE-KD3X (reuse offline cache)", "preset"] == "se_kd3x"
    assert pd.isna(t7.loc["SE-KD3X (reuse offline cache)", "selection_s"])


def test_the_committed_reference_is_what_the_script_builds_from_the_papers_tables_in_the_repo(tmp_path, capsys):
    from sekd.report.tables import PAPER_DIR, main as tables_main

    assert PAPER_DIR == ROOT / "sekd" / "report" / "paper" and (PAPER_DIR / "paper_tables.csv").is_file()
    assert tables_main(["--out", str(tmp_path / "ref.csv")]) == 0  # no argument: the repo's own copy
    assert (tmp_path / "ref.csv").read_bytes() == REFERENCE.read_bytes()


def t7_record(config, seed, root, *, train, pretrain, cache_build, prepass, reused, wall):
    costs = {
        "teacher_loaded": True,
        "prepass_seconds": prepass,
        "prepass_reused": reused,
        "prepass_forward_tokens": {"student": 100, "teacher": 0},
        "cache_build_seconds": cache_build,
        "cache": "c",
        "cache_bytes_read": 10,
        "teacher_forward_tokens": 5,
        "pretrain_seconds": pretrain,
    }
    rec = record(config, "se_kd3x", seed, (15.0, 800.0, 66.0), root, costs=costs, wall=wall)
    rec["train_time_s"] = train
    (root / "runs" / rec["run_dir"].split("/")[-1] / "record.json").write_text(json.dumps(rec))


def test_t7_wall_time_is_the_training_pipeline_not_pretraining_nor_scoring(tmp_path):
    """The first cell pretrained the embedded pair (1200 s), built the cache and scored the samples; T7's wall
    time counts its cache build in the construction row, the pre-pass for every run, pretraining nowhere."""
    cfg = resolved(compose_cfg(["experiment=se_kd3x"]))
    t7_record(
        cfg, 1337, tmp_path, train=40.0, pretrain=1200.0, cache_build=30.0, prepass=6.0, reused=False, wall=1290.0
    )
    t7_record(cfg, 1338, tmp_path, train=42.0, pretrain=0.0, cache_build=0.0, prepass=0.0, reused=True, wall=60.0)
    t7_record(cfg, 1339, tmp_path, train=44.0, pretrain=0.0, cache_build=0.0, prepass=0.0, reused=True, wall=61.0)
    assert report_main([str(tmp_path), "--table", "T7", "--out", str(tmp_path / "out")]) == 0
    t7 = table_csv(tmp_path / "out", "T7").set_index("method")
    built, reused = t7.loc["SE-KD3X (cache construction)"], t7.loc["SE-KD3X (reuse offline cache)"]
    assert built["wall_s_ours_mean"] == 40.0 + 30.0 + 6.0
    assert reused["wall_s_ours_mean"] == pytest.approx(43.0 + 6.0)  # the stored sample scores' cost, once each
    assert built["selection_s_ours_mean"] == 6.0 and pd.isna(reused["selection_s_ours_mean"])


def test_seeds_count_scored_runs_and_limited_evaluations_stay_out_of_full_rows(tmp_path):
    cfg = resolved(compose_cfg(["experiment=full_kd"]))
    limited = deep_update(copy.deepcopy(cfg), {"eval": {"limit": 50}})
    for seed in (1, 2):
        record(cfg, "full_kd", seed, (60.0 + seed, 8.0, 20.0), tmp_path)
        record(limited, "full_kd", seed, (90.0, 2.0, 5.0), tmp_path)
    unscored = record(cfg, "full_kd", 3, (0.0, 0.0, 0.0), tmp_path)
    unscored["metrics"] = {}
    (tmp_path / "runs" / unscored["run_dir"].split("/")[-1] / "record.json").write_text(json.dumps(unscored))
    se = resolved(compose_cfg(["experiment=se_kd", "eval.limit=50"]))
    record(se, "se_kd", 1, (70.0, 9.0, 21.0), tmp_path)  # only a limited run: shown, and marked
    assert report_main([str(tmp_path), "--table", "T2", "--out", str(tmp_path / "out")]) == 0
    t2 = table_csv(tmp_path / "out", "T2").set_index("preset")
    assert t2.loc["full_kd", "n_seeds"] == 2 and t2.loc["full_kd", "acc_ours_mean"] == 61.5
    assert t2.loc["full_kd", "label"] == "Full KD" and pd.isna(t2.loc["full_kd", "eval_limit"])
    assert t2.loc["se_kd", "label"].endswith("(limit=50)") and t2.loc["se_kd", "n_seeds"] == 1
    md = cells(tmp_path / "out", "T2")
    assert md.loc["Student entropy (SE-KD) (limit=50)", "Acc."] == "70.0 ± – (64.8)"  # no rival of full scores
    assert md.loc["Full KD", "Acc."] == "**61.5 ± 0.7** (64.4)"


def test_t7_compares_runs_by_tokens_per_second_per_device_and_says_the_world_size(tmp_path):
    """Full KD on one device, on two ranks and with the teacher on its own device: T7's throughput column
    divides each run's tokens/s by the devices it spanned (what sekd/app/record.py writes), and the row
    says how many devices its runs used; RandomPos, one process from before world sizes were recorded,
    says nothing and counts one device."""
    from sekd.app.record import throughput

    cfg = resolved(compose_cfg(["experiment=full_kd"]))
    runs = [
        (1, 40.0, {"world_size": 1, "devices": {"student": "cuda:0", "teacher": None}}),  # 1000 tok/s/device
        (2, 10.0, {"world_size": 2, "devices": {"student": "cuda:0", "teacher": "cuda:0"}}),  # 2000
        (3, 8.0, {"world_size": 1, "devices": {"student": "cuda:0", "teacher": "cuda:1"}}),
    ]  # 2500
    for seed, seconds, placed in runs:
        rec = record(cfg, "full_kd", seed, (60.0, 8.0, 20.0), tmp_path)
        rec.update(
            train_time_s=seconds,
            tokens_seen=40000,
            **throughput({"tokens_seen": 40000, "train_time_s": seconds, **placed}),
        )
        (tmp_path / "runs" / rec["run_dir"].split("/")[-1] / "record.json").write_text(json.dumps(rec))
    assert [rec["device_count"], rec["tokens_per_s_per_device"]] == [2, 2500.0]
    record(resolved(compose_cfg(["experiment=random_pos"])), "random_pos", 1, (60.0, 8.0, 20.0), tmp_path, wall=12.0)
    assert report_main([str(tmp_path), "--table", "T7", "--out", str(tmp_path / "out")]) == 0
    t7 = table_csv(tmp_path / "out", "T7").set_index("method")
    assert t7.loc["Full KD (100% positions)", "tokens_per_s_device_ours_mean"] == pytest.approx(5500 / 3)
    assert t7.loc["RandomPos 20%", "tokens_per_s_device_ours_mean"] == pytest.approx(40704 / 10.0)
    md = cells(tmp_path / "out", "T7")
    assert "Full KD (100% positions) (1/2 devices)" in md.index and "RandomPos 20%" in md.index
    assert md.loc["RandomPos 20%", "Tokens/s per device"] == "**4.1K ± –** (–)"  # higher is better: bold
    assert "Tokens/s per device" in (tmp_path / "out" / "table_T7.md").read_text().splitlines()[0]
