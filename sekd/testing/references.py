"""Each piece against the float64 reference declared where it is registered (sekd/selection/references.py
states the semantics per kind): deterministic pieces exactly (float32 signals to 1e-5), estimators (random
policies and class samplers) in expectation: the mean over R keyed draws, all in one vectorized call, is
within Z standard errors (+ a float32 rounding allowance) of the reference at every position.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor

from sekd.core.rng import RowKeys
from sekd.selection.classes import CLASSES
from sekd.selection.criteria import CRITERIA
from sekd.selection.policies import POLICIES
from sekd.selection.signals import SIGNALS, importance_terms

Z, DRAWS = 5.0, 2000  # an estimator's mean over DRAWS keyed draws is within Z standard errors of its reference
STEP = 1000


def flat(N: int = 10, V: int = 11, seed: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Flat positions in float64: s, t [N,V], y [N], row [N] (3 sequences), u [N] >= 0."""
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(N, V, generator=g, dtype=torch.float64) * 2
    t = torch.randn(N, V, generator=g, dtype=torch.float64) * 2
    y = torch.randint(0, V, (N,), generator=g)
    row = torch.arange(N) * 3 // N
    return s, t, y, row, torch.rand(N, generator=g, dtype=torch.float64) * 3


def scores(B: int = 4, T: int = 12, seed: int = 0) -> tuple[Tensor, Tensor]:
    """u >= 0 [B,T] (-inf where invalid; row 3 has no valid position) and the valid mask."""
    g = torch.Generator().manual_seed(seed)
    valid = torch.rand(B, T, generator=g) < 0.75
    valid[0, :2], valid[1, 5:], valid[3] = False, True, False
    return (torch.rand(B, T, generator=g) * 3).masked_fill(~valid, float("-inf")), valid


def _need(piece: Any, kind: str, name: str) -> Any:
    ref = getattr(piece, "reference", None)
    assert ref is not None, f"{kind} {name!r} declares no float64 reference (reference= where it is registered)"
    return ref


def _close(got: Tensor, want: Tensor, what: str, rtol: float, atol: float) -> None:
    try:
        torch.testing.assert_close(got.double(), want.double(), rtol=rtol, atol=atol)
    except AssertionError as err:
        lines = " ".join(x.strip() for x in str(err).strip().splitlines()[:4])
        raise AssertionError(f"{what} disagrees with its declared reference: {lines}") from None


def _estimate(samples: Tensor, want: Tensor, what: str, slack: float) -> None:
    """samples [R,...]: their mean within Z standard errors (+ slack) of `want` everywhere."""
    mean, se = samples.mean(0), samples.std(0) / samples.shape[0] ** 0.5
    gap = (mean - want).abs()
    bad = gap > Z * se + slack
    if bool(bad.any()):
        i = tuple(int(x) for x in bad.nonzero()[0])
        raise AssertionError(
            f"{what} is biased: over {samples.shape[0]} draws the mean at {i} is {float(mean[i]):.6g}, "
            f"the reference's expectation {float(want[i]):.6g} (more than {Z:g} standard errors {float(se[i]):.3g} away)"
        )


def signal_reference(name: str) -> None:
    """u(t) of the fast terms (float32) equals the reference at T = 1 and 2; a signal that does not need the
    teacher gives the same without one, one that does is refused without one."""
    sig = SIGNALS.get(name)
    if sig.random:
        return
    ref = _need(sig, "signal", name)
    s, t, y, _, _ = flat(seed=1)
    teacher = t if sig.needs_teacher else None  # a teacher-free signal must not read it
    for temperature in (1.0, 2.0):
        try:
            u = importance_terms(sig, s.float(), None if teacher is None else t.float(), y, temperature=temperature)
        except Exception as err:  # a user's term may fail in any way on t = None
            raise AssertionError(
                f"signal {name!r} declares needs_teacher=False but fails without one: {err!r}"
            ) from None
        _close(u.sum(0), ref(s, teacher, y, temperature=temperature), f"signal {name!r} at T={temperature}", 1e-5, 1e-5)
    if sig.needs_teacher:
        try:
            importance_terms(sig, s.float(), None, y)
        except ValueError:
            return
        raise AssertionError(f"signal {name!r} declares needs_teacher but runs without teacher logits")


def criterion_reference(name: str, options: Mapping[str, Any]) -> None:
    """D per position and its gradient in the student's logits equal the reference's, float64, T = 1.5."""
    crit = CRITERIA.build(name, **options)
    ref = _need(crit, "criterion", name)
    s, t, y, row, u = flat(seed=2)
    w = torch.rand(s.shape[0], generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    grads: list[tuple[Tensor, Tensor]] = []
    for fn in (crit, lambda *a, **kw: ref(*a, **kw, **options)):
        x = s.clone().requires_grad_()
        D = fn(x, t, y, temperature=1.5, row=row, u=u)
        (D * w).sum().backward()
        assert x.grad is not None
        grads.append((D.detach(), x.grad))
    _close(grads[0][0], grads[1][0], f"criterion {name!r}'s D", 1e-7, 1e-10)
    _close(grads[0][1], grads[1][1], f"criterion {name!r}'s gradient dD/ds", 1e-7, 1e-10)


def class_sampler_reference(name: str, options: Mapping[str, Any], seed: int = 0) -> None:
    """The dense target p~ [N,V] (a tail target: and its tail column) equals the reference (random: in
    expectation over DRAWS draws)."""
    sampler = CLASSES.build(name, **options)
    ref = _need(sampler, "class sampler", name)
    s, t, _, _, _ = flat(N=6, seed=3)
    student = {"student": s} if sampler.needs_student else {}
    want = ref(t, temperature=1.5, **student, **options)
    R = DRAWS if sampler.random else 1
    g = torch.Generator().manual_seed(seed)
    many = {k: v.repeat(R, 1) for k, v in student.items()}
    target = sampler(t.repeat(R, 1), temperature=1.5, generator=g, **many)
    dense = torch.zeros(R * t.shape[0], t.shape[1] + (target.tail is not None), dtype=torch.float64)
    dense.scatter_add_(1, target.ids, target.probs.double().masked_fill(~target.mask, 0.0))
    if target.tail is not None:
        dense[:, -1] = target.tail.double()
    dense = dense.view(R, t.shape[0], -1)
    assert dense.shape[1:] == want.shape, (
        f"class sampler {name!r}: target {tuple(dense.shape[1:])} (tail: {target.tail is not None}), "
        f"reference {tuple(want.shape)}; a tail target's reference has one more column, the tail"
    )
    if sampler.random:
        _estimate(dense, want, f"class sampler {name!r}", 1e-6)
    else:
        _close(dense[0], want, f"class sampler {name!r}", 1e-9, 1e-12)


def policy_reference(name: str, options: Mapping[str, Any], seed: int = 0) -> None:
    """m_t w_t on positions equals the reference: exactly for a deterministic policy (a stateful one fresh),
    in expectation over DRAWS per-sample keyed draws for a random one."""
    policy: Any = POLICIES.build(name, **options)
    ref = _need(policy, "policy", name)
    u, valid = scores()
    want = ref(u.double(), valid, step=STEP, **options)
    if not policy.random:
        _close(policy(u, valid, step=STEP).dense(u.shape[1]), want, f"policy {name!r}", 1e-6, 1e-6)
        return
    R, (B, T) = DRAWS, u.shape
    keys = RowKeys.of_samples(seed, STEP, range(R * B))
    d = policy(u.repeat(R, 1), valid.repeat(R, 1), keys=keys, step=STEP)
    _estimate(d.dense(T).double().view(R, B, T), want, f"policy {name!r}", 1e-5 * float(want.abs().max()))
