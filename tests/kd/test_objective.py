"""The selective objective (docs/method.md §2) against a dense float64 reference, values and gradients."""

import math

import pytest
import torch

from sekd.kd.objective import IGNORE, LossInputs, Selector, selective_kd_loss
from sekd.selection.criteria import forward_kl
from sekd.selection.policies import POLICIES


def full_kd() -> Selector:
    return Selector(signal=None, policy=POLICIES.build("all"), criterion=forward_kl)


def random_batch(B=3, T=7, V=11, seed=0, invalid=0.3):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(B, T, V, generator=g, dtype=torch.float64) * 2
    t = torch.randn(B, T, V, generator=g, dtype=torch.float64) * 2
    y = torch.randint(0, V, (B, T), generator=g)
    y[torch.rand(B, T, generator=g) < invalid] = IGNORE
    y[-1] = IGNORE  # a sequence with no valid target: carries no weight
    return s.requires_grad_(), t, y


def reference_loss(s, t, y, lam, T, normalization):
    """The equation, written with loops: per-position l(t), per-sequence mean, mean over sequences."""
    per_seq, all_terms = [], []
    for b in range(s.shape[0]):
        terms = []
        for i in range(s.shape[1]):
            if y[b, i] == IGNORE:
                continue
            p = torch.softmax(t[b, i] / T, -1)
            logq_T = torch.log_softmax(s[b, i] / T, -1)
            kl = (p * (p.log() - logq_T)).sum()
            ce = -torch.log_softmax(s[b, i], -1)[y[b, i]]
            terms.append(lam * T**2 * kl + (1 - lam) * ce)
        if terms:
            per_seq.append(sum(terms) / len(terms))
            all_terms += terms
    if normalization == "per_sequence":
        return sum(per_seq) / len(per_seq)
    return sum(all_terms) / len(all_terms)


@pytest.mark.parametrize("lam,T", [(1.0, 1.0), (1.0, 2.0), (0.5, 1.5), (0.0, 1.0)])
@pytest.mark.parametrize("normalization", ["per_sequence", "batch_tokens"])
def test_full_kd_matches_float64_reference(lam, T, normalization):
    s, t, y = random_batch(seed=int(lam * 10 + T * 100))
    out = selective_kd_loss(s, t, y, LossInputs(full_kd(), lam=lam, temperature=T, normalization=normalization))
    loss = out.loss_sum / out.weight
    (grad,) = torch.autograd.grad(loss, s)

    s_ref = s.detach().clone().requires_grad_()
    ref = reference_loss(s_ref, t, y, lam, T, normalization)
    (grad_ref,) = torch.autograd.grad(ref, s_ref)
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-9, atol=1e-12)


def test_weight_counts_sequences_with_targets_only():
    s, t, y = random_batch()
    out = selective_kd_loss(s, t, y, LossInputs(full_kd(), lam=1.0, temperature=1.0))
    assert out.weight == float(((y != IGNORE).sum(-1) > 0).sum())
    assert out.metrics["positions_selected"] == out.metrics["positions_valid"] == float((y != IGNORE).sum())


def test_loss_is_additive_over_micro_batches():
    """sum of micro-batch loss sums / sum of weights == the loss of the whole batch (any split)."""
    s, t, y = random_batch(B=6, seed=3)
    whole = selective_kd_loss(s, t, y, LossInputs(full_kd(), lam=1.0, temperature=1.0))
    for split in ([1] * 6, [2, 4], [3, 3], [5, 1]):
        num = den = 0.0
        start = 0
        for n in split:
            part = selective_kd_loss(
                s[start : start + n],
                t[start : start + n],
                y[start : start + n],
                LossInputs(full_kd(), lam=1.0, temperature=1.0),
            )
            num, den, start = num + part.loss_sum, den + part.weight, start + n
        assert math.isclose(float((num / den).detach()), float(whole.loss_sum.detach() / whole.weight), rel_tol=1e-12)


def test_identical_distributions_give_zero_kd():
    s, _, y = random_batch()
    out = selective_kd_loss(s, s.detach(), y, LossInputs(full_kd(), lam=1.0, temperature=1.0))
    assert abs(float(out.loss_sum.detach())) < 1e-12


def packed_text(B=3, T=9, V=13, seed=5):
    """Every position has a target but each row's last (the next token is unknown): what Full KD selects."""
    s, t, y = random_batch(B, T, V, seed=seed, invalid=0.0)
    y = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))
    y[:, -1] = IGNORE
    return s, t, y


@pytest.mark.parametrize("lam,T", [(1.0, 1.0), (0.5, 2.0)])
def test_full_kd_on_packed_text_matches_reference_and_reads_logits_in_place(lam, T):
    from torch.utils._python_dispatch import TorchDispatchMode

    class Indexing(TorchDispatchMode):  # records every advanced indexing of a [B,T,V] tensor
        seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in (torch.ops.aten.index.Tensor, torch.ops.aten.index_put_.default) and args[0].dim() == 3:
                self.seen.append(func)
            return func(*args, **(kwargs or {}))

    s, t, y = packed_text()
    with Indexing() as mode:
        out = selective_kd_loss(s, t, y, LossInputs(full_kd(), lam=lam, temperature=T))
        loss = out.loss_sum / out.weight
        (grad,) = torch.autograd.grad(loss, s)
    assert mode.seen == []  # no x[rows, cols] copy of the logits, forward or backward
    s_ref = s.detach().clone().requires_grad_()
    ref = reference_loss(s_ref, t, y, lam, T, "per_sequence")
    (grad_ref,) = torch.autograd.grad(ref, s_ref)
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-9, atol=1e-12)
    assert torch.equal(grad[:, -1], torch.zeros_like(grad[:, -1]))  # the unselected position gets nothing


def test_packed_text_cover_keeps_pointwise_criteria_reading_u_finite():
    # a pointwise criterion that reads u(t) sees -inf at the unselected position: its gradient must not turn nan
    from sekd.selection.criteria import Criterion
    from sekd.selection.signals import SIGNALS

    def scaled_kl(s, t, y, *, temperature=1.0, row=None, u=None):
        return forward_kl(s, t, y, temperature=temperature) * u  # -inf * KL where unselected

    sel = Selector(SIGNALS.get("student_entropy"), POLICIES.build("all"), Criterion("scaled_kl", scaled_kl))
    s, t, y = packed_text()
    out = selective_kd_loss(s, t, y, LossInputs(sel, lam=1.0, temperature=1.0))
    (grad,) = torch.autograd.grad(out.loss_sum, s)
    assert torch.isfinite(grad).all() and torch.equal(grad[:, -1], torch.zeros_like(grad[:, -1]))
    u = out.u
    ref = sum(forward_kl(s[b, :-1], t[b, :-1], y[b, :-1]) @ u[b, :-1].double() / (y.shape[1] - 1) for b in range(3))
    torch.testing.assert_close(out.loss_sum, ref, rtol=1e-10, atol=1e-12)


def test_every_position_selected_is_a_view_not_a_copy():
    # Full KD on packed text selects every position: the dense flow reads the logits in place, no [N,V] copy
    from sekd.kd.objective import at_positions

    x = torch.randn(3, 5, 7)
    rows, cols = torch.ones(3, 5).nonzero(as_tuple=True)
    flat = at_positions(x, rows, cols)
    assert flat.data_ptr() == x.data_ptr() and torch.equal(flat, x[rows, cols])
    keep = torch.rand(3, 5, generator=torch.Generator().manual_seed(0)) > 0.5
    rows, cols = keep.nonzero(as_tuple=True)
    assert torch.equal(at_positions(x, rows, cols), x[rows, cols])
