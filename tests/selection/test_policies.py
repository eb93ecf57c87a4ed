"""Selection policies: exact counts, ties, GLS's queue, curriculum windows, sampling, and a contract
over every POLICIES entry. Estimator expectations live in tests/kd/test_objective_selection.py."""

from __future__ import annotations

import io
import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from sekd.core.registry import RegistryError
from sekd.selection.policies import GLS, POLICIES, Draws, n_select

OPTIONS = {n: dict(POLICIES.get(n).example) for n in POLICIES.names()}  # declared where each is registered


def scores(B=4, T=20, seed=0, invalid=((0, slice(0, 5)), (1, slice(10, 20)), (3, slice(0, 20)))):
    """u >= 0 [B,T] with -inf where invalid, and the valid mask."""
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(B, T, generator=g) * 3
    valid = torch.ones(B, T, dtype=torch.bool)
    for b, sl in invalid:
        if b < B:
            valid[b, sl] = False
    return u.masked_fill(~valid, float("-inf")), valid


def selected(d: Draws, b: int) -> list[int]:
    return d.index[b][d.mask[b]].tolist()


def expected_n(k: float, n_valid: int) -> int:
    """ceil(k * n_valid) in exact arithmetic, at least 1 when n_valid >= 1."""
    return 0 if n_valid == 0 else max(1, math.ceil(Fraction(str(k)) * n_valid))


# ---- contract over every registry entry -----------------------------------------------------


def test_every_policy_declares_example_options_that_build():
    for name, options in OPTIONS.items():  # a policy with required options must declare an example
        assert POLICIES.build(name, **options).name == name


@pytest.mark.parametrize("name", POLICIES.names())
def test_policy_contract(name):
    u, valid = scores()
    B, T = u.shape
    outs = []
    for _ in range(2):  # fresh policy, same seed -> same draws (two calls, so GLS uses its queue)
        policy, g = POLICIES.build(name, **OPTIONS[name]), torch.Generator().manual_seed(3)
        outs.append([policy(u, valid, generator=g, step=s) for s in (0, 5)])
    for d, d2 in zip(*outs):
        assert isinstance(d, Draws)
        K = d.index.shape[1]
        assert d.index.shape == d.weight.shape == d.mask.shape == (B, K)
        assert d.index.dtype == torch.long and d.mask.dtype == torch.bool
        assert ((d.index >= 0) & (d.index < T)).all()
        assert valid.gather(1, d.index)[d.mask].all()  # only valid positions
        assert torch.isfinite(d.weight[d.mask]).all() and (d.weight[d.mask] > 0).all()
        assert not d.mask[3].any()  # a row without valid positions draws nothing
        assert (d.mask.long().diff(dim=-1) <= 0).all()  # draws packed left, padding at the end
        assert d.dense(T).shape == (B, T)
        for a, b in zip((d.index, d.weight, d.mask), (d2.index, d2.weight, d2.mask)):
            assert torch.equal(a, b)


@pytest.mark.parametrize("name", [n for n in POLICIES.names() if n != "all"])
def test_policy_rejects_bad_budget_and_unknown_options(name):
    u, valid = scores()
    with pytest.raises(ValueError, match="k="):
        POLICIES.build(name, **{**OPTIONS[name], "k": 1.5})(u, valid)
    with pytest.raises(RegistryError, match="kk"):
        POLICIES.build(name, **OPTIONS[name], kk=1)


# ---- top_k -------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [0.0025, 0.01, 0.07, 0.2, 0.25, 0.33, 0.5, 0.7, 1.0])
@pytest.mark.parametrize("n_valid", [0, 1, 3, 100, 400, 401, 512])
def test_top_k_counts(k, n_valid):
    T = 512
    valid = torch.zeros(1, T, dtype=torch.bool)
    valid[0, T - n_valid :] = True  # invalid prefix (e.g. a prompt)
    u = torch.rand(1, T, generator=torch.Generator().manual_seed(n_valid)).masked_fill(~valid, float("-inf"))
    d = POLICIES.build("top_k", k=k)(u, valid)
    assert int(d.count()[0]) == expected_n(k, n_valid) == int(n_select(valid, k)[0])
    assert len(set(selected(d, 0))) == expected_n(k, n_valid)


def test_top_k_fractional_budgets_by_hand():
    assert n_select(torch.ones(1, 100, dtype=torch.bool), 0.33).item() == 33
    assert n_select(torch.ones(1, 100, dtype=torch.bool), 0.07).item() == 7  # not 8 from 7.000000000000001
    assert n_select(torch.ones(1, 50, dtype=torch.bool), 0.14).item() == 7  # not 8 from 7.000000000000001
    assert n_select(torch.ones(1, 512, dtype=torch.bool), 0.0025).item() == 2  # ceil(1.28)
    assert n_select(torch.ones(1, 400, dtype=torch.bool), 0.0025).item() == 1
    assert n_select(torch.ones(1, 10, dtype=torch.bool), 0.0025).item() == 1  # at least 1


def test_top_k_takes_the_largest_scores():
    u, valid = scores(B=4, T=20, seed=5)
    d = POLICIES.build("top_k", k=0.25)(u, valid)
    for b in range(4):
        v = valid[b].nonzero().flatten().tolist()
        expect = sorted(v, key=lambda i: (-float(u[b, i]), i))[: expected_n(0.25, len(v))]
        assert selected(d, b) == expect  # in draw order: descending u


def test_top_k_breaks_ties_by_lower_position():
    valid = torch.ones(2, 10, dtype=torch.bool)
    valid[1, :2] = False
    u = torch.tensor([[1.0] * 10, [5.0, 5.0, 0.0, 2.0, 1.0, 2.0, 2.0, 2.0, 0.0, 2.0]])
    u = u.masked_fill(~valid, float("-inf"))
    d = POLICIES.build("top_k", k=0.3)(u, valid)
    assert selected(d, 0) == [0, 1, 2]
    assert selected(d, 1) == [3, 5, 6]  # the invalid 5.0s are never taken; among 2.0s the lowest positions


def test_top_k_ignores_invalid_positions_even_without_minus_inf():
    valid = torch.tensor([[False, False, True, True, True, True]])
    u = torch.tensor([[9.0, 9.0, -1.0, -2.0, -3.0, -4.0]])  # e.g. zscore scores, invalid not masked
    d = POLICIES.build("top_k", k=0.5)(u, valid)
    assert selected(d, 0) == [2, 3]


# ---- random --------------------------------------------------------------------------------


def test_random_counts_without_replacement_and_roughly_uniform():
    u, valid = scores(B=4, T=20)
    policy, g = POLICIES.build("random", k=0.25), torch.Generator().manual_seed(0)
    hits = torch.zeros(4, 20)
    R = 2000
    for _ in range(R):
        d = policy(u, valid, generator=g)
        for b in range(4):
            sel = selected(d, b)
            assert len(sel) == len(set(sel)) == expected_n(0.25, int(valid[b].sum()))
        hits += d.dense(20)
    freq = hits[0, 5:] / R  # row 0: 15 valid, 4 selected -> p = 4/15 each
    p = 4 / 15
    assert (freq - p).abs().max() < 5 * math.sqrt(p * (1 - p) / R)
    assert hits[~valid].sum() == 0


# ---- GLS ---------------------------------------------------------------------------------


def test_gls_falls_back_to_top_k_on_the_first_batch():
    u, valid = scores(seed=1)
    d = GLS(k=0.2, Q=100)(u, valid)
    ref = POLICIES.build("top_k", k=0.2)(u, valid)
    assert torch.equal(d.index[d.mask], ref.index[ref.mask])


def test_gls_threshold_is_the_numpy_quantile_of_the_queue():
    k, Q = 0.2, 37
    gls = GLS(k=k, Q=Q)
    history: list[float] = []
    for step in range(6):
        u, valid = scores(seed=10 + step)
        queue_before = np.array(history[-Q:], dtype=np.float64)
        d = gls(u, valid, step=step)
        if step == 0:
            assert gls.threshold() == pytest.approx(np.quantile(np.array(u[valid].tolist()[-Q:]), 1 - k))
        else:  # thresholded against earlier batches only, then enqueued
            tau = np.quantile(queue_before, 1 - k)  # numpy's default 'linear'
            m = (u.double().numpy() >= tau) & valid.numpy()
            assert torch.equal(d.dense(u.shape[1]) > 0, torch.from_numpy(m))
        history += u[valid].tolist()  # row-major valid scores
        np.testing.assert_allclose(gls.queue.numpy(), np.array(history[-Q:], dtype=np.float32))
        assert gls.queue.numel() == min(Q, len(history))


def test_gls_threshold_matches_numpy_quantile_for_small_k():
    gls = GLS(k=0.0025, Q=30_000)
    x = torch.randn(30_000, generator=torch.Generator().manual_seed(0))
    gls.push(x)
    assert gls.threshold() == pytest.approx(float(np.quantile(x.double().numpy(), 1 - 0.0025)), rel=1e-12)


def test_gls_queue_survives_state_dict_round_trip():
    a = GLS(k=0.3, Q=25)
    for seed in range(3):
        a(*scores(seed=seed))
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b = GLS(k=0.3, Q=25)
    b.load_state_dict(torch.load(buf))
    assert torch.equal(a.queue, b.queue) and a.threshold() == b.threshold()
    u, valid = scores(seed=99)
    da, db = a(u, valid), b(u, valid)
    assert torch.equal(da.index[da.mask], db.index[db.mask]) and torch.equal(a.queue, b.queue)
    fresh = GLS(k=0.3, Q=25)
    dc = fresh(u, valid)  # without the queue it would fall back to top_k
    assert not torch.equal(dc.mask.sum(-1), da.mask.sum(-1)) or not torch.equal(dc.index[dc.mask], da.index[da.mask])
    with pytest.raises(ValueError, match="Q="):
        GLS(k=0.3, Q=26).load_state_dict(a.state_dict())


def test_gls_is_registered_as_a_class_with_checked_options():
    gls = POLICIES.build("gls", k=0.2, Q=10)
    assert isinstance(gls, GLS) and gls.Q == 10 and gls.k == 0.2
    with pytest.raises(RegistryError, match="q"):
        POLICIES.build("gls", k=0.2, q=10)


# ---- curriculum ----------------------------------------------------------------------------


def curriculum_reference(u, valid, k, pi):
    """Sort valid positions by ascending u; window of n_sel starting at floor((n_valid - n_sel) pi)."""
    out = []
    for b in range(u.shape[0]):
        v = valid[b].nonzero().flatten().tolist()
        if not v:
            out.append(set())
            continue
        desc = sorted(v, key=lambda i: (-float(u[b, i]), i))
        asc = desc[::-1]
        n = expected_n(k, len(v))
        start = math.floor((len(v) - n) * pi)
        out.append(set(asc[start : start + n]))
    return out


@pytest.mark.parametrize("step", [0, 1, 250, 500, 999, 1000, 5000])
def test_curriculum_window_matches_reference(step):
    S, k = 1000, 0.25
    u, valid = scores(B=4, T=20, seed=step)
    d = POLICIES.build("curriculum", k=k, S=S)(u, valid, step=step)
    ref = curriculum_reference(u, valid, k, min(1.0, step / S))
    assert [set(selected(d, b)) for b in range(4)] == ref


def test_curriculum_ties_mirror_top_k():
    """Ascending order is top_k's order reversed: among equal u the higher position counts as easier."""
    u, valid = torch.tensor([[1.0, 2.0, 2.0, 3.0]]), torch.ones(1, 4, dtype=torch.bool)
    policy = POLICIES.build("curriculum", k=0.5, S=10)
    assert set(selected(policy(u, valid, step=0), 0)) == {0, 2}
    top = POLICIES.build("top_k", k=0.5)(u, valid)
    assert set(selected(policy(u, valid, step=10), 0)) == {1, 3} == set(selected(top, 0))


def test_curriculum_starts_easiest_and_ends_at_top_k():
    u, valid = scores(seed=3)
    u[0, 7] = u[0, 8]  # a tie
    policy = POLICIES.build("curriculum", k=0.3, S=4000)
    first = policy(u, valid, step=0)
    for b in range(3):
        v = valid[b].nonzero().flatten()
        n = expected_n(0.3, len(v))
        assert sorted(u[b, selected(first, b)].tolist()) == sorted(u[b, v].tolist())[:n]  # easiest
    top = POLICIES.build("top_k", k=0.3)(u, valid)
    for step in (4000, 10_000):
        last = policy(u, valid, step=step)
        assert torch.equal(last.index, top.index) and torch.equal(last.mask, top.mask)


# ---- Pos RS-KD ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["pos_rs", "pos_rs_star"])
def test_pos_rs_draws_n_sel_with_replacement(name):
    u, valid = scores()
    d = POLICIES.build(name, k=0.5)(u, valid, generator=torch.Generator().manual_seed(0))
    for b in range(4):
        assert int(d.mask[b].sum()) == expected_n(0.5, int(valid[b].sum()))
    if name == "pos_rs":
        assert (d.weight[d.mask] == 1).all()
    else:  # w = 1 / (n_valid q(t))
        x = u.masked_fill(~valid, 0.0).double()
        q = x / x.sum(-1, keepdim=True).clamp_min(1e-30)
        w = 1.0 / (valid.sum(-1, keepdim=True) * q.gather(1, d.index))
        torch.testing.assert_close(d.weight[d.mask].double(), w[d.mask], rtol=1e-5, atol=0)


@pytest.mark.parametrize("tau", [1.0, 0.5, 3.0])
def test_pos_rs_draw_frequencies_follow_q(tau):
    T = 6
    u = torch.tensor([[0.0, 1.0, 2.0, 3.0, 4.0, 5.0]])
    valid = torch.tensor([[True, True, True, True, True, False]])
    R = 20_000
    d = POLICIES.build("pos_rs", k=1.0, tau=tau)(
        u.expand(R, T), valid.expand(R, T), generator=torch.Generator().manual_seed(0)
    )
    freq = d.dense(T).sum(0) / d.count().sum()
    w = torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0, 0.0]) ** (1 / tau)
    q = w / w.sum()
    se = (q * (1 - q) / d.count().sum()).sqrt()
    assert ((freq - q).abs() <= 4 * se + 1e-12).all()
    assert freq[0] == 0 and freq[5] == 0  # u = 0 and invalid never drawn


def test_pos_rs_rejects_negative_scores_but_clamps_round_off():
    valid = torch.ones(1, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match=">= 0"):
        POLICIES.build("pos_rs", k=0.5)(torch.tensor([[1.0, -0.5, 2.0, 0.3]]), valid)
    d = POLICIES.build("pos_rs", k=1.0)(
        torch.tensor([[1.0, -1e-9, 2.0, 0.3]]), valid, generator=torch.Generator().manual_seed(0)
    )
    assert 1 not in selected(d, 0)


def test_pos_rs_all_zero_row_samples_uniformly():
    valid = torch.tensor([[False, True, True, True]])
    d = POLICIES.build("pos_rs_star", k=1.0)(torch.zeros(1, 4), valid, generator=torch.Generator().manual_seed(0))
    assert valid[0, d.index[0]].all() and torch.allclose(d.weight, torch.ones(1, 3))


@pytest.mark.parametrize("name", ["pos_rs", "pos_rs_star"])
def test_pos_rs_coverage_takes_top_k_first(name):
    u, valid = scores(B=3, T=20, seed=4)
    k, c = 0.5, 0.4
    d = POLICIES.build(name, k=k, coverage=c)(u, valid, generator=torch.Generator().manual_seed(0))
    top = POLICIES.build("top_k", k=k * c)(u, valid)
    for b in range(3):
        n = expected_n(k, int(valid[b].sum()))
        n_cov = min(math.floor(n * c), n - 1)
        assert int(d.mask[b].sum()) == n
        assert selected(d, b)[:n_cov] == selected(top, b)[:n_cov]
        assert not set(selected(d, b)[n_cov:]) & set(selected(d, b)[:n_cov])  # the rest comes from R


def test_pos_rs_rejects_bad_options():
    u, valid = scores()
    with pytest.raises(ValueError, match="tau"):
        POLICIES.build("pos_rs", k=0.2, tau=0.0)(u, valid)
    with pytest.raises(ValueError, match="coverage"):
        POLICIES.build("pos_rs_star", k=0.2, coverage=1.5)(u, valid)


def test_draws_dense_sums_repeats():
    d = Draws(torch.tensor([[2, 2, 0]]), torch.tensor([[1.0, 2.0, 5.0]]), torch.tensor([[True, True, False]]))
    assert d.dense(4).tolist() == [[0.0, 0.0, 3.0, 0.0]] and d.count().tolist() == [2.0]
