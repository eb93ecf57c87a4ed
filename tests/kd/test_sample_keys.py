"""Every policy keeps its meaning at any world size (issue 13; docs/method.md §5, §6): a random draw is
keyed by (seed, optimizer step, GLOBAL sample index) (sekd/core/rng.py `RowKeys`), so a sample draws the same
numbers whichever rank or micro-batch holds it, wherever it sits in the batch and however the flow chunks;
GLS sees the scores of every rank through `gather` and keeps one queue; curriculum reads the global step.

"Two ranks" here are two calls on the halves of one batch, as the loop splits a global micro-batch in rank
order; the real 2-process runs are tests/test_distributed.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sekd.kd.flows import chunked_kd_loss
from sekd.kd.objective import LossInputs, selective_kd_loss
from sekd.core.rng import PositionKeys, RowKeys
from sekd.selection.classes import CLASSES
from sekd.selection.policies import POLICIES
from sekd.selection.signals import SIGNALS, importance
from sekd.core.tensors import IGNORE

torch.set_num_threads(1)

B, T, V, SEED, STEP = 6, 11, 13, 7, 42
IDX = [40, 3, 17, 8, 25, 11]  # global sample indices of the micro-batch's rows
HALVES = [slice(0, 3), slice(3, 6)]  # rank 0 takes the first half, rank 1 the second


def inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    t = torch.randn(B, T, V, generator=g, dtype=torch.float64) * 2
    y = torch.randint(0, V, (B, T), generator=g)
    y[torch.rand(B, T, generator=g) < 0.3] = IGNORE
    return u, t, y


def keys(rows, step=STEP, seed=SEED):
    return RowKeys.of_samples(seed, step, rows)


def per_row(d, i):
    """Row i's draws (index, weight) in draw order."""
    return d.index[i][d.mask[i]].tolist(), d.weight[i][d.mask[i]].tolist()


POLICY_CASES = {
    "random": dict(k=0.4),
    "pos_rs": dict(k=0.5, tau=0.5),
    "pos_rs_star": dict(k=0.6, coverage=0.3),
    "curriculum": dict(k=0.3, S=100),
    "top_k": dict(k=0.3),
}


@pytest.mark.parametrize("name", sorted(POLICY_CASES))
def test_a_policy_draws_per_sample_whatever_the_batch(name):
    """Halves (two ranks), a permuted batch and the whole batch give each sample the same draws."""
    u, _, y = inputs()
    valid = y != IGNORE
    policy = POLICIES.build(name, **POLICY_CASES[name])
    whole = policy(u, valid, keys=keys(IDX), step=STEP) if policy.random else policy(u, valid, step=STEP)
    for part in HALVES:
        rows = IDX[part]
        half = (
            policy(u[part], valid[part], keys=keys(rows), step=STEP)
            if policy.random
            else policy(u[part], valid[part], step=STEP)
        )
        for j, i in enumerate(range(B)[part]):
            assert per_row(half, j) == per_row(whole, i)
    perm = [4, 0, 5, 2, 1, 3]
    shuffled = policy(u[perm], valid[perm], keys=keys([IDX[i] for i in perm]), step=STEP) if policy.random else None
    if shuffled is not None:
        for j, i in enumerate(perm):
            assert per_row(shuffled, j) == per_row(whole, i)
        other_step = policy(u, valid, keys=keys(IDX, step=STEP + 1), step=STEP + 1)
        assert any(per_row(other_step, i) != per_row(whole, i) for i in range(B)), "a new step draws anew"


def test_the_random_signal_draws_per_sample():
    _, _, y = inputs()
    valid = y != IGNORE
    whole = importance(SIGNALS.get("random"), None, None, y, valid, keys=keys(IDX))
    halves = torch.cat(
        [importance(SIGNALS.get("random"), None, None, y[p], valid[p], keys=keys(IDX[p])) for p in HALVES]
    )
    assert torch.equal(whole, halves)
    # a longer (padded) batch keeps each row's numbers at its own positions: a stream's prefix
    longer = torch.cat([y, torch.full((B, 5), IGNORE)], 1)
    wide = importance(
        SIGNALS.get("random"),
        None,
        None,
        longer,
        torch.cat([valid, torch.ones(B, 5, dtype=torch.bool)], 1),
        keys=keys(IDX),
    )
    assert torch.equal(wide[:, :T][valid], whole[valid])


def test_rs_kd_class_draws_per_position_whatever_the_chunk():
    """Position (r, c) draws from row r's key at c: halves, chunks and one call agree."""
    _, t, y = inputs()
    rows, cols = (y != IGNORE).nonzero(as_tuple=True)
    rs_kd = CLASSES.build("rs_kd", n_draws=9)
    pk = PositionKeys(keys(IDX), rows, cols, T)
    whole = rs_kd(t[rows, cols], temperature=1.3, keys=pk)
    for a in range(0, rows.numel(), 4):  # chunks of 4 positions
        sl = slice(a, a + 4)
        part = rs_kd(t[rows[sl], cols[sl]], temperature=1.3, keys=pk.take(sl))
        for n in range(part.ids.shape[0]):
            m, mw = part.mask[n], whole.mask[a + n]
            assert part.ids[n][m].tolist() == whole.ids[a + n][mw].tolist()
            assert part.probs[n][m].tolist() == whole.probs[a + n][mw].tolist()
    for p in HALVES:  # rank r holds rows p; its positions' draws are the whole batch's
        r, c = (y[p] != IGNORE).nonzero(as_tuple=True)
        half = rs_kd(t[p][r, c], temperature=1.3, keys=PositionKeys(keys(IDX[p]), r, c, T))
        at = torch.isin(rows, torch.arange(B)[p])
        assert torch.equal(half.ids, whole.ids[at][:, : half.ids.shape[1]])
        assert torch.equal(half.probs, whole.probs[at][:, : half.probs.shape[1]])


SELECTORS = {  # every random piece at once, and GLS
    "random_signal_pos_rs_rs_kd": ("random", "pos_rs_star", dict(k=0.5, coverage=0.3), "rs_kd"),
    "random_policy_rs_kd": (None, "random", dict(k=0.4), "rs_kd"),
    "curriculum": ("student_entropy", "curriculum", dict(k=0.3, S=100), None),
}


def run_flow(flow, name, part, *, rows, chunk_size=4, gather=None, policy=None):
    from sekd.kd.objective import Selector
    from sekd.selection.criteria import CRITERIA

    signal, pol, opts, classes = SELECTORS[name] if name in SELECTORS else ("student_entropy", None, None, None)
    sel = Selector(
        SIGNALS.get(signal) if signal else None,
        policy or POLICIES.build(pol, **opts),
        CRITERIA.build("forward_kl"),
        classes=CLASSES.build(classes, n_draws=8) if classes else None,
    )
    g = torch.Generator().manual_seed(1)
    h_s = torch.randn(B, T, 5, generator=g, dtype=torch.float64)[part].requires_grad_()
    h_t = torch.randn(B, T, 4, generator=g, dtype=torch.float64)[part]
    head_s = torch.nn.Linear(5, V, dtype=torch.float64)
    head_t = torch.nn.Linear(4, V, dtype=torch.float64).requires_grad_(False)
    with torch.no_grad():
        for p in [*head_s.parameters(), *head_t.parameters()]:
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
    y = inputs()[2][part]
    kw = dict(
        lam=0.8, temperature=1.0, generator=torch.Generator().manual_seed(SEED), step=STEP, rows=rows, gather=gather
    )
    if flow == "dense":
        out = selective_kd_loss(
            F.linear(h_s, head_s.weight, head_s.bias),
            F.linear(h_t, head_t.weight, head_t.bias),
            y,
            LossInputs(sel, **kw),
        )
    else:
        out = chunked_kd_loss(h_s, head_s, h_t, head_t, y, LossInputs(sel, **kw), vocab=V, chunk_size=chunk_size)
    out.loss_sum.backward()
    return out, head_s.weight.grad


@pytest.mark.parametrize("flow", ["dense", "chunked"])
@pytest.mark.parametrize("name", sorted(SELECTORS))
def test_two_ranks_give_the_whole_batch_loss_and_gradient(flow, name):
    """Halves' loss sums, weights and gradients add up to the whole batch's (every draw keyed per sample),
    and the chunked flow with any chunk size equals the dense one on the same keys."""
    whole, g_whole = run_flow(flow, name, slice(None), rows=IDX)
    halves = [run_flow(flow, name, p, rows=IDX[p]) for p in HALVES]
    assert sum(h.weight for h, _ in halves) == whole.weight
    torch.testing.assert_close(sum(h.loss_sum for h, _ in halves), whole.loss_sum, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sum(g for _, g in halves), g_whole, rtol=1e-10, atol=1e-12)
    for p, (h, _) in zip(HALVES, halves):
        for j, i in enumerate(range(B)[p]):
            assert per_row(h.draws, j) == per_row(whole.draws, i)
    other, _ = run_flow("dense" if flow == "chunked" else "chunked", name, slice(None), rows=IDX, chunk_size=1000)
    torch.testing.assert_close(other.loss_sum, whole.loss_sum, rtol=1e-10, atol=1e-12)
    assert torch.equal(other.draws.index, whole.draws.index)


def test_gls_queue_is_global_through_gather():
    """Two GLS instances, each fed one half plus a gather of both halves' scores, select what one instance
    selects on the whole batch, step after step, and end with the same queue."""
    from sekd.selection.policies import GLS

    one, ranks = GLS(k=0.3, Q=40), [GLS(k=0.3, Q=40), GLS(k=0.3, Q=40)]
    for step in range(5):
        u, _, y = inputs(step)
        valid = y != IGNORE
        u = u.float().masked_fill(~valid, float("-inf"))
        whole = one(u, valid, step=step)
        local = [u[p][valid[p]] for p in HALVES]  # each rank's row-major valid scores
        gather = lambda x: torch.cat(local)  # noqa: E731  what all_gather_cat returns on every rank
        for r, p in enumerate(HALVES):
            assert torch.equal(local[r], u[p][valid[p]])
            half = ranks[r](u[p], valid[p], step=step, gather=gather)
            for j, i in enumerate(range(B)[p]):
                assert per_row(half, j) == per_row(whole, i), (step, r)
    assert one.queue.numel() == 40
    for policy in ranks:
        assert torch.equal(policy.queue, one.queue)


def test_gls_through_the_flows_reaches_gather():
    """The objective hands `gather` to a stateful policy: the halves' queues are the whole batch's."""
    from sekd.selection.policies import GLS

    for flow in ("dense", "chunked"):
        one = GLS(k=0.3, Q=1000)
        run_flow(flow, "gls", slice(None), rows=IDX, policy=one)
        gathered = [run_flow(flow, "gls", p, rows=IDX[p], policy=GLS(k=0.3, Q=1000))[0].u for p in HALVES]
        scores = torch.cat([u[torch.isfinite(u)] for u in gathered])
        ranks = [GLS(k=0.3, Q=1000) for _ in HALVES]
        for r, p in enumerate(HALVES):
            run_flow(flow, "gls", p, rows=IDX[p], policy=ranks[r], gather=lambda x: scores)
        assert all(torch.equal(r.queue, one.queue) for r in ranks) and one.queue.numel() > 0


def test_keys_depend_on_seed_step_and_sample_only():
    assert keys([3, 5]).keys == keys([3, 5]).keys == (keys([3]).keys[0], keys([5]).keys[0])
    assert len({keys([3]).keys, keys([3], step=STEP + 1).keys, keys([3], seed=SEED + 1).keys, keys([4]).keys}) == 4
    g = keys([3]).generator(0, "a")
    assert torch.equal(torch.rand(4, generator=g), torch.rand(4, generator=keys([3]).generator(0, "a")))
    assert not torch.equal(
        torch.rand(4, generator=keys([3]).generator(0, "a")), torch.rand(4, generator=keys([3]).generator(0, "b"))
    )


def test_keyed_pos_rs_draws_follow_q_over_many_samples():
    """Keyed draws are draws from q: frequencies over 20,000 keyed samples within 5 standard errors."""
    R = 20_000
    u = torch.tensor([[0.0, 1.0, 2.0, 3.0, 4.0, 5.0]]).expand(R, 6)
    valid = torch.tensor([[True, True, True, True, True, False]]).expand(R, 6)
    d = POLICIES.build("pos_rs", k=1.0)(u, valid, keys=keys(range(R)))
    freq = d.dense(6).sum(0) / d.count().sum()
    q = torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0, 0.0]) / 10
    se = (q * (1 - q) / d.count().sum()).sqrt()
    assert ((freq - q).abs() <= 5 * se + 1e-9).all(), (freq, q)


def test_curriculum_reads_the_optimizer_step_the_loop_passes():
    """Curriculum's window moves with `step`, which the loop sets to its optimizer step (a global count,
    the same on every rank), never a per-rank micro-batch count."""
    import inspect

    from sekd.training.trainer import Trainer

    assert "step=self.prog.step" in inspect.getsource(Trainer.loss_inputs)  # Progress.step: optimizer steps
    u, _, y = inputs()
    valid = y != IGNORE
    c = POLICIES.build("curriculum", k=0.3, S=10)
    assert not torch.equal(c(u, valid, step=0).index, c(u, valid, step=10).index)
