"""analysis/overlap.py: Jaccard against hand counts and a set reference, exact top_k counts, an end-to-end
pass over two tiny random Qwen3 models, and the PNG."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from analysis.overlap import jaccard_matrix, label, markdown, plot_overlap, selections, signal_overlap
from sekd.data.packing import IGNORE, PackedData
from sekd.selection.signals import SIGNALS

SPEC = {"hidden_size": 32, "layers": 1, "heads": 2, "kv_heads": 1, "intermediate_size": 64}


def mask(rows: list[list[int]], T: int) -> torch.Tensor:
    """bool [B,T] with the listed positions set per row."""
    m = torch.zeros(len(rows), T, dtype=torch.bool)
    for b, cols in enumerate(rows):
        m[b, cols] = True
    return m


def reference(masks: dict[str, torch.Tensor], per_sequence: bool) -> np.ndarray:
    """The obvious one: Python sets, one pair and one sequence at a time."""
    names = list(masks)
    sets = {n: [set(torch.nonzero(r).flatten().tolist()) for r in m] for n, m in masks.items()}
    out = np.full((len(names), len(names)), np.nan)
    for i, a in enumerate(names):
        for j, b in enumerate(names):
            if i == j:
                out[i, j] = 1.0
            elif per_sequence:
                vals = [len(A & B) / len(A | B) for A, B in zip(sets[a], sets[b]) if A | B]
                out[i, j] = sum(vals) / len(vals) if vals else np.nan
            else:
                inter = sum(len(A & B) for A, B in zip(sets[a], sets[b]))
                union = sum(len(A | B) for A, B in zip(sets[a], sets[b]))
                out[i, j] = inter / union if union else np.nan
    return out


# ---- jaccard_matrix -------------------------------------------------------------------------


def test_jaccard_hand_example():
    a = mask([[0, 1, 2], [4]], 6)
    b = mask([[1, 2, 3], [4, 5]], 6)
    c = mask([[5], [0]], 6)
    df = jaccard_matrix({"a": a, "b": b, "c": c})
    # a,b: row 0 {1,2}/{0,1,2,3} = 1/2, row 1 {4}/{4,5} = 1/2 -> 1/2; a,c and b,c disjoint -> 0
    expected = np.array([[1, 0.5, 0], [0.5, 1, 0], [0, 0, 1]])
    np.testing.assert_allclose(df.values, expected)
    assert list(df.index) == list(df.columns) == ["a", "b", "c"]
    pooled = jaccard_matrix({"a": a, "b": b}, per_sequence=False)
    assert pooled.loc["a", "b"] == pytest.approx(3 / 6)  # (2 + 1) / (4 + 2)


def test_jaccard_per_sequence_differs_from_pooled():
    a = mask([[0], list(range(8))], 8)
    b = mask([[1], list(range(8))], 8)
    assert jaccard_matrix({"a": a, "b": b}).loc["a", "b"] == pytest.approx(0.5)  # (0 + 1) / 2
    assert jaccard_matrix({"a": a, "b": b}, per_sequence=False).loc["a", "b"] == pytest.approx(8 / 10)


@pytest.mark.parametrize("per_sequence", [True, False])
@pytest.mark.parametrize("seed", range(4))
def test_jaccard_matches_set_reference(seed, per_sequence):
    g = torch.Generator().manual_seed(seed)
    masks = {f"s{i}": torch.rand(5, 17, generator=g) < p for i, p in enumerate([0.1, 0.3, 0.5, 0.05])}
    masks["s0"][2] = False  # a sequence empty in one selection only
    for m in masks.values():
        m[4] = False  # a sequence empty in every selection: left out of the per-sequence mean
    df = jaccard_matrix(masks, per_sequence=per_sequence)
    np.testing.assert_allclose(df.values, reference(masks, per_sequence), atol=1e-12)
    np.testing.assert_allclose(df.values, df.values.T)


def test_identical_and_disjoint():
    g = torch.Generator().manual_seed(0)
    m = torch.rand(4, 20, generator=g) < 0.4
    m[:, 0] = True  # no empty row
    df = jaccard_matrix({"a": m, "b": m.clone(), "c": ~m & (torch.arange(20) > 0)})
    assert df.loc["a", "b"] == df.loc["b", "a"] == 1.0
    assert df.loc["a", "c"] == df.loc["c", "b"] == 0.0
    assert (np.diag(df.values) == 1.0).all()


def test_jaccard_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="one shape"):
        jaccard_matrix({"a": torch.zeros(2, 3, dtype=torch.bool), "b": torch.zeros(2, 4, dtype=torch.bool)})


# ---- selections -----------------------------------------------------------------------------


def logits_batch(B=4, T=12, V=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    s, t = torch.randn(B, T, V, generator=g), torch.randn(B, T, V, generator=g)
    y = torch.randint(0, V, (B, T), generator=g)
    y[0, :3] = IGNORE
    y[1, ::2] = IGNORE
    y[3, :] = IGNORE  # no valid position: nothing selected
    return s, t, y


@pytest.mark.parametrize("k", [0.2, 0.05, 0.5, 1.0])
def test_selections_pick_ceil_k_n_valid(k):
    s, t, y = logits_batch()
    valid = y != IGNORE
    masks = selections(s, t, y, SIGNALS.names(), k, seed=3)
    assert list(masks) == SIGNALS.names()
    n_valid = valid.sum(-1).tolist()
    want = [min(n, max(1, math.ceil(k * n - 1e-9))) if n else 0 for n in n_valid]
    for name, m in masks.items():
        assert m.dtype == torch.bool and m.shape == y.shape, name
        assert not (m & ~valid).any(), name
        assert m.sum(-1).tolist() == want, name


def test_selections_random_is_seeded():
    s, t, y = logits_batch()
    a = selections(s, t, y, ["random"], 0.3, seed=1)["random"]
    b = selections(s, t, y, ["random"], 0.3, seed=1)["random"]
    c = selections(s, t, y, ["random"], 0.3, seed=2)["random"]
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_selections_student_only_needs_no_teacher():
    s, _, y = logits_batch()
    masks = selections(s, None, y, ["student_entropy", "student_ce", "random"], 0.2)
    assert set(masks) == {"student_entropy", "student_ce", "random"}
    with pytest.raises(ValueError, match="teacher"):
        selections(s, None, y, ["kl"], 0.2)


# ---- end to end on tiny random models -------------------------------------------------------


@pytest.fixture(scope="module")
def pair():
    from transformers import Qwen3ForCausalLM

    from sekd.embedded.build import qwen3_config

    torch.manual_seed(0)
    student = Qwen3ForCausalLM(qwen3_config(SPEC, 40, 0))
    teacher = Qwen3ForCausalLM(qwen3_config({**SPEC, "hidden_size": 48, "heads": 2}, 40, 0))
    return student, teacher


def random_data(N=7, L=16, V=37, seed=0) -> PackedData:
    g = torch.Generator().manual_seed(seed)
    w = torch.randint(1, V, (N, L + 1), generator=g)
    labels = w[:, 1:].clone()
    labels[torch.rand(N, L, generator=g) < 0.15] = IGNORE  # document starts
    return PackedData(w[:, :-1].clone(), labels, [f"id{i}" for i in range(N)])


def test_signal_overlap_end_to_end(pair):
    torch.set_num_threads(1)
    student, teacher = pair
    student.train()
    teacher.eval()
    data = random_data()
    df = signal_overlap(student, teacher, data, k=0.25, n_sequences=6, batch_size=4, vocab=37)
    names = SIGNALS.names()
    assert isinstance(df, pd.DataFrame) and df.shape == (len(names), len(names))
    assert list(df.index) == list(df.columns) == names
    J = df.values
    assert np.isfinite(J).all() and ((J >= 0) & (J <= 1)).all()
    np.testing.assert_allclose(J, J.T)
    assert (np.diag(J) == 1.0).all()
    assert student.training and not teacher.training  # modes restored

    again = signal_overlap(student, teacher, data, k=0.25, n_sequences=6, batch_size=4, vocab=37)
    pd.testing.assert_frame_equal(df, again)  # deterministic, random signal included


def test_signal_overlap_matches_one_big_batch(pair):
    """Batching does not change deterministic signals' selections."""
    student, teacher = pair
    data = random_data(seed=1)
    sigs = ["kl", "student_entropy", "teacher_ce"]
    a = signal_overlap(student, teacher, data, signals=sigs, k=0.2, n_sequences=7, batch_size=3)
    b = signal_overlap(student, teacher, data, signals=sigs, k=0.2, n_sequences=7, batch_size=7)
    pd.testing.assert_frame_equal(a, b, atol=1e-12)


def test_signal_overlap_teacher_optional(pair):
    student, _ = pair
    df = signal_overlap(student, None, random_data(), signals=["student_ce", "random"], n_sequences=4)
    assert df.shape == (2, 2)
    with pytest.raises(ValueError, match="teacher"):
        signal_overlap(student, None, random_data(), signals=["kl"], n_sequences=4)


# ---- output ---------------------------------------------------------------------------------


def test_plot_overlap_writes_png(tmp_path):
    names = ["kl", "student_entropy", "kl_plus_student_entropy"]
    df = pd.DataFrame([[1, 0.3, 0.8], [0.3, 1, 0.5], [0.8, 0.5, 1]], index=names, columns=names)
    out = plot_overlap(df, tmp_path / "sub" / "overlap.png", title="test")
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5_000
    assert [p.name for p in out.parent.iterdir()] == ["overlap.png"]  # no temp file left behind


def test_label_and_markdown():
    assert label("kl_plus_student_entropy") == "KL + student entropy"
    assert label("ce_ratio") == "CE ratio"
    df = pd.DataFrame([[1.0, 0.25], [0.25, 1.0]], index=["a", "b"], columns=["a", "b"])
    assert markdown(df).splitlines() == ["| | a | b |", "|---|---|---|", "| a | 1.00 | 0.25 |", "| b | 0.25 | 1.00 |"]
