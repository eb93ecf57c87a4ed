"""Selection through the objective: k = 1 equals Full KD, Pos RS-KD(*) estimators are unbiased,
weighted KD, the signal's temperature, and a stateful policy's checkpoint."""

from __future__ import annotations

import pytest
import torch

from sekd.kd.objective import LossInputs, Selector, selective_kd_loss
from sekd.selection.criteria import CRITERIA
from sekd.selection.policies import POLICIES, Draws
from sekd.selection.signals import SIGNALS, importance

IGNORE = -100
B, T, V = 3, 10, 8
R = 4000  # Monte Carlo draws


def batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(B, T, V, generator=g) * 2
    t = torch.randn(B, T, V, generator=g) * 2
    y = torch.randint(0, V, (B, T), generator=g)
    y[0, :3] = IGNORE
    y[2, [1, 5, 6]] = IGNORE
    return s, t, y


def sel(policy: str, signal: str | None = "student_entropy", criterion: str = "forward_kl", **opts) -> Selector:
    return Selector(SIGNALS.get(signal) if signal else None, POLICIES.build(policy, **opts), CRITERIA.get(criterion))


def loss(s, t, y, selector, temperature=1.0, lam=1.0, generator=None, **kw):
    out = selective_kd_loss(s, t, y, LossInputs(selector, lam=lam, temperature=temperature, generator=generator, **kw))
    return out.loss_sum / out.weight


# ---- k = 1 is Full KD -------------------------------------------------------------------------


@pytest.mark.parametrize("signal", SIGNALS.names())
@pytest.mark.parametrize("normalization", ["per_sequence", "batch_tokens"])
def test_top_k_with_k_1_is_full_kd_exactly(signal, normalization):
    s, t, y = batch(1)
    full = loss(s, t, y, sel("all", None), normalization=normalization)
    g = torch.Generator().manual_seed(0)
    for policy in ("top_k", "curriculum", "random"):
        got = loss(s, t, y, sel(policy, signal, k=1.0), generator=g, normalization=normalization)
        assert torch.equal(got, full), policy


# ---- estimators -------------------------------------------------------------------------------


def tiled(s, t, y):
    """The batch repeated R times: one call of the policy gives R independent draws."""
    return s.repeat(R, 1, 1), t.repeat(R, 1, 1), y.repeat(R, 1)


def monte_carlo(s, t, y, policy, temperature=1.0, **opts):
    """Mean and standard error over R draws of the per-batch loss, and the objective's own mean."""
    S_, T_, Y_ = tiled(s, t, y)
    out = selective_kd_loss(
        S_,
        T_,
        Y_,
        LossInputs(sel(policy, **opts), lam=1.0, temperature=temperature, generator=torch.Generator().manual_seed(123)),
    )
    mean_obj = (out.loss_sum / out.weight).item()
    # per-draw batch losses, from the same draws: L_i = sum_j w_j l(t_j) / K_i, batch = mean_i L_i
    valid = Y_ != IGNORE
    rows, cols = valid.nonzero(as_tuple=True)
    ell = torch.zeros(Y_.shape)
    ell[rows, cols] = temperature**2 * CRITERIA.get("forward_kl")(
        S_[rows, cols], T_[rows, cols], Y_[rows, cols], temperature=temperature
    )
    L_i = (out.draws.dense(T) * ell).sum(-1) / out.draws.count()
    per_draw = L_i.view(R, B).double().mean(-1)
    assert per_draw.mean().item() == pytest.approx(mean_obj, rel=1e-4)
    return mean_obj, per_draw.std().item() / R**0.5


def weighted_kd(s, t, y, signal="student_entropy", power=1.0, temperature=1.0):
    """sum_t w_t l(t) / sum_t w_t per sequence, w = u^power, averaged over sequences (float64)."""
    valid = y != IGNORE
    u = importance(SIGNALS.get(signal), s, t, y, valid).double().masked_fill(~valid, 0.0).clamp_min(0) ** power
    rows, cols = valid.nonzero(as_tuple=True)
    ell = torch.zeros(B, T, dtype=torch.float64)
    ell[rows, cols] = (
        temperature**2
        * CRITERIA.get("forward_kl")(s[rows, cols], t[rows, cols], y[rows, cols], temperature=temperature).double()
    )
    return ((u * ell).sum(-1) / u.sum(-1)).mean().item()


SAMPLING_OPTS = [
    {"k": 0.25},
    {"k": 0.25, "tau": 2.0},
    {"k": 0.5, "coverage": 0.5},
    {"k": 0.5, "tau": 0.5, "coverage": 0.3},
]


@pytest.mark.parametrize("opts", SAMPLING_OPTS)
def test_pos_rs_is_unbiased_for_weighted_kd(opts):
    s, t, y = batch(2)
    mean, se = monte_carlo(s, t, y, "pos_rs", **opts)
    target = weighted_kd(s, t, y, power=1.0 / opts.get("tau", 1.0))
    assert abs(mean - target) < 4 * se, (mean, target, se)


@pytest.mark.parametrize(
    "signal, opts",
    [("student_entropy", o) for o in SAMPLING_OPTS] + [("teacher_ce", {"k": 0.25, "tau": 2.0, "coverage": 0.5})],
)
def test_pos_rs_star_is_unbiased_for_full_kd(signal, opts):
    s, t, y = batch(3)
    full = loss(s, t, y, sel("all", None)).item()
    mean, se = monte_carlo(s, t, y, "pos_rs_star", signal=signal, **opts)
    assert abs(mean - full) < 4 * se + 1e-6 * abs(full), (mean, full, se)  # l = u: a zero-variance case


def test_the_estimator_tests_can_fail():
    """Pos RS-KD (not *) targets weighted KD, which differs from Full KD by many standard errors here."""
    s, t, y = batch(3)
    full = loss(s, t, y, sel("all", None)).item()
    mean, se = monte_carlo(s, t, y, "pos_rs", signal="kl", k=0.25)
    assert abs(mean - full) > 4 * se


def test_pos_rs_at_temperature_2():
    s, t, y = batch(4)
    mean, se = monte_carlo(s, t, y, "pos_rs", k=0.25, temperature=2.0)
    assert abs(mean - weighted_kd(s, t, y, temperature=2.0)) < 4 * se


# ---- weighted KD through the objective -------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_weighted_criterion_with_all_positions_is_weighted_kd(temperature):
    s, t, y = batch(5)
    got = loss(s, t, y, sel("all", "student_entropy", "weighted"), temperature=temperature).item()
    assert got == pytest.approx(weighted_kd(s, t, y, temperature=temperature), rel=1e-5)


def test_weighted_criterion_over_top_k_positions():
    s, t, y = batch(6)
    selector = sel("top_k", "kl", "weighted", k=0.5)
    out = selective_kd_loss(s, t, y, LossInputs(selector, lam=1.0, temperature=1.0))
    m = out.draws.dense(T)  # unit weights on the selected positions
    valid = y != IGNORE
    rows, cols = valid.nonzero(as_tuple=True)
    kl = torch.zeros(B, T, dtype=torch.float64)
    kl[rows, cols] = CRITERIA.get("forward_kl")(s[rows, cols], t[rows, cols], y[rows, cols]).double()
    w = out.u.double().masked_fill(~valid, 0.0) * m
    expect = ((w * kl).sum(-1) / w.sum(-1)).mean().item()
    assert (out.loss_sum / out.weight).item() == pytest.approx(expect, rel=1e-5)


# ---- the signal's temperature, stateful policies ----------------------------------------------


def test_objective_scores_at_the_kd_temperature():
    s, t, y = batch(7)
    out = selective_kd_loss(s, t, y, LossInputs(sel("top_k", "kl", k=0.3), lam=1.0, temperature=2.0))
    valid = y != IGNORE
    assert torch.equal(out.u, importance(SIGNALS.get("kl"), s, t, y, valid, temperature=2.0))
    assert not torch.equal(out.u, importance(SIGNALS.get("kl"), s, t, y, valid))


def test_gls_state_round_trips_through_the_selector():
    a = sel("gls", k=0.3, Q=30)
    for seed in range(3):
        s, t, y = batch(10 + seed)
        selective_kd_loss(s, t, y, LossInputs(a, lam=1.0, temperature=1.0))
    b = sel("gls", k=0.3, Q=30)
    b.load_state_dict(a.state_dict())
    s, t, y = batch(20)
    la, lb = loss(s, t, y, a), loss(s, t, y, b)
    assert torch.equal(la, lb)
    assert sel("top_k", k=0.3).state_dict() == {}


def test_draws_with_zero_weight_rows_drop_out():
    """A sequence GLS gives no position carries no weight in L."""
    s, t, y = batch(8)

    def first_row_only(u, valid, *, generator=None, step=0):
        m = valid.clone()
        m[1:] = False
        return Draws.from_mask(m)

    out = selective_kd_loss(
        s, t, y, LossInputs(Selector(None, first_row_only, CRITERIA.get("forward_kl")), lam=1.0, temperature=1.0)
    )
    assert out.weight == 1.0
