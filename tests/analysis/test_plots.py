"""analysis/plots.py and sekd/report/loading.py (load_results): line and point counts on small synthetic tables, the Pareto
front against a hand example and a brute-force reference, atomic PNG writes, and record flattening."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from analysis import plots
from sekd.report.loading import load_results, load_runs, one_setting

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def runs(rows: list[tuple]) -> pd.DataFrame:
    """(preset, label, mode, k, l, acc, wall, tokens) per method and budget, repeated over seeds 0 and 1 (acc +0/+1)."""
    out = []
    for preset, label, mode, k, l, acc, wall, tokens in rows:
        for seed in (0, 1):
            out.append(
                {
                    "preset": preset,
                    "label": label,
                    "mode": mode,
                    "seed": seed,
                    "k": k,
                    "l": l,
                    "acc": acc + seed,
                    "ppl": 10.0 - seed,
                    "wall_time_s": wall + 10 * seed,
                    "teacher_forward_tokens": tokens,
                    "cache_bytes_read": 0.0 if tokens == tokens else np.nan,
                }
            )
    return pd.DataFrame(out)


NAN = float("nan")
GRID = runs(
    [
        ("student", "Student", "score_student", 1.0, 1.0, 50, 5, NAN),
        ("teacher", "Teacher", "score_teacher", 1.0, 1.0, 70, 6, NAN),
        ("full_kd", "Full KD", "distill", 1.0, 1.0, 62, 200, 1000),
        *[("se_kd", "SE-KD", "distill", k, 1.0, 60 + 4 * k, 150 + 50 * k, 1000) for k in (0.05, 0.1, 0.2, 0.5)],
        *[("random_pos", "RandomPos", "distill", k, 1.0, 55 + 8 * k, 140 + 50 * k, 1000) for k in (0.1, 0.2, 0.5)],
        *[("se_kd3x", "SE-KD3X", "distill", 0.2, l, 58 + 6 * l, 40 + 100 * l, 500 * l) for l in (0.1, 0.2, 0.5)],
    ]
)


def lines(fig, gid: str) -> list:
    return [ln for ln in fig.axes[0].lines if ln.get_gid() == gid]


# ---- budget curves ---------------------------------------------------------------------------


def test_budget_curve_k_has_one_line_per_swept_method():
    fig = plots.budget_curve(GRID, "k", "acc")
    sweeps = lines(fig, "sweep")
    assert sorted(ln.get_label() for ln in sweeps) == ["RandomPos", "SE-KD"]
    se = next(ln for ln in sweeps if ln.get_label() == "SE-KD")
    np.testing.assert_allclose(se.get_xdata(), [0.05, 0.1, 0.2, 0.5])
    np.testing.assert_allclose(se.get_ydata(), [60 + 4 * k + 0.5 for k in (0.05, 0.1, 0.2, 0.5)])  # seed mean
    # the student, the teacher and Full KD as references; SE-KD3X (k fixed at 20%) is not in the k figure
    assert sorted(ln.get_label() for ln in lines(fig, "reference")) == ["Full KD", "Student", "Teacher"]
    assert fig.axes[0].get_xscale() == "log"
    assert len(fig.axes[0].collections) == 2  # one ± std band per curve


def test_budget_curve_l_and_its_linear_axis():
    fig = plots.budget_curve(GRID, "l", "acc")
    assert [ln.get_label() for ln in lines(fig, "sweep")] == ["SE-KD3X"]
    assert fig.axes[0].get_xscale() == "linear"
    assert len(lines(fig, "reference")) == 3


def test_budget_curve_one_line_per_value_of_the_other_budget():
    df = pd.concat([GRID, runs([("se_kd3x", "SE-KD3X", "distill", k, 0.5, 59, 60, 100) for k in (0.1, 0.5)])])
    labels = sorted(ln.get_label() for ln in lines(plots.budget_curve(df, "k"), "sweep"))
    assert labels == ["RandomPos", "SE-KD", "SE-KD3X (l=50%)"]  # SE-KD3X's l=0.1/0.2 rows hold one k: no line


def test_budget_curve_single_seed_draws_no_band():
    fig = plots.budget_curve(GRID[GRID.seed == 0], "k", references=False)
    assert len(lines(fig, "sweep")) == 2 and not lines(fig, "reference")
    assert not fig.axes[0].collections


def test_budget_curve_without_a_sweep_raises():
    flat = GRID[(GRID.k.isin([0.2, 1.0])) & (GRID.l.isin([0.2, 1.0]))]
    assert plots.budget_sweeps(flat, "k").empty and plots.budget_sweeps(flat, "l").empty
    with pytest.raises(ValueError, match="two or more values of k"):
        plots.budget_curve(flat, "k")
    with pytest.raises(ValueError, match="param must be"):
        plots.budget_curve(GRID, "x")
    with pytest.raises(ValueError, match="no column nope"):
        plots.budget_curve(GRID, "k", "nope")


def test_figures_refuse_to_mix_settings():
    mixed = pd.concat(
        [
            GRID.assign(setting="embedded embedded/test"),
            GRID.assign(setting="embedded embedded/validation", acc=GRID.acc + 5),
        ]
    )
    with pytest.raises(ValueError, match="several settings"):
        plots.budget_curve(mixed, "k")
    with pytest.raises(ValueError, match="several settings"):
        plots.pareto(mixed)
    setting, part = one_setting(mixed, want="embedded embedded/validation")
    assert setting == "embedded embedded/validation" and (part.acc.to_numpy() == GRID.acc.to_numpy() + 5).all()
    plots.budget_curve(part, "k")  # one setting: fine
    with pytest.raises(ValueError, match="no run was scored in setting"):
        one_setting(mixed, want="paper paper/test")


def test_one_setting_picks_the_one_with_the_most_rows():
    swept = GRID.assign(setting="v")
    flat = GRID[GRID.k.isin([0.2, 1.0]) & GRID.l.isin([0.2, 1.0])].assign(setting="t")
    both = pd.concat([flat, flat, flat, swept])  # 36 rows under "t", 30 under "v"; the sweeps are under "v"
    assert (both.setting == "t").sum() > (both.setting == "v").sum()
    assert one_setting(both)[0] == "t"
    assert one_setting(both, lambda d: plots.budget_sweeps(d, "k"))[0] == "v"
    assert one_setting(GRID)[0] is None  # no setting column (a results CSV): everything, as one


# ---- Pareto ----------------------------------------------------------------------------------


def test_pareto_front_hand_example():
    #            a    b    c    d    e    f(ties a)  g(NaN)
    cost = [1.0, 2.0, 3.0, 2.5, 4.0, 1.0, NAN]
    acc = [60.0, 65.0, 64.0, 66.0, 66.0, 59.0, 99.0]
    # a cheapest; b beats a; c is beaten by b (cheaper, better); d best under 4; e ties d's acc at more cost;
    # f costs what a costs but scores less; g has no cost
    expected = [True, True, False, True, False, False, False]
    assert plots.pareto_front(cost, acc).tolist() == expected
    # lower is better (perplexity): flip the scores, the same front
    assert plots.pareto_front(cost, [-a for a in acc], maximize=False).tolist() == expected
    # exact duplicates dominate neither
    assert plots.pareto_front([1, 1], [5, 5]).tolist() == [True, True]


def test_pareto_front_matches_brute_force():
    rng = np.random.default_rng(0)
    c, v = rng.integers(0, 6, 40).astype(float), rng.integers(0, 6, 40).astype(float)
    brute = [
        not any(c[j] <= c[i] and v[j] >= v[i] and (c[j] < c[i] or v[j] > v[i]) for j in range(40)) for i in range(40)
    ]
    assert plots.pareto_front(c, v).tolist() == brute


def test_pareto_table_one_point_per_method_and_budget():
    t = plots.pareto_table(GRID, "wall_time_s", "acc")
    assert len(t) == 1 + 4 + 3 + 3  # Full KD, SE-KD x4 k, RandomPos x3 k, SE-KD3X x3 l; no student/teacher
    assert "SE-KD k=5%" in set(t["name"]) and "SE-KD3X l=10%" in set(t["name"]) and "Full KD" in set(t["name"])
    assert (t["n"] == 2).all()
    front = set(t.loc[t["on_front"], "name"])
    # SE-KD3X at l = 10/20/50% are cheapest; SE-KD k=50% (62.5 at 185 s) beats Full KD (62.5 at 205 s) on cost
    assert front == {"SE-KD3X l=10%", "SE-KD3X l=20%", "SE-KD3X l=50%", "SE-KD k=50%"}
    by_ppl = plots.pareto_table(GRID, "wall_time_s", "ppl")
    assert by_ppl["on_front"].sum() == 1  # every method has ppl 9.5: only the cheapest


def test_pareto_figure_points_front_and_references():
    fig = plots.pareto(GRID, "wall_time_s", "acc")
    ax = fig.axes[0]
    assert len(ax.containers) == 11  # one error-bar point per method and budget
    (front,) = lines(fig, "front")
    np.testing.assert_allclose(front.get_xdata(), [55, 65, 95, 180])  # seed means of the front, by cost
    assert sorted(ln.get_label() for ln in lines(fig, "reference")) == ["Student", "Teacher"]
    assert len(ax.texts) == 4  # 11 points > 10: only the front is named
    assert len(plots.pareto(GRID, annotate="all").axes[0].texts) == 11


def test_pareto_without_the_cost_raises():
    no_cost = GRID.assign(cache_bytes_read=NAN)
    with pytest.raises(ValueError, match="no run has both cache_bytes_read and acc"):
        plots.pareto(no_cost, "cache_bytes_read")
    with pytest.raises(ValueError, match="no column"):
        plots.pareto(GRID.drop(columns="teacher_forward_tokens"), "teacher_forward_tokens")


# ---- overlap heatmap, save -------------------------------------------------------------------


def test_overlap_heatmap_annotates_every_cell():
    names = ["student_entropy", "kl", "random"]
    J = pd.DataFrame([[1, 0.5, NAN], [0.5, 1, 0.1], [NAN, 0.1, 1]], index=names, columns=names)
    fig = plots.overlap_heatmap(J, title="t")
    ax = fig.axes[0]
    assert len(ax.texts) == 9 and sum(t.get_text() == "n/a" for t in ax.texts) == 2
    assert [t.get_text() for t in ax.get_yticklabels()] == ["student entropy", "KL", "random"]
    with pytest.raises(ValueError, match="square"):
        plots.overlap_heatmap(J.iloc[:2])


def test_save_writes_a_png_atomically(tmp_path):
    path = plots.save(plots.budget_curve(GRID, "k"), tmp_path / "sub" / "k.png")
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 5000
    assert os.listdir(tmp_path / "sub") == ["k.png"]  # no temp file left
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # a normal file's mode, not mkstemp's 0600


# ---- results_io ------------------------------------------------------------------------------


def _record(preset, seed, k, l, acc, costs):
    return {
        "preset": preset,
        "label": preset.upper(),
        "mode": "distill",
        "seed": seed,
        "config_hash": f"{preset}{seed}{k}",
        "run_dir": f"runs/{preset}-{seed}",
        "metrics": {"acc": acc, "task/acc": acc / 100, "note": "text"},
        "costs": costs,
        "wall_time_s": 10.0,
        "finished_at": f"2026-01-01T00:00:0{seed}",
        "config": {
            "position": {"k": k, "policy": "top_k", "signal": "student_entropy"},
            "samples": {"l": l, "name": "all"},
            "classes": {"name": "all"},
            "train": {"flow": "chunked"},
            "model": {"name": "embedded"},
            "eval": {"suite": "embedded", "split": "test"},
        },
    }


def test_load_runs_adds_budgets_and_costs(tmp_path):
    recs = [
        _record(
            "se_kd",
            0,
            0.2,
            1.0,
            60.0,
            {"teacher_forward_tokens": 100, "cache_bytes_read": 0, "prepass_seconds": 1.5, "cache_build_seconds": 0.0},
        ),
        _record("se_kd", 1, 0.1, 1.0, 61.0, {}),  # a record written before costs existed
        _record("full_kd", 0, 1.0, 1.0, 62.0, {"teacher_forward_tokens": 500}),
    ]
    for i, r in enumerate(recs):
        d = tmp_path / "runs" / f"r{i}"
        d.mkdir(parents=True)
        (d / "record.json").write_text(json.dumps(r))
    df = load_runs([tmp_path])
    assert len(df) == 3
    row = df[(df.preset == "se_kd") & (df.seed == 0)].iloc[0]
    assert (row.k, row.l, row.teacher_forward_tokens, row.prepass_seconds) == (0.2, 1.0, 100, 1.5)
    assert row.signal == "student_entropy" and row["task/acc"] == 0.6 and row.setting == "embedded embedded/test"
    assert row["config.train.flow"] == "chunked"  # sekd.report.results's flattened columns come along
    assert np.isnan(df[(df.preset == "se_kd") & (df.seed == 1)].iloc[0].teacher_forward_tokens)
    assert load_results(tmp_path).shape == df.shape  # a folder of runs


def test_load_results_from_a_report_csv(tmp_path):
    csv = tmp_path / "results.csv"
    GRID.drop(columns=["k", "l", "teacher_forward_tokens", "cache_bytes_read"]).to_csv(csv, index=False)
    for source in (csv, tmp_path):  # the file, or a folder holding only it
        df = load_results(source)
        assert len(df) == len(GRID) and df[["k", "l", "teacher_forward_tokens"]].isna().all().all()
        assert df["setting"].isna().all()
    assert load_results(tmp_path / "nothing").empty


# ---- unlike runs stay apart ------------------------------------------------------------------


def _write(root, recs):
    for i, r in enumerate(recs):
        d = root / "runs" / f"r{i}"
        d.mkdir(parents=True)
        (d / "record.json").write_text(json.dumps(r))


def test_cache_built_and_cache_reused_runs_are_separate_pareto_points(tmp_path):
    """The run that built the offline teacher cache pays for it; the runs that reused it are another point."""
    recs = []
    for seed, build in ((0, 300.0), (1, 0.0), (2, 0.0)):
        r = _record(
            "se_kd3x",
            seed,
            0.2,
            0.2,
            60.0 + seed,
            {
                "cache_build_seconds": build,
                "prepass_seconds": 0.0,
                "pretrain_seconds": 0.0,
                "teacher_forward_tokens": 10,
            },
        )
        r["config"]["classes"]["cache"] = "auto"
        r["train_time_s"] = 50.0
        recs.append(r)
    recs.append(_record("full_kd", 0, 1.0, 1.0, 62.0, {"cache_build_seconds": 0.0, "pretrain_seconds": 0.0}))
    recs[-1]["train_time_s"] = 200.0
    _write(tmp_path, recs)
    df = load_runs([tmp_path])
    assert df.set_index("seed").query("preset == 'se_kd3x'")["cache_role"].to_dict() == {
        0: "built",
        1: "reused",
        2: "reused",
    }
    assert df[df.preset == "full_kd"]["cache_role"].isna().all()
    t = plots.pareto_table(df, "train_wall_s", "acc").set_index("name")
    assert t.loc["SE_KD3X (cache built)", ["train_wall_s_mean", "n"]].tolist() == [350.0, 1]
    assert t.loc["SE_KD3X (cache reused)", ["train_wall_s_mean", "n"]].tolist() == [50.0, 2]
    assert t.loc["FULL_KD", "train_wall_s_mean"] == 200.0
    fig = plots.pareto(df, "train_wall_s", "acc")
    assert len(fig.axes[0].containers) == 3


def test_pareto_by_tokens_per_second_per_device_says_the_world_size(tmp_path):
    """Records at world size 1 and 2 (sekd.app.record.throughput's fields) and one from before world sizes
    (one device): throughput per device is the x axis, more is better, and a method's runs on different
    numbers of devices are separate, named points; the title says how many devices the runs spanned."""
    from sekd.app.record import throughput

    recs = []
    for seed, world, seconds, acc in ((0, 1, 40.0, 60.0), (1, 2, 10.0, 60.5), (2, 2, 10.0, 61.5)):
        r = _record("se_kd", seed, 0.2, 1.0, acc, {"pretrain_seconds": 0.0})
        r.update(
            tokens_seen=40000,
            train_time_s=seconds,
            **throughput(
                {
                    "tokens_seen": 40000,
                    "train_time_s": seconds,
                    "world_size": world,
                    "devices": {"student": "cpu", "teacher": "cpu"},
                }
            ),
        )
        recs.append(r)
    old = _record("full_kd", 0, 1.0, 1.0, 62.0, {"pretrain_seconds": 0.0})  # no world size: one device
    old.update(tokens_seen=40000, train_time_s=100.0)
    _write(tmp_path, [*recs, old])
    df = load_runs([tmp_path])
    assert df.set_index("seed").query("preset == 'se_kd'")["devices"].tolist() == [1, 2, 2]
    t = plots.pareto_table(df, "tokens_per_s_device", "acc").set_index("name")
    assert t.loc["SE_KD (1 device)", ["tokens_per_s_device_mean", "n"]].tolist() == [1000.0, 1]
    assert t.loc["SE_KD (2 devices)", ["tokens_per_s_device_mean", "acc_mean"]].tolist() == [2000.0, 61.0]
    assert t.loc["FULL_KD", "tokens_per_s_device_mean"] == 400.0
    # faster and as good beats slower: SE-KD on 1 device (1000 tok/s, 60.0) is dominated by 2 devices (2000, 61.0)
    assert t["on_front"].to_dict() == {"SE_KD (1 device)": False, "SE_KD (2 devices)": True, "FULL_KD": True}
    ax = plots.pareto(df, "tokens_per_s_device", "acc").axes[0]
    assert ax.get_title().endswith(", 1-2 devices per run") and ax.get_xlabel() == "training tokens/s per device ↑"
    one = df[df["devices"].eq(1)]
    assert "devices" not in plots.pareto(one, "tokens_per_s_device", "acc").axes[0].get_title()
    # wall-clock costs do not compare across world sizes: plot throughput per device instead; other costs stay
    assert [plots.fair_cost(df, c) for c in ("train_wall_s", "wall_time_s", "teacher_forward_tokens")] == [
        "tokens_per_s_device",
        "tokens_per_s_device",
        "teacher_forward_tokens",
    ]
    assert plots.fair_cost(one, "train_wall_s") == "train_wall_s"


def test_train_wall_leaves_out_pretraining_and_scoring(tmp_path):
    first = _record(
        "se_kd", 0, 0.2, 1.0, 60.0, {"pretrain_seconds": 1200.0, "cache_build_seconds": 0.0, "prepass_seconds": 0.0}
    )
    first.update(train_time_s=40.0, wall_time_s=1300.0)  # the cell that happened to pretrain the embedded pair
    later = _record(
        "se_kd", 1, 0.2, 1.0, 61.0, {"pretrain_seconds": 0.0, "cache_build_seconds": 0.0, "prepass_seconds": 0.0}
    )
    later.update(train_time_s=42.0, wall_time_s=60.0)
    _write(tmp_path, [first, later])
    df = load_runs([tmp_path]).set_index("seed")
    assert df["train_wall_s"].tolist() == [40.0, 42.0] and df["pretrain_seconds"].tolist() == [1200.0, 0.0]


def test_limited_evaluations_are_another_setting_and_the_figure_says_so(tmp_path):
    recs = [_record("se_kd", s, k, 1.0, 60.0 + k, {}) for s in (0, 1) for k in (0.1, 0.2)]
    for r in recs[:2]:
        r["config"]["eval"]["limit"] = 50
    _write(tmp_path, recs)
    df = load_runs([tmp_path])
    assert sorted(df["setting"].unique()) == ["embedded embedded/test", "embedded embedded/test limit=50"]
    with pytest.raises(ValueError, match="several settings"):
        plots.budget_curve(df, "k")
    _, limited = one_setting(df, want="embedded embedded/test limit=50")
    assert limited["seed"].tolist() == [0, 0]
    limited = pd.concat([limited, limited.assign(seed=1, acc=limited.acc + 1)])
    assert "(limit=50)" in plots.budget_curve(limited, "k", references=False).axes[0].get_title()
    _, full = one_setting(df, want="embedded embedded/test")
    assert "limit" not in plots.pareto(full, "wall_time_s", references=False).axes[0].get_title()


def test_env_path_takes_a_relative_path_from_where_the_command_ran(tmp_path, monkeypatch):
    from sekd.report.loading import env_path

    monkeypatch.setenv("PWD", str(tmp_path))
    monkeypatch.chdir("/")  # as a Jupyter kernel started in analysis/
    monkeypatch.setenv("SEKD_RESULTS", "outputs/x")
    assert env_path("SEKD_RESULTS", "d") == tmp_path / "outputs" / "x"
    monkeypatch.setenv("SEKD_RESULTS", "/abs/x")
    assert env_path("SEKD_RESULTS", "d") == Path("/abs/x")
    monkeypatch.delenv("SEKD_RESULTS")
    assert env_path("SEKD_RESULTS", "/default") == Path("/default")
