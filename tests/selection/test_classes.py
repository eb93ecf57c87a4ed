"""The class axis: sparse targets, RS-KD's unbiased gradient, truncation, and the objective with them."""

import math

import pytest
import torch

from sekd.core.registry import RegistryError
from sekd.kd.objective import IGNORE, LossInputs, Selector, selective_kd_loss
from sekd.selection.classes import (
    CLASSES,
    SparseTarget,
    build_classes,
    rs_kd,
    rs_kd_tail,
    sparse_forward_kl,
    sparse_reverse_kl,
    student_top_k,
    top_k_tail,
    top_k_truncation,
    union_top_k,
)
from sekd.selection.criteria import CRITERIA, forward_kl, reverse_kl, sparse_divergence
from sekd.selection.policies import POLICIES


def logits(N=5, V=13, seed=0, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, V, generator=g, dtype=torch.float64) * scale


def test_sparse_kl_with_the_whole_distribution_is_forward_kl():
    s, t = logits(seed=1), logits(seed=2)
    N, V = t.shape
    full = SparseTarget(torch.arange(V).expand(N, V), torch.softmax(t / 1.5, -1), torch.ones(N, V, dtype=torch.bool))
    torch.testing.assert_close(sparse_forward_kl(s, full, 1.5), forward_kl(s, t, None, temperature=1.5))


def test_sparse_kl_against_a_float64_loop():
    s = logits(N=3, V=7, seed=3)
    ids = torch.tensor([[0, 4, 0], [2, 3, 6], [5, 0, 0]])
    probs = torch.tensor([[0.25, 0.75, 0.0], [0.5, 0.25, 0.25], [1.0, 0.0, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0]], dtype=torch.bool)
    got = sparse_forward_kl(s, SparseTarget(ids, probs, mask), 1.0)
    logq = torch.log_softmax(s, -1)
    want = [
        sum(float(probs[n, k]) * (torch.log(probs[n, k]) - logq[n, ids[n, k]]) for k in range(3) if mask[n, k])
        for n in range(3)
    ]
    torch.testing.assert_close(got, torch.stack(want))


@pytest.mark.parametrize("T", [1.0, 2.0])
def test_rs_kd_gradient_is_unbiased_for_full_kd(T):
    """Mean of the RS-KD loss gradient over many draws is within a few standard errors of Full KD's."""
    s, t = logits(N=4, V=9, seed=4), logits(N=4, V=9, seed=5)
    s = s.requires_grad_()
    (g_full,) = torch.autograd.grad(forward_kl(s, t, None, temperature=T).sum(), s)
    gen = torch.Generator().manual_seed(0)
    grads = []
    for _ in range(3000):
        target = rs_kd(t, n_draws=12, temperature=T, generator=gen)
        (g,) = torch.autograd.grad(sparse_forward_kl(s, target, T).sum(), s)
        grads.append(g)
    G = torch.stack(grads)
    mean, se = G.mean(0), G.std(0) / len(grads) ** 0.5
    assert ((mean - g_full).abs() <= 4 * se + 1e-9).all()
    # and it is not trivially so: one draw is far from the full gradient
    assert (G[0] - g_full).abs().max() > 10 * se.max()


def test_rs_kd_targets_are_distinct_draw_counts():
    t = logits(N=6, V=11, seed=6)
    target = rs_kd(t, n_draws=64, generator=torch.Generator().manual_seed(1))
    for n in range(6):
        ids = target.ids[n][target.mask[n]]
        assert len(set(ids.tolist())) == len(ids)  # only distinct draws
        counts = target.probs[n][target.mask[n]] * 64
        torch.testing.assert_close(counts, counts.round())
        assert counts.sum().item() == pytest.approx(64)


def test_top_k_truncation_renormalizes_the_teachers_top_classes():
    t = logits(N=3, V=10, seed=7)
    target = top_k_truncation(t, top=4)
    p = torch.softmax(t, -1)
    top = p.topk(4, -1)
    torch.testing.assert_close(target.ids, top.indices)
    torch.testing.assert_close(target.probs, top.values / top.values.sum(-1, keepdim=True))


def test_registry_and_full():
    assert set(CLASSES.names()) == {
        "rs_kd",
        "rs_kd_tail",
        "top_k_truncation",
        "top_k_tail",
        "top_p",
        "student_top_k",
        "union_top_k",
    }
    assert build_classes("full") is None
    with pytest.raises(ValueError, match="n_draw"):
        build_classes("rs_kd", n_draw=3)


def test_objective_with_cached_targets_equals_online_targets():
    """Targets handed in for every valid position (the cache's form) give the loss the same draws give
    when drawn inside the objective at those positions."""
    g = torch.Generator().manual_seed(8)
    B, T, V = 2, 6, 9
    s = torch.randn(B, T, V, generator=g, dtype=torch.float64)
    t = torch.randn(B, T, V, generator=g, dtype=torch.float64)
    y = torch.randint(0, V, (B, T), generator=g)
    y[0, 2] = y[1, 5] = IGNORE
    valid = y != IGNORE
    truncation = build_classes("top_k_truncation", top=3)  # deterministic, so both paths see one target
    sel = Selector(signal=None, policy=POLICIES.build("all"), criterion=forward_kl, classes=truncation)
    online = selective_kd_loss(s, t, y, LossInputs(sel, lam=1.0, temperature=1.0))
    cached = truncation(t[valid])  # row-major valid positions, as TeacherCache.targets returns them
    offline = selective_kd_loss(s, None, y, LossInputs(sel, lam=1.0, temperature=1.0, cached=cached))
    torch.testing.assert_close(online.loss_sum, offline.loss_sum)


def test_raw_truncation_keeps_the_teachers_probabilities_and_drops_the_rest():
    t = logits(5, 11, seed=4)
    raw = CLASSES.build("top_k_truncation", top=3, normalization="raw")(t, temperature=2.0)
    renormalized = CLASSES.build("top_k_truncation", top=3)(t, temperature=2.0)
    p = torch.softmax(t / 2.0, -1)
    assert torch.equal(raw.ids, renormalized.ids)
    torch.testing.assert_close(raw.probs, p.gather(1, raw.ids), rtol=0, atol=1e-12)
    assert (raw.probs.sum(-1) < 1).all() and torch.allclose(renormalized.probs.sum(-1), torch.ones(5, dtype=t.dtype))
    with pytest.raises(RegistryError, match="normalization='sum' must be one of: renormalized, raw"):
        CLASSES.build("top_k_truncation", normalization="sum")


def test_top_p_takes_the_fewest_classes_holding_p_and_is_capped():
    probs = torch.tensor(
        [[0.5, 0.3, 0.15, 0.05], [0.97, 0.01, 0.01, 0.01], [0.25, 0.25, 0.25, 0.25]], dtype=torch.float64
    )
    t = probs.log()
    target = CLASSES.build("top_p", p=0.8, max_k=3)(t)
    assert target.mask.sum(-1).tolist() == [2, 1, 3]  # 0.5 + 0.3 reaches 0.8; 0.97 alone; the cap at 3
    torch.testing.assert_close(target.probs[0, :2], torch.tensor([0.625, 0.375], dtype=torch.float64))
    assert target.probs.masked_fill(~target.mask, 0).sum(-1).allclose(torch.ones(3, dtype=torch.float64))


# ---- tails, the student's supports, and the reverse KL on a sparse target -------------------------


def coarsened(logits64: torch.Tensor, keep: torch.Tensor, T: float) -> torch.Tensor:
    """softmax(z / T) on the kept classes and one more column, the rest's mass: a plain float64 loop."""
    out = torch.zeros(logits64.shape[0], int(keep.sum(-1).max()) + 1, dtype=torch.float64)
    for n in range(logits64.shape[0]):
        p = [float(x) for x in torch.softmax(logits64[n] / T, -1)]
        kept = [p[v] for v in range(len(p)) if keep[n, v]]
        out[n, : len(kept)] = torch.tensor(kept)
        out[n, -1] = sum(p[v] for v in range(len(p)) if not keep[n, v])
    return out


def kl64(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    rows = [sum(float(a) * (math.log(a) - math.log(b)) for a, b in zip(pr, qr) if a > 0) for pr, qr in zip(p, q)]
    return torch.tensor(rows, dtype=torch.float64)


@pytest.mark.parametrize("T", [1.0, 1.7])
def test_tail_forward_and_reverse_kl_are_the_kl_of_the_coarsened_distributions(T):
    """top_k_tail: the teacher's top k and one ghost class against the student's mass on them and off them."""
    s, t = logits(N=4, V=9, seed=11), logits(N=4, V=9, seed=12)
    target = top_k_tail(t, top=3, temperature=T)
    keep = torch.zeros_like(t, dtype=torch.bool).scatter_(1, target.ids, True)
    # the kept classes in ascending id order on both sides: the KL does not depend on the order
    p, q = coarsened(t, keep, T), coarsened(s, keep, T)
    torch.testing.assert_close(target.tail, p[:, -1])
    torch.testing.assert_close(sparse_forward_kl(s, target, T), kl64(p, q))
    torch.testing.assert_close(sparse_reverse_kl(s, target, T), kl64(q, p))


def test_tail_divergences_have_the_coarsened_gradient():
    s, t = logits(N=3, V=8, seed=13).requires_grad_(), logits(N=3, V=8, seed=14)
    target = top_k_tail(t, top=2)
    keep = torch.zeros_like(t, dtype=torch.bool).scatter_(1, target.ids, True)
    for sparse, reference in [
        (sparse_forward_kl, lambda p, q: (p * (p.log() - q.log())).sum(-1)),
        (sparse_reverse_kl, lambda p, q: (q * (q.log() - p.log())).sum(-1)),
    ]:
        (got,) = torch.autograd.grad(sparse(s, target, 1.0).sum(), s)
        q_all = torch.softmax(s, -1)
        q = torch.cat([q_all[keep].view(3, 2), q_all.masked_fill(keep, 0).sum(-1, keepdim=True)], 1)
        p = coarsened(t, keep, 1.0)
        (want,) = torch.autograd.grad(reference(p, q).sum(), s)
        torch.testing.assert_close(got, want)


def test_reverse_kl_on_a_renormalized_target_renormalizes_the_student_too():
    s, t = logits(N=3, V=10, seed=15), logits(N=3, V=10, seed=16)
    target = top_k_truncation(t, top=4)
    q = torch.softmax(s.gather(1, target.ids), -1)
    torch.testing.assert_close(sparse_reverse_kl(s, target), kl64(q, target.probs))
    assert (sparse_reverse_kl(s, target) >= 0).all()
    full = top_k_truncation(t, top=10)  # the whole vocabulary: the dense reverse KL
    torch.testing.assert_close(sparse_reverse_kl(s, full), reverse_kl(s, t, None))


@pytest.mark.parametrize("classes,form", [("rs_kd", "draws"), ("rs_kd_tail", "draws")])
def test_reverse_kl_refuses_random_and_raw_targets_in_one_line(classes, form):
    for name, opts, f in [(classes, {}, form), ("top_k_truncation", {"normalization": "raw"}, "raw")]:
        sampler = CLASSES.build(name, **opts)
        assert sampler.form_of() == f
        with pytest.raises(
            ValueError, match=rf"^criterion 'reverse_kl' cannot use {f} targets .*; it takes: renormalized, tail$"
        ):
            sparse_divergence(CRITERIA.get("reverse_kl"), f"classes {name!r}", sampler.form_of())
    sparse_divergence(CRITERIA.get("forward_kl"), "x", "raw")  # forward KL takes every form


def test_rs_kd_tail_keeps_the_head_exactly_and_draws_only_from_the_rest():
    t = logits(N=5, V=12, seed=17)
    target = rs_kd_tail(t, top=3, n_draws=8, generator=torch.Generator().manual_seed(0))
    p = torch.softmax(t, -1)
    head = p.topk(3, -1)
    torch.testing.assert_close(target.ids[:, :3], head.indices)
    torch.testing.assert_close(target.probs[:, :3], head.values)
    drawn = target.ids[:, 3:][target.mask[:, 3:]]
    assert not (target.ids[:, 3:].unsqueeze(-1) == head.indices.unsqueeze(1)).any(-1)[target.mask[:, 3:]].any()
    assert drawn.numel() > 0
    torch.testing.assert_close(target.probs.sum(-1), torch.ones(5, dtype=torch.float64))  # head + tail's mass
    every = rs_kd_tail(t, top=12, n_draws=4, generator=torch.Generator().manual_seed(0))  # no tail left
    torch.testing.assert_close((every.probs * every.mask).sum(-1), torch.ones(5, dtype=torch.float64))


def test_student_supports_follow_the_student_and_union_has_no_repeats():
    s, t = logits(N=4, V=11, seed=18), logits(N=4, V=11, seed=19)
    mine = student_top_k(t, student=s, top=3)
    torch.testing.assert_close(mine.ids, s.topk(3, -1).indices)
    p = torch.softmax(t, -1).gather(1, mine.ids)
    torch.testing.assert_close(mine.probs, p / p.sum(-1, keepdim=True))
    both = union_top_k(t, student=s, top=3)
    for n in range(4):
        ids = both.ids[n][both.mask[n]].tolist()
        assert len(ids) == len(set(ids)) and set(ids) == set(t[n].topk(3).indices.tolist()) | set(
            s[n].topk(3).indices.tolist()
        )
    with pytest.raises(ValueError, match="chooses classes by the student: it needs its logits"):
        CLASSES.build("student_top_k", top=3)(t, temperature=1.0)
