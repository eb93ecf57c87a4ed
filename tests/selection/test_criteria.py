"""Alignment criteria D: hand-computed cases, float64 references, and a contract over CRITERIA."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sekd.selection.criteria import CRITERIA, nckd, tckd

LN = math.log


def logits_of(*probs: list[float]) -> torch.Tensor:
    """Logits whose softmax is each given distribution.  -> [N,V]"""
    return torch.tensor(probs, dtype=torch.float64).log().float()


def flat(N=12, V=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(N, V, generator=g) * 2
    t = torch.randn(N, V, generator=g) * 2
    y = torch.randint(0, V, (N,), generator=g)
    row = torch.arange(N) % 3
    u = torch.rand(N, generator=g) + 0.1
    return s, t, y, row, u


# ---- float64 references (written from the papers' definitions) -------------------------------


def softmax64(z, T=1.0):
    z = np.asarray(z, dtype=np.float64) / T
    e = np.exp(z - z.max())
    return e / e.sum()


def kl64(p, q):
    p, q = np.asarray(p), np.asarray(q)
    nz = p > 0
    return float((p[nz] * np.log(p[nz] / q[nz])).sum())


def tckd64(s, t, y, T=1.0):
    p, q = softmax64(t, T), softmax64(s, T)
    return kl64([p[y], 1 - p[y]], [q[y], 1 - q[y]])


def nckd64(s, t, y, T=1.0):
    p, q = softmax64(t, T), softmax64(s, T)
    keep = np.arange(len(p)) != y
    return kl64(p[keep] / p[keep].sum(), q[keep] / q[keep].sum())


def dkd_paper64(s, t, y, T, alpha, beta):
    """Zhao et al.'s reference code (cat_mask + the -1000 gt mask), per position, without T^2."""
    s, t = np.asarray(s, dtype=np.float64), np.asarray(t, dtype=np.float64)
    gt = np.zeros_like(s)
    gt[y] = 1.0
    ps, pt = softmax64(s, T), softmax64(t, T)
    bs = np.array([(ps * gt).sum(), (ps * (1 - gt)).sum()])
    bt = np.array([(pt * gt).sum(), (pt * (1 - gt)).sum()])
    tck = float((bt * (np.log(bt) - np.log(bs))).sum())
    pt2 = softmax64(t / T - 1000.0 * gt)
    z2 = s / T - 1000.0 * gt
    ls2 = z2 - z2.max() - np.log(np.exp(z2 - z2.max()).sum())  # log_softmax
    nz = pt2 > 0
    nck = float((pt2[nz] * (np.log(pt2[nz]) - ls2[nz])).sum())
    return alpha * tck + beta * nck


# ---- forward / reverse KL ---------------------------------------------------------------------


def test_kl_by_hand_v3():
    q = [0.5, 0.25, 0.25]  # student
    p = [0.8, 0.1, 0.1]  # teacher
    s, t, y = logits_of(q), logits_of(p), torch.tensor([0])
    fwd = 0.8 * LN(0.8 / 0.5) + 2 * 0.1 * LN(0.1 / 0.25)
    rev = 0.5 * LN(0.5 / 0.8) + 2 * 0.25 * LN(0.25 / 0.1)
    assert CRITERIA.get("forward_kl")(s, t, y).item() == pytest.approx(fwd, abs=1e-6)
    assert CRITERIA.get("reverse_kl")(s, t, y).item() == pytest.approx(rev, abs=1e-6)
    assert fwd != pytest.approx(rev, abs=1e-2)  # the case tells them apart


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_kl_matches_float64_with_temperature_and_no_t_squared(temperature):
    s, t, y, _, _ = flat()
    fwd = CRITERIA.get("forward_kl")(s, t, y, temperature=temperature)
    rev = CRITERIA.get("reverse_kl")(s, t, y, temperature=temperature)
    for i in range(len(y)):
        p, q = softmax64(t[i].numpy(), temperature), softmax64(s[i].numpy(), temperature)
        assert fwd[i].item() == pytest.approx(kl64(p, q), rel=1e-4, abs=1e-6)
        assert rev[i].item() == pytest.approx(kl64(q, p), rel=1e-4, abs=1e-6)


# ---- DKD ----------------------------------------------------------------------------------


def test_dkd_by_hand_v4():
    p = [0.4, 0.3, 0.2, 0.1]
    q = [0.25, 0.25, 0.25, 0.25]
    s, t, y = logits_of(q), logits_of(p), torch.tensor([0])
    tc = 0.4 * LN(0.4 / 0.25) + 0.6 * LN(0.6 / 0.75)
    nc = 0.5 * LN(0.5 / (1 / 3)) + (1 / 3) * LN(1.0) + (1 / 6) * LN((1 / 6) / (1 / 3))
    assert tckd(s, t, y).item() == pytest.approx(tc, abs=1e-6)
    assert nckd(s, t, y).item() == pytest.approx(nc, abs=1e-6)
    assert CRITERIA.get("dkd")(s, t, y).item() == pytest.approx(tc + 8 * nc, abs=1e-5)
    assert CRITERIA.get("dkd")(s, t, y, alpha=2.0, beta=0.5).item() == pytest.approx(2 * tc + 0.5 * nc, abs=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_dkd_matches_the_papers_reference_code(temperature):
    s, t, y, _, _ = flat(seed=1)
    d = CRITERIA.get("dkd")(s, t, y, temperature=temperature)
    for i in range(len(y)):
        ref = dkd_paper64(s[i].numpy(), t[i].numpy(), int(y[i]), temperature, 1.0, 8.0)
        assert d[i].item() == pytest.approx(ref, rel=1e-4, abs=1e-5)
        assert tckd(s[i : i + 1], t[i : i + 1], y[i : i + 1], temperature).item() == pytest.approx(
            tckd64(s[i].numpy(), t[i].numpy(), int(y[i]), temperature), rel=1e-4, abs=1e-6
        )


def test_kl_decomposes_into_tckd_and_nckd():
    """KL = TCKD + (1 - p_t(y)) NCKD (Zhao et al. 2022, eq. 4)."""
    s, t, y, _, _ = flat(seed=2)
    p_y = torch.softmax(t, -1).gather(1, y[:, None]).squeeze(1)
    torch.testing.assert_close(
        tckd(s, t, y) + (1 - p_y) * nckd(s, t, y), CRITERIA.get("forward_kl")(s, t, y), rtol=1e-4, atol=1e-5
    )


# ---- AT-KD --------------------------------------------------------------------------------


def atkd64(s, t, y, hard_fraction=0.5, easy_weight=0.2):
    """(0.2 sum_easy NCKD + 0.8 sum_hard (TCKD + NCKD)) / P, hard = top ceil(P/2) by 1 - p_t(y)."""
    P = len(y)
    u = [1 - softmax64(t[i])[y[i]] for i in range(P)]
    hard = set(sorted(range(P), key=lambda i: (-u[i], i))[: max(1, math.ceil(hard_fraction * P))])
    total = 0.0
    for i in range(P):
        nc = nckd64(s[i], t[i], y[i])
        total += (1 - easy_weight) * (tckd64(s[i], t[i], y[i]) + nc) if i in hard else easy_weight * nc
    return total / P


def test_atkd_by_hand_v3():
    """Two positions: the teacher is sure of the target at the first (easy), unsure at the second (hard)."""
    q = [0.5, 0.25, 0.25]
    s = logits_of(q, q)
    t = logits_of([0.9, 0.05, 0.05], [0.2, 0.6, 0.2])
    y = torch.tensor([0, 0])
    nc_easy = 0.0  # non-target parts are both uniform
    tc_hard = 0.2 * LN(0.2 / 0.5) + 0.8 * LN(0.8 / 0.5)
    nc_hard = 0.75 * LN(0.75 / 0.5) + 0.25 * LN(0.25 / 0.5)
    D = CRITERIA.get("atkd")(s, t, y)
    assert D[0].item() == pytest.approx(0.2 * nc_easy, abs=1e-6)
    assert D[1].item() == pytest.approx(0.8 * (tc_hard + nc_hard), abs=1e-6)


@pytest.mark.parametrize("P", [1, 4, 5, 12])
def test_atkd_mean_is_the_spec_formula(P):
    s, t, y, _, _ = flat(N=P, seed=P)
    D = CRITERIA.get("atkd")(s, t, y)
    ref = atkd64(s.numpy(), t.numpy(), y.numpy())
    assert D.mean().item() == pytest.approx(ref, rel=1e-4, abs=1e-6)
    ref2 = atkd64(s.numpy(), t.numpy(), y.numpy(), hard_fraction=0.25, easy_weight=0.4)
    assert CRITERIA.get("atkd")(s, t, y, hard_fraction=0.25, easy_weight=0.4).mean().item() == pytest.approx(
        ref2, rel=1e-4, abs=1e-6
    )


# ---- weighted ----------------------------------------------------------------------------


def test_weighted_per_sequence_mean_is_the_weighted_average():
    s, t, y, row, u = flat(N=12)
    D = CRITERIA.get("weighted")(s, t, y, row=row, u=u)
    kl = CRITERIA.get("forward_kl")(s, t, y)
    for r in range(3):
        m = row == r
        expect = (u[m].double() * kl[m].double()).sum() / u[m].double().sum()
        assert D[m].double().mean().item() == pytest.approx(expect.item(), rel=1e-5)


def test_weighted_edge_cases():
    s, t, y, row, u = flat(N=6)
    kl = CRITERIA.get("forward_kl")(s, t, y)
    zero = torch.where(row == 0, torch.zeros_like(u), u)  # a sequence with all w = 0 -> plain mean
    D = CRITERIA.get("weighted")(s, t, y, row=row, u=zero)
    torch.testing.assert_close(D[row == 0], kl[row == 0])
    with pytest.raises(ValueError, match="signal"):
        CRITERIA.get("weighted")(s, t, y, row=row, u=None)
    with pytest.raises(ValueError, match=">= 0"):
        CRITERIA.get("weighted")(s, t, y, row=row, u=u - 5)
    D1 = CRITERIA.get("weighted")(s, t, y, u=u)  # no row: one sequence
    assert D1.mean().item() == pytest.approx(((u * kl).sum() / u.sum()).item(), rel=1e-5)


# ---- contract over every registry entry -----------------------------------------------------


@pytest.mark.parametrize("name", CRITERIA.names())
def test_criterion_contract(name):
    s, t, y, row, u = flat(N=10, V=7, seed=3)
    s = s.clone().requires_grad_(True)
    D = CRITERIA.get(name)(s, t, y, temperature=1.5, row=row, u=u)
    assert D.shape == (10,) and torch.isfinite(D).all() and (D >= -1e-5).all()
    D.sum().backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
    same = CRITERIA.get(name)(t, t, y, temperature=1.5, row=row, u=u)  # D(p, p) = 0
    assert same.abs().max() < 1e-5
    assert torch.equal(D.detach(), CRITERIA.get(name)(s.detach(), t, y, temperature=1.5, row=row, u=u))


@pytest.mark.parametrize("name", CRITERIA.names())
def test_criterion_dtypes(name):
    """Half-precision logits are computed in float32; float64 stays float64."""
    s, t, y, row, u = flat(N=6, V=5, seed=5)
    assert CRITERIA.get(name)(s.bfloat16(), t.bfloat16(), y, row=row, u=u).dtype == torch.float32
    d64 = CRITERIA.get(name)(s.double(), t.double(), y, row=row, u=u)
    assert d64.dtype == torch.float64
    torch.testing.assert_close(d64.float(), CRITERIA.get(name)(s, t, y, row=row, u=u), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", CRITERIA.names())
def test_criterion_is_finite_on_peaked_logits(name):
    """Probabilities that underflow to 0 in float32 must give finite values and gradients."""
    s, t, y, row, u = flat(N=8, V=6, seed=4)
    s = (s * 60).requires_grad_(True)
    t = t * 60
    D = CRITERIA.get(name)(s, t, y, row=row, u=u)
    D.sum().backward()
    assert torch.isfinite(D).all() and torch.isfinite(s.grad).all()


@pytest.mark.parametrize("name", ["forward_kl", "reverse_kl"])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_kl_closed_form_gradient_matches_float64_autograd(name, temperature):
    # forward and reverse KL return their gradient in the student's logits in closed form; the reference is
    # the dense formula in float64 traced by autograd. Teacher logits of -inf (classes a truncation removed)
    # give p = 0: 0 log 0 = 0 in the value, and no nan in the gradient.
    g = torch.Generator().manual_seed(7)
    s = (3 * torch.randn(6, 50, generator=g)).requires_grad_()
    t = 3 * torch.randn(6, 50, generator=g)
    if name == "forward_kl":
        t[:, :5] = float("-inf")
    w = torch.rand(6, generator=g)

    s64 = s.detach().double().requires_grad_()
    logq, logp = torch.log_softmax(s64 / temperature, -1), torch.log_softmax(t.double() / temperature, -1)
    if name == "forward_kl":
        ref = (logp.exp() * torch.where(logp.exp() > 0, logp - logq, 0.0)).sum(-1)
    else:
        ref = (logq.exp() * (logq - logp)).sum(-1)
    (ref_grad,) = torch.autograd.grad((w.double() * ref).sum(), s64)

    got = CRITERIA.get(name)(s, t, None, temperature=temperature)
    (got_grad,) = torch.autograd.grad((w * got).sum(), s)
    torch.testing.assert_close(got.double(), ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_grad.double(), ref_grad, rtol=1e-4, atol=1e-6)
    assert torch.isfinite(got_grad).all()


@pytest.mark.parametrize("name", ["forward_kl", "reverse_kl"])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_closed_form_declaration_matches_float64_autograd_with_ruled_out_classes(name, temperature):
    # what the chunked flow calls on its reused blocks: (s, t, T, scratch) -> (D, dD/ds), overwriting them.
    # The side whose KL weights the classes rules some out (logit -inf): 0 log 0 = 0, and no gradient there.
    g = torch.Generator().manual_seed(11)
    s, t = 3 * torch.randn(5, 40, generator=g), 3 * torch.randn(5, 40, generator=g)
    (t if name == "forward_kl" else s)[:2, :4] = float("-inf")
    s64 = s.double().requires_grad_()
    logq, logp = torch.log_softmax(s64 / temperature, -1), torch.log_softmax(t.double() / temperature, -1)
    a, b = (logp, logq) if name == "forward_kl" else (logq, logp)
    ref = (a.exp() * torch.where(a.exp() > 0, a - b, 0.0)).sum(-1)
    (ref_grad,) = torch.autograd.grad(ref.sum(), s64)
    ref_grad = ref_grad.nan_to_num(0.0)  # autograd's 0 * inf at the ruled-out classes: their gradient is 0

    D, grad = CRITERIA.get(name).closed_form(s.clone(), t.clone(), temperature, torch.empty_like(s))
    torch.testing.assert_close(D.double(), ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-4, atol=1e-6)


def test_kl_keeps_the_traced_path_for_a_teacher_with_gradients():
    s, t = torch.randn(3, 9, requires_grad=True), torch.randn(3, 9, requires_grad=True)
    (gs, gt) = torch.autograd.grad(CRITERIA.get("forward_kl")(s, t, None).sum(), (s, t))
    assert gt.abs().sum() > 0 and torch.isfinite(gs).all()
