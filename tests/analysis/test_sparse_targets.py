"""analysis/sparse_targets.py: the estimator against slow obvious references on tiny float64 logits (bias,
variance, loss gap per position), the byte accounting, and one run of the CLI on the tiny pair."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from analysis import sparse_targets as st
from sekd.selection.classes import CLASSES, SparseTarget
from sekd.stores.teacher_cache import format as cache_format
from tests.helpers import ROOT, tiny_cache

T = 1.5  # a temperature other than 1, so a missing 1/T shows


def logits(n: int = 4, v: int = 9, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    t = 2.0 * torch.randn(n, v, generator=g, dtype=torch.float64)
    return t + torch.randn(n, v, generator=g, dtype=torch.float64), t  # s, t


def setting(name: str, budget: str, **opts) -> st.Setting:
    piece = CLASSES.get(name)
    return st.Setting(name, tuple(opts.items()), budget, st.accepting(piece, opts))


# ---- slow references: the gradients written out, class by class ------------------------------


def softmax_row(z: torch.Tensor) -> list[float]:
    e = [math.exp(float(x) / T) for x in z]
    return [x / sum(e) for x in e]


def full_reference(s_row, t_row, criterion: str) -> tuple[float, list[float]]:
    """D_full and g* at one position: forward KL (q - p) / T; reverse KL q (log q - log p - D) / T."""
    q, p = softmax_row(s_row), softmax_row(t_row)
    if criterion == "forward_kl":
        return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q)), [(qi - pi) / T for pi, qi in zip(p, q)]
    d = sum(qi * math.log(qi / pi) for pi, qi in zip(p, q))
    return d, [qi * (math.log(qi / pi) - d) / T for pi, qi in zip(p, q)]


def sparse_reference(s_row, target_row: list[float], tail: float | None, criterion: str):
    """D and dD/ds at one position against p~ (0 off C_t; `tail`: the ghost class's mass, or None).

    forward KL: D = sum_C p~ log(p~/q) [+ tail log(tail / q_out)]; dD/ds_j = (q_j (sum p~ + tail) - p~_j
    - tail q_j / q_out [j off C]) / T. reverse KL over the classes a of C (+ the tail class), Q_a the student's
    mass on a (renormalized over C without a tail): D = sum_a Q_a log(Q_a / P_a), dD/ds_j = q'_j (log(Q_a(j) /
    P_a(j)) - D) / T, q' = q (renormalized over C and 0 off it without a tail)."""
    q = softmax_row(s_row)
    V, on = len(q), [p > 0 for p in target_row]
    q_out = sum(qi for qi, c in zip(q, on) if not c)
    if criterion == "forward_kl":
        w = sum(target_row) + (tail or 0.0)
        d = sum(p * math.log(p / qi) for p, qi in zip(target_row, q) if p > 0)
        d += tail * math.log(tail / q_out) if tail else 0.0
        g = [(q[j] * w - target_row[j] - (0.0 if on[j] or not tail else tail * q[j] / q_out)) / T for j in range(V)]
        return d, g
    if tail is None:
        mass = sum(qi for qi, c in zip(q, on) if c)
        qc = [qi / mass if c else 0.0 for qi, c in zip(q, on)]
        d = sum(a * math.log(a / p) for a, p in zip(qc, target_row) if a > 0)
        return d, [qc[j] * (math.log(qc[j] / target_row[j]) - d) / T if on[j] else 0.0 for j in range(V)]
    d = sum(qi * math.log(qi / p) for qi, p in zip(q, target_row) if p > 0) + q_out * math.log(q_out / tail)
    ratio = [math.log(q[j] / target_row[j]) if on[j] else math.log(q_out / tail) for j in range(V)]
    return d, [q[j] * (ratio[j] - d) / T for j in range(V)]


def dense_target(name: str, opts: dict, s: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A deterministic sampler's target as its float64 reference gives it: [N,V] and the tail column or None."""
    piece = CLASSES.get(name)
    assert piece.reference is not None
    extra = {"student": s} if piece.needs_student else {}
    ref = piece.reference(t, temperature=T, **extra, **opts)
    return (ref[:, :-1], ref[:, -1]) if ref.shape[1] == t.shape[1] + 1 else (ref, None)


DETERMINISTIC = [
    ("top_k_truncation", "top", {"top": 3, "normalization": "renormalized"}),
    ("top_k_truncation", "top", {"top": 3, "normalization": "raw"}),
    ("top_k_tail", "top", {"top": 3}),
    ("top_p", "p", {"p": 0.8, "max_k": 5}),
    ("student_top_k", "top", {"top": 2, "normalization": "tail"}),
    ("student_top_k", "top", {"top": 2, "normalization": "renormalized"}),
    ("union_top_k", "top", {"top": 2, "normalization": "raw"}),
]


@pytest.mark.parametrize("name,budget,opts", DETERMINISTIC, ids=lambda x: str(x))
def test_a_deterministic_target_is_measured_as_its_slow_reference(name, budget, opts):
    """Per position: mse = ||g - g*||^2 (all of it bias), variance 0, gap = D - D_full, against gradients
    written out class by class; the row's relative bias is their root mean square over ||g*||'s."""
    s, t = logits()
    spec = setting(name, budget, **opts)
    assert spec.criteria, f"{name} {opts}: no criterion takes it"
    per = st.measure(s, t, spec, temperature=T)
    target, tail = dense_target(name, opts, s, t)
    for crit in spec.criteria:
        err2, g2 = [], []
        for n in range(s.shape[0]):
            d_full, g_full = full_reference(s[n], t[n], crit)
            tail_n = None if tail is None else float(tail[n])
            d, g = sparse_reference(s[n], [float(x) for x in target[n]], tail_n, crit)
            err2.append(sum((a - b) ** 2 for a, b in zip(g, g_full)))
            g2.append(sum(b * b for b in g_full))
            assert float(per[crit]["gap"][n]) == pytest.approx(d - d_full, rel=1e-9, abs=1e-12)
        got = per[crit]
        torch.testing.assert_close(got["mse"], torch.tensor(err2, dtype=torch.float64), rtol=1e-9, atol=1e-14)
        torch.testing.assert_close(got["bias2"], got["mse"])
        assert (got["variance"] == 0).all()
        row = st.summarize(got, spec, crit, vocab_size=t.shape[1], draws=1)
        assert row["bias_rel"] == pytest.approx(math.sqrt(sum(err2) / sum(g2)), rel=1e-9)
        assert row["error_rel"] == pytest.approx(row["bias_rel"], rel=1e-12) and row["std_rel"] == 0
        assert row["bias_rel_upper"] == row["bias_rel"]  # exact on these positions: no draws to bound


def test_the_criteria_of_each_form():
    """forward_kl reads every form; reverse_kl only renormalized and tail targets (sparse_divergence)."""
    by = {(x.sampler, x.opts.get("normalization")): x.criteria for x in st.settings(k=[2], p=[0.9], n=[2])}
    assert by[("rs_kd", None)] == by[("rs_kd_tail", None)] == ("forward_kl",)
    assert by[("top_k_truncation", "raw")] == by[("union_top_k", "raw")] == ("forward_kl",)
    for key in (("top_k_truncation", "renormalized"), ("top_k_tail", None), ("top_p", None), ("student_top_k", "tail")):
        assert set(by[key]) == {"forward_kl", "reverse_kl"}, key
    with pytest.raises(ValueError, match="--samplers: 'full'"):
        st.settings(["full"])
    with pytest.raises(ValueError, match="top"):
        st.settings(["top_k_tail"], k=[0])  # the sampler's own option check


# ---- random samplers: unbiased in expectation, with the variance the draws have ---------------


@pytest.mark.parametrize("name,opts", [("rs_kd", {"n_draws": 4}), ("rs_kd_tail", {"top": 2, "n_draws": 3})])
def test_draws_are_unbiased_and_their_variance_is_the_multinomials(name, opts):
    """Over R draws the debiased bias goes to 0 while top_k_truncation's stays; the variance per position is
    (1/T^2) sum_v Var(p~_v): (1 - sum p^2) / N for RS-KD, p_tail^2 (1 - sum r^2) / N on rs_kd_tail's tail
    (r: the tail renormalized); one draw's error^2 = bias^2 + variance."""
    s, t = logits(n=3, v=7, seed=1)
    R = 1500
    row = st.summarize(
        st.measure(s, t, setting(name, "n_draws", **opts), temperature=T, draws=R)["forward_kl"],
        setting(name, "n_draws", **opts), "forward_kl", vocab_size=7, draws=R,
    )  # fmt: skip
    p = torch.softmax(t / T, -1)
    if name == "rs_kd":
        var = (1 - p.pow(2).sum(-1)) / opts["n_draws"]
    else:
        head = p.topk(opts["top"], -1).indices
        rest = p.scatter(1, head, 0.0)
        p_tail = rest.sum(-1)
        var = p_tail**2 * (1 - (rest / p_tail[:, None]).pow(2).sum(-1)) / opts["n_draws"]
    assert row["variance"] == pytest.approx(float(var.mean()) / T**2, rel=0.1)
    assert abs(row["bias2_rel"]) < 3 * row["std_rel"] ** 2 / math.sqrt(R)  # noise of the debiased estimate
    assert row["bias_rel"] <= row["bias_rel_upper"] < 0.1  # the ~95% bound the plot draws (3 positions: loose)
    assert row["error_rel"] ** 2 == pytest.approx(max(row["bias2_rel"], 0) + row["std_rel"] ** 2, rel=1e-3, abs=1e-4)
    truncated = st.summarize(
        st.measure(s, t, setting("top_k_truncation", "top", top=2), temperature=T)["forward_kl"],
        setting("top_k_truncation", "top", top=2), "forward_kl", vocab_size=7, draws=R,
    )  # fmt: skip
    assert truncated["bias_rel"] > 0.1 and truncated["std_rel"] == 0


def test_a_target_on_every_class_has_no_bias():
    """top = V: renormalized, raw and tail targets are p_t itself, and both criteria match Full KD's."""
    s, t = logits()
    for name, opts in [
        ("top_k_truncation", {"top": 9, "normalization": "renormalized"}),
        ("top_k_truncation", {"top": 9, "normalization": "raw"}),
        ("top_k_tail", {"top": 9}),
        ("union_top_k", {"top": 9, "normalization": "tail"}),
    ]:
        spec = setting(name, "top", **opts)
        for crit, per in st.measure(s, t, spec, temperature=T).items():
            assert float(per["mse"].max()) < 1e-28 and float(per["gap"].abs().max()) < 1e-12, (name, opts, crit)


def test_a_random_sampler_needs_two_draws():
    s, t = logits()
    with pytest.raises(ValueError, match="at least 2 draws"):
        st.measure(s, t, setting("rs_kd", "n_draws", n_draws=2), draws=1)


# ---- bytes ------------------------------------------------------------------------------------


def test_bytes_per_position():
    """3-byte (id, count) records while V <= 2^18 and N <= 64 (the cache's own), 6 beyond; (id, float16)
    records 4 bytes (6 above 2^18 ids); +2 for a tail; +1 length byte per position."""
    assert st.bytes_per_position(2048, count_records=10, n_draws=64) == 1 + 30
    assert st.bytes_per_position(2048, count_records=10, n_draws=65) == 1 + 60
    assert st.bytes_per_position(151_936, prob_records=8) == 1 + 32
    assert st.bytes_per_position(151_936, prob_records=8, tail=True) == 1 + 32 + 2
    assert st.bytes_per_position(cache_format.MAX_NARROW_VOCAB + 1, prob_records=8) == 1 + 48
    assert st.bytes_per_position(2048, prob_records=4, count_records=5, n_draws=16) == 1 + 16 + 15


def test_records_of_each_kind():
    ids = torch.tensor([[0, 1, 2, 3], [4, 5, 6, 0]])
    mask = torch.tensor([[True, True, True, False], [True, True, False, False]])
    target = SparseTarget(ids, torch.ones(2, 4), mask)
    probs, counts = st.target_records("rs_kd", {"n_draws": 4}, target)
    assert probs.tolist() == [0, 0] and counts.tolist() == [3, 2]
    probs, counts = st.target_records("rs_kd_tail", {"top": 1, "n_draws": 3}, target)
    assert probs.tolist() == [3, 2] and counts.tolist() == [0, 0]  # head and draws: (id, probability) records
    probs, counts = st.target_records("top_p", {"p": 0.9}, target)
    assert probs.tolist() == [3, 2] and counts.tolist() == [0, 0]


def test_rows_carry_the_measured_support_and_bytes():
    s, t = logits(n=6, v=9)
    df = st.sweep_targets(s, t, st.settings(["rs_kd", "top_p", "union_top_k"], k=[2], p=[0.9], n=[8]), draws=4)
    full = df[df["sampler"] == "full"]
    assert set(full["criterion"]) == {"forward_kl", "reverse_kl"} and (full["bytes_per_position"] == 18).all()
    rs = df[df["sampler"] == "rs_kd"].iloc[0]
    assert 1 <= rs["support"] <= 8 and rs["bytes_per_position"] == pytest.approx(1 + 3 * rs["support"])
    union = df[(df["sampler"] == "union_top_k") & (df["form"] == "tail")].iloc[0]
    assert 2 <= union["support"] <= 4 and union["bytes_per_position"] == pytest.approx(3 + 4 * union["support"])
    assert not union["cacheable"] and df[df["sampler"] == "top_p"]["cacheable"].all()


# ---- output and the CLI -----------------------------------------------------------------------


def test_summary_and_plot(tmp_path):
    s, t = logits(n=8, v=12)
    df = st.sweep_targets(s, t, st.settings(["rs_kd", "top_k_truncation", "top_k_tail"], k=[1, 4], n=[2, 8]), draws=3)
    text = st.summary(df, "random logits")
    assert text.startswith("# Sparse teacher targets") and "| family | criterion |" in text
    assert text.count("\n| top_k_tail") == 2 + 4  # headline (2 criteria), every row (2 budgets x 2 criteria)
    path = st.plot(df, tmp_path / "p.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """The CLI once on the tiny pair (a copy of the session's built pair): every sampler at small budgets."""
    cache = tiny_cache(tmp_path_factory, tmp_path_factory.mktemp("sparse") / "cache")
    out = cache.parent / "out"
    res = subprocess.run(
        [sys.executable, "-m", "analysis.sparse_targets", "--model", "tiny", "--seq-len", "64",
         "--cache", str(cache), "--positions", "40", "--draws", "3", "--k", "1,4", "--p", "0.9",
         "--n", "2,8", "--splits", "1:4", "--max-k", "16", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    return out, res.stdout


def test_the_cli_writes_the_table_summary_and_plot(tiny_run):
    out, stdout = tiny_run
    df = pd.read_csv(out / "sparse_targets.csv")
    assert set(df["sampler"]) == {"full", *st.SAMPLERS}
    assert (df["positions"] == 40).all() and df["error_rel"].notna().all()
    assert (df.loc[df["random"], "draws"] == 3).all()
    biased = df[(df["sampler"] == "top_k_truncation") & (df["budget_value"] == 1)]
    assert (biased["bias_rel"] > 0.01).all()  # one class of 512 kept: far from Full KD
    assert (out / "sparse_targets.md").read_text().startswith("# Sparse teacher targets")
    assert (out / "sparse_targets.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "model=tiny, validation split, 40 positions, V = 512" in stdout


def test_the_cli_reads_a_pair_given_as_folders(tiny_run, tmp_path, capsys):
    """--teacher/--student (hub names or folders; here the tiny pair's folders): the pretrained route. In this
    process (the subprocess route is the fixture's): the same main()."""
    cache = tiny_run[0].parent / "cache"
    (teacher,), (student,) = (sorted((cache / "embedded").glob(f"model-{who}-*")) for who in ("teacher", "student"))
    threads = torch.get_num_threads()
    try:
        st.main(
            ["--teacher", str(teacher), "--student", str(student), "--seq-len", "64", "--cache", str(cache),
             "--samplers", "top_k_tail", "--k", "2", "--positions", "16", "--out", str(tmp_path)]
        )  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    df = pd.read_csv(tmp_path / "sparse_targets.csv")
    assert set(df["sampler"]) == {"full", "top_k_tail"} and (df["positions"] == 16).all()
    assert f"{teacher} -> {student}, validation split, 16 positions, V = 512" in capsys.readouterr().out


def test_the_cli_refuses_half_a_pair(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        st.main(["--teacher", "x", "--out", str(tmp_path)])
    assert "--teacher and --student go together" in str(exit_.value.code)  # SystemExit(str): one line, exit 1
    assert not list(Path(tmp_path).iterdir())
