"""The class axis: sparse targets, RS-KD's unbiased gradient, truncation, and the objective with them."""

import pytest
import torch

from sekd.core.registry import RegistryError
from sekd.kd.objective import IGNORE, LossInputs, Selector, selective_kd_loss
from sekd.selection.classes import CLASSES, SparseTarget, build_classes, rs_kd, sparse_forward_kl, top_k_truncation
from sekd.selection.criteria import forward_kl
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
    assert set(CLASSES.names()) == {"rs_kd", "top_k_truncation", "top_p"}
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
