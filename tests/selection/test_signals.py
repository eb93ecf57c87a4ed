"""Importance signals u(t): float64 references, flags, normalization, and a contract over SIGNALS."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sekd.selection import references as R
from sekd.selection.signals import SIGNALS, importance, importance_terms

IGNORE = -100
B, T, V = 3, 9, 13


def batch(seed: int = 0):
    """Random logits [B,T,V], labels [B,T] with invalid positions (one row fully invalid)."""
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(B, T, V, generator=g) * 2.0
    t = torch.randn(B, T, V, generator=g) * 2.0
    y = torch.randint(0, V, (B, T), generator=g)
    y[0, :2] = IGNORE
    y[1, [3, 7]] = IGNORE
    y[2, :] = IGNORE
    return s, t, y, y != IGNORE


# ---- float64 references: each signal declares its own where it is registered (sekd/selection/references.py)

REFERENCE = [n for n in SIGNALS.names() if not SIGNALS.get(n).random]  # the signals computed from logits
TERMS = {  # the per-term references of combined signals, for per-term normalization
    name: tuple(
        SIGNALS.get(n).reference if n else lambda s, t, y, *, temperature: R.entropy64(s) / math.log(s.shape[-1])
        for n in parts
    )
    for name, parts in {
        "kl_plus_student_entropy": ("kl", "student_entropy"),
        "ce_ratio_plus_student_entropy": ("ce_ratio", None),  # H(q_t) / ln|V|
        "ce_ratio_plus_student_entropy_unscaled": ("ce_ratio", "student_entropy"),
    }.items()
}


def reference_u(fn, s, t, y, valid, temperature):
    """fn's u(t) in float64 at the valid positions, -inf elsewhere.  [B,T]"""
    out = torch.full((B, T), -math.inf, dtype=torch.float64)
    out[valid] = fn(s[valid].double(), t[valid].double(), y[valid], temperature=temperature)
    return out.numpy()


def test_every_signal_declares_a_reference_and_its_terms_are_registered_pieces():
    assert set(TERMS) == {n for n in REFERENCE if len(SIGNALS.get(n).terms) > 1}
    assert all(callable(SIGNALS.get(n).reference) for n in REFERENCE)
    assert SIGNALS.get("random").reference is None and SIGNALS.get("random").terms == ()


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("name", REFERENCE)
def test_signal_matches_float64_reference(name, temperature):
    s, t, y, valid = batch()
    u = importance(SIGNALS.get(name), s, t, y, valid, temperature=temperature)
    ref = reference_u(SIGNALS.get(name).reference, s, t, y, valid, temperature)
    assert u.dtype == torch.float32 and u.shape == (B, T)
    assert torch.isneginf(u[~valid]).all()
    np.testing.assert_allclose(u[valid].double().numpy(), ref[valid.numpy()], rtol=1e-5, atol=1e-5)


def test_entropies_ignore_temperature_divergences_do_not():
    s, t, y, valid = batch(1)
    for name in ("student_entropy", "teacher_entropy"):
        assert torch.equal(
            importance(SIGNALS.get(name), s, t, y, valid, temperature=3.0),
            importance(SIGNALS.get(name), s, t, y, valid),
        )
    kl1 = importance(SIGNALS.get("kl"), s, t, y, valid)
    kl3 = importance(SIGNALS.get("kl"), s, t, y, valid, temperature=3.0)
    assert not torch.allclose(kl1[valid], kl3[valid])


@pytest.mark.parametrize("how", ["zscore", "minmax"])
@pytest.mark.parametrize("name", sorted(TERMS))
def test_combined_signal_normalizes_each_term_per_sequence(name, how):
    s, t, y, valid = batch(2)
    u = importance(SIGNALS.get(name), s, t, y, valid, normalization=how)
    expect = np.zeros((B, T))
    for fn in TERMS[name]:
        x = reference_u(fn, s, t, y, valid, 1.0)
        for b in range(B):
            v = valid[b].numpy()
            if not v.any():
                continue
            xv = x[b, v]
            if how == "zscore":
                x[b, v] = (xv - xv.mean()) / max(xv.std(), 1e-6)
            else:
                x[b, v] = (xv - xv.min()) / max(xv.max() - xv.min(), 1e-6)
        expect += np.where(valid.numpy(), x, 0.0)
    np.testing.assert_allclose(u[valid].double().numpy(), expect[valid.numpy()], rtol=1e-4, atol=1e-5)
    if how == "minmax":  # each term in [0, 1]
        assert u[valid].min() >= -1e-6 and u[valid].max() <= len(TERMS[name]) + 1e-6


def test_plain_sum_is_the_default():
    s, t, y, valid = batch(3)
    sig = SIGNALS.get("kl_plus_student_entropy")
    both = importance(sig, s, t, y, valid)
    parts = importance(SIGNALS.get("kl"), s, t, y, valid) + importance(SIGNALS.get("student_entropy"), s, t, y, valid)
    torch.testing.assert_close(both[valid], parts[valid])


def test_ce_ratio_plus_entropy_scales_entropy_by_log_vocab():
    """The paper's form adds H(q_t) / ln|V| (in [0, 1]); the _unscaled variant adds H(q_t)."""
    s, t, y, valid = batch(5)
    ratio = importance(SIGNALS.get("ce_ratio"), s, t, y, valid)[valid]
    ent = importance(SIGNALS.get("student_entropy"), s, t, y, valid)[valid]
    paper = importance(SIGNALS.get("ce_ratio_plus_student_entropy"), s, t, y, valid)[valid]
    plain = importance(SIGNALS.get("ce_ratio_plus_student_entropy_unscaled"), s, t, y, valid)[valid]
    torch.testing.assert_close(paper - ratio, ent / math.log(V))
    torch.testing.assert_close(plain - ratio, ent)
    assert ((paper - ratio) <= 1 + 1e-6).all()


@pytest.mark.parametrize("name", ["ce_ratio_plus_student_entropy", "ce_ratio_plus_student_entropy_unscaled"])
@pytest.mark.parametrize("chunk_size", [1, 4, 1000])
def test_ce_ratio_plus_entropy_chunked_equals_dense(name, chunk_size):
    """The chunked flow scores chunks of positions; |V| is the head's cut vocabulary in every chunk."""
    from sekd.kd.flows import Head, chunked_importance
    from sekd.kd.objective import Selector
    from sekd.selection.criteria import forward_kl
    from sekd.selection.policies import POLICIES

    g = torch.Generator().manual_seed(6)
    d, pad = 5, 3  # heads wider than V (Qwen-style padding rows), cut to V
    h_s, h_t = torch.randn(B, T, d, generator=g), torch.randn(B, T, d, generator=g)
    student = Head(torch.randn(V + pad, d, generator=g), torch.randn(V + pad, generator=g), V)
    teacher = Head(torch.randn(V + pad, d, generator=g), None, V)
    _, _, y, valid = batch(6)
    sel = Selector(SIGNALS.get(name), POLICIES.build("top_k", k=0.5), forward_kl)
    chunked = chunked_importance(
        sel, h_s, student, h_t, teacher, y, valid, generator=None, temperature=1.0, chunk_size=chunk_size
    )
    dense = importance(SIGNALS.get(name), student(h_s), teacher(h_t), y, valid)
    ref = reference_u(SIGNALS.get(name).reference, student(h_s).detach(), teacher(h_t), y, valid, 1.0)
    torch.testing.assert_close(chunked, dense)
    np.testing.assert_allclose(chunked[valid].double().numpy(), ref[valid.numpy()], rtol=1e-5, atol=1e-5)


def test_unknown_normalization_fails():
    s, t, y, valid = batch()
    with pytest.raises(ValueError, match="normalization"):
        importance(SIGNALS.get("student_entropy"), s, t, y, valid, normalization="softmax")


@pytest.mark.parametrize("name", [n for n in SIGNALS.names() if SIGNALS.get(n).needs_teacher])
def test_teacher_signals_need_teacher_logits(name):
    s, t, y, valid = batch()
    with pytest.raises(ValueError, match="teacher"):
        importance(SIGNALS.get(name), s, None, y, valid)


@pytest.mark.parametrize("name", [n for n in SIGNALS.names() if not SIGNALS.get(n).needs_teacher])
def test_teacher_free_signals_run_without_teacher(name):
    s, t, y, valid = batch()
    g = torch.Generator().manual_seed(0)
    with_t = importance(SIGNALS.get(name), s, t, y, valid, generator=g)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(with_t, importance(SIGNALS.get(name), s, None, y, valid, generator=g))


def test_random_signal_is_uniform_and_seeded():
    s, t, y, valid = batch()
    sig = SIGNALS.get("random")
    u1 = importance(sig, s, t, y, valid, generator=torch.Generator().manual_seed(7))
    u2 = importance(sig, s, t, y, valid, generator=torch.Generator().manual_seed(7))
    u3 = importance(sig, s, t, y, valid, generator=torch.Generator().manual_seed(8))
    assert torch.equal(u1, u2) and not torch.equal(u1[valid], u3[valid])
    assert ((u1[valid] >= 0) & (u1[valid] < 1)).all() and torch.isneginf(u1[~valid]).all()


def test_score_terms_on_flat_positions():
    s, t, y, valid = batch()
    r, c = valid.nonzero(as_tuple=True)
    x = importance_terms(SIGNALS.get("kl_plus_student_entropy"), s[r, c], t[r, c], y[r, c])
    assert x.shape == (2, r.numel())
    torch.testing.assert_close(x.sum(0), importance(SIGNALS.get("kl_plus_student_entropy"), s, t, y, valid)[valid])


# ---- contract over every registry entry -----------------------------------------------------


@pytest.mark.parametrize("normalization", ["sum", "zscore", "minmax"])
@pytest.mark.parametrize("name", SIGNALS.names())
def test_signal_contract(name, normalization):
    s, t, y, valid = batch(4)
    s.requires_grad_(True)
    sig = SIGNALS.get(name)
    run = lambda seed: importance(
        sig,
        s,
        t,
        y,
        valid,
        generator=torch.Generator().manual_seed(seed),  # noqa: E731
        normalization=normalization,
        temperature=1.5,
    )
    u = run(0)
    assert u.shape == (B, T) and u.dtype == torch.float32 and not u.requires_grad
    assert torch.isfinite(u[valid]).all() and torch.isneginf(u[~valid]).all()
    assert torch.equal(u, run(0))  # deterministic under a seeded generator
