"""Alignment criteria D(p_t, q_t) (docs/method.md §3), per selected position.

A criterion maps flat selected positions to a divergence each: (s_logits [N,V], t_logits [N,V], targets
[N], *, temperature, row [N], u [N]) -> D [N]; `row` (each position's sequence) and `u` (its score) serve
batch-level criteria (AT-KD's hard/easy split, weighted KD). Each is a registered `Criterion`, which
declares how it couples positions, so a flow that cuts them into chunks knows what it may do: pointwise
(D_t from position t alone: any chunking is exact) or batch (batch-level quantities first, from a no-grad
`prepare` pass over all selected positions; then D is pointwise again), and whether it consumes a sparse
class target. No criterion multiplies by T^2 (the objective does); batch-level ones return per-position
values whose mean over a sequence's selected positions gives their formula.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Mapping

import torch
from torch import Tensor

from sekd.core.registry import NoOptions, OptionError, Registry, at_least, in_range
from sekd.selection import references as R
from sekd.selection.classes import FORMS, sparse_forward_kl, sparse_reverse_kl
from sekd.core.tensors import upcast

CRITERIA: Registry[Criterion] = Registry("criterion", call_time=("temperature", "row", "u"))

COUPLINGS = ("pointwise", "batch", "all")
NEEDS = {"u": "the scores u(t) at the selected positions", "teacher": "a no-grad teacher pass over them"}

ChunkD = Callable[[Tensor, Tensor, slice], Tensor]  # (s_c [C,V], t_c [C,V], sl) -> D at positions sl  [C]


@dataclass(frozen=True)
class Selected:
    """A batch's selected positions, as a batch-level criterion's prepare step sees them (no grad)."""

    y: Tensor  # x_{t+1}                                                                   [N]
    row: Tensor  # the sequence of each position                                           [N]
    u: Tensor | None  # u(t), None without a signal                                        [N]
    teacher: Callable[[slice], Tensor]  # z_t at positions [sl], no grad (a selective head)  -> [C,V]
    parts: tuple[slice, ...]  # the chunks the flow reads positions in
    temperature: float


@dataclass(frozen=True)
class Criterion:
    """A registered D and what it declares about itself; calling it is the dense flow's D on the positions
    passed in, as one batch.

    coupling: "pointwise" (D_t from position t alone), "batch" (needs `prepare`: a first no-grad pass over
      the selected positions, reading `needs` of NEEDS, returns the pointwise D of this batch), or "all"
      (must see every selected position at once: only what `as_criterion` makes of an undeclared callable).
    sparse: D against a sparse class target p~ over C_t, (s [N,V], SparseTarget, temperature) -> [N];
      None: the criterion cannot use one (classes other than full, or the teacher cache, are refused).
    sparse_forms: the forms of p~ (classes.FORMS) its sparse D is right for; the others are refused.
    closed_form: D and its gradient in the student's logits written out, (s [C,V], t [C,V], temperature,
      scratch [C,V]) -> (D [C], dD/ds [C,V]); it may overwrite s, t and scratch (the chunked flow's reused
      blocks) and returns the gradient in s's storage. None: the flow takes the gradient from autograd.
    """

    name: str
    fn: Callable[..., Tensor]
    coupling: str = "pointwise"
    needs: frozenset[str] = frozenset()
    prepare: Callable[..., ChunkD] | None = None  # (Selected, **options) -> ChunkD
    sparse: Callable[..., Tensor] | None = None
    sparse_forms: frozenset[str] = frozenset(FORMS)
    closed_form: Callable[..., tuple[Tensor, Tensor]] | None = None
    options: Mapping[str, Any] = field(default_factory=dict)
    reference: Callable[..., Tensor] | None = None  # the dense D per position in float64 (sekd.testing)
    example: Mapping[str, Any] = field(default_factory=dict)  # options the conformance kit runs it with

    def __post_init__(self):
        if self.coupling not in COUPLINGS:
            raise ValueError(f"criterion {self.name!r}: coupling={self.coupling!r}; allowed: {', '.join(COUPLINGS)}")
        if self.coupling == "batch" and self.prepare is None:
            raise ValueError(
                f"criterion {self.name!r} is batch-level but declares no prepare step: a chunked "
                f"flow could only run it as one [N,V] chunk"
            )
        if self.coupling != "batch" and (self.prepare is not None or self.needs):
            raise ValueError(f"criterion {self.name!r}: only a batch-level criterion has a prepare step and needs")
        if set(self.sparse_forms) - set(FORMS):
            raise ValueError(
                f"criterion {self.name!r}: sparse_forms {sorted(self.sparse_forms)}; known: {', '.join(FORMS)}"
            )
        unknown = set(self.needs) - set(NEEDS)
        if unknown:
            raise ValueError(f"criterion {self.name!r} needs {sorted(unknown)}; known: {', '.join(NEEDS)}")

    def __call__(self, s: Tensor, t: Tensor, y: Tensor, **kw: Any) -> Tensor:
        return self.fn(s, t, y, **{**self.options, **kw})

    def bind(self, **options: Any) -> "Criterion":
        return replace(self, options=dict(options))

    def over(self, sel: Selected) -> ChunkD:
        """D chunk by chunk over `sel`'s positions, exact under any chunking (one chunk for coupling "all")."""
        T = sel.temperature
        if self.coupling == "pointwise":
            return lambda s, t, sl: self(s, t, sel.y[sl], temperature=T)
        if self.coupling == "batch":
            if "u" in self.needs and sel.u is None:
                raise ValueError(f"criterion {self.name!r} needs a signal: it reads u(t)")
            assert self.prepare is not None  # __post_init__: a batch-level criterion declares one
            return self.prepare(sel, **self.options)
        return lambda s, t, sl: self(
            s, t, sel.y[sl], temperature=T, row=sel.row[sl], u=sel.u[sl] if sel.u is not None else None
        )


def criterion(
    name: str,
    options: type = NoOptions,
    *,
    reference: Callable[..., Tensor] | None = None,
    example: Mapping[str, Any] | None = None,
    **declared: Any,
) -> Callable[[Callable], Criterion]:
    """Register `fn` as the criterion `name`, with what it declares (see `Criterion`); `reference`: the
    dense D per position in float64, (s, t, y, *, temperature, row, u, **options) -> [N]; `example`:
    options the conformance kit runs it with."""

    def add(fn: Callable[..., Tensor]) -> Criterion:
        piece = Criterion(name, fn, **declared, reference=reference, example=dict(example or {}))
        CRITERIA.register(name, options=options)(piece)
        return piece

    return add


def as_criterion(fn: Callable[..., Tensor]) -> Criterion:
    """A registered criterion as it is; an undeclared callable (s, t, y, *, temperature, row, u) -> [N]
    may couple positions in any way, so it is declared to see all of them at once."""
    if isinstance(fn, Criterion):
        return fn
    return Criterion(getattr(fn, "__name__", "criterion"), fn, coupling="all")


def sparse_capable() -> list[str]:
    """The registered criteria that consume a sparse class target."""
    return [n for n in CRITERIA.names() if CRITERIA.get(n).sparse is not None]


def sparse_divergence(crit: Criterion, source: str, form: str | None = None) -> Callable[..., Tensor]:
    """crit's D against a sparse class target from `source` (of `form`); refused where it declares none,
    or none right for that form."""
    if crit.sparse is None:
        raise ValueError(
            f"criterion {crit.name!r} cannot use a sparse class target ({source}); "
            f"choose one of: {', '.join(sparse_capable())}"
        )
    if form is not None and form not in crit.sparse_forms:
        raise ValueError(
            f"criterion {crit.name!r} cannot use {form} targets ({source}: {FORMS[form]}); "
            f"it takes: {', '.join(f for f in FORMS if f in crit.sparse_forms)}"
        )
    return crit.sparse


@torch.no_grad()
def teacher_target_prob(sel: Selected) -> Tensor:
    """p_t(x_{t+1}) at temperature T at every selected position, from a no-grad teacher pass.  [N]"""
    p = [
        _log_softmax(sel.teacher(sl), sel.temperature).gather(1, sel.y[sl].long().unsqueeze(-1)).squeeze(-1).exp()
        for sl in sel.parts
    ]
    return torch.cat(p) if p else torch.zeros(0, device=sel.y.device)


def _log_softmax(z: Tensor, temperature: float) -> Tensor:
    """log softmax(z / T) in at least float32.  [N,V] -> [N,V]"""
    z = upcast(z)
    return torch.log_softmax(z if temperature == 1.0 else z / temperature, dim=-1)


def _kl_from_logp(logp: Tensor, logq: Tensor) -> Tensor:
    """KL(p || q) = sum_v p (log p - log q), with 0 log 0 = 0.  [N,V] -> [N]"""
    p = logp.exp()
    diff = torch.where(p > 0, logp - logq, 0.0)  # no nan from -inf - -inf, nor in grads
    return (p * diff).sum(-1)


def log_softmax_(x: Tensor, temperature: float, scratch: Tensor) -> Tensor:
    """x := log softmax(x / T), in place (scratch: a block of x's shape to work in).  [C,V] -> [C,V]"""
    if temperature != 1.0:
        x.div_(temperature)
    m = x.amax(-1, keepdim=True)  #                                                   [C,1]
    lse = torch.sub(x, m, out=scratch).exp_().sum(-1, keepdim=True).log_().add_(m)  # log sum_v e^x
    return x.sub_(lse)


def forward_kl_with_grad(s: Tensor, t: Tensor, temperature: float, scratch: Tensor) -> tuple[Tensor, Tensor]:
    """KL(p || q) and dKL/ds = (q - p) / T, overwriting s (the gradient), t and scratch.  -> [C], [C,V]"""
    logq, logp = log_softmax_(s, temperature, scratch), log_softmax_(t, temperature, scratch)
    p = torch.exp(logp, out=scratch)
    terms = logp.sub_(logq).mul_(p)  # p (log p - log q), in t's storage
    # a class the teacher rules out (logit -inf) gives 0 * -inf = nan: 0 log 0 = 0. nansum skips exactly those
    # (nan only arises where p = 0) and equals sum bit for bit elsewhere: no data-dependent branch, no host sync
    kl = terms.nansum(-1)
    grad = logq.exp_().sub_(p)
    return kl, grad if temperature == 1.0 else grad.div_(temperature)


def reverse_kl_with_grad(s: Tensor, t: Tensor, temperature: float, scratch: Tensor) -> tuple[Tensor, Tensor]:
    """KL(q || p) and dKL/ds = q (log q - log p - KL) / T, overwriting s (the gradient), t and scratch."""
    logq, logp = log_softmax_(s, temperature, scratch), log_softmax_(t, temperature, scratch)
    q = torch.exp(logq, out=scratch)
    gap = logq.sub_(logp)  # log q - log p, in s's storage
    terms = torch.mul(gap, q, out=t)
    # a class the student rules out (logit -inf, or q = 0 where the teacher's is -inf): 0 * inf = nan, and
    # 0 log 0 = 0 with no gradient there. nan arises only where q = 0: nansum skips it (and equals sum bit for
    # bit elsewhere), nan_to_num_ zeroes it in the gradient (infinities kept): no branch, no host sync
    kl = terms.nansum(-1)
    grad = gap.sub_(kl.unsqueeze(-1)).mul_(q).nan_to_num_(0.0, float("inf"), float("-inf"))
    return kl, grad if temperature == 1.0 else grad.div_(temperature)


class _ClosedFormKL(torch.autograd.Function):
    """KL at temperature T between the student's and a constant teacher's logits, with the gradient in the
    student's logits written out (`forward_kl_with_grad`, `reverse_kl_with_grad`) instead of traced through
    log_softmax, exp and the 0 log 0 mask; computed with the value and kept as the one [N,V] tensor backward
    needs."""

    @staticmethod
    def forward(ctx, s: Tensor, t: Tensor, temperature: float, reverse: bool) -> Tensor:
        work = upcast(s).dtype
        s_, t_ = s.to(work, copy=True), t.to(work, copy=True)
        with_grad = reverse_kl_with_grad if reverse else forward_kl_with_grad
        kl, grad = with_grad(s_, t_, temperature, torch.empty_like(s_))
        ctx.save_for_backward(grad)
        ctx.dtype = s.dtype
        return kl

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g: Tensor):
        (grad,) = ctx.saved_tensors
        return grad.mul_(g.unsqueeze(-1)).to(ctx.dtype), None, None, None


def _kl(s: Tensor, t: Tensor, temperature: float, reverse: bool) -> Tensor:
    if t.requires_grad:  # a teacher with gradients (never in training): trace the generic formula
        logq, logp = _log_softmax(s, temperature), _log_softmax(t, temperature)
        return _kl_from_logp(logq, logp) if reverse else _kl_from_logp(logp, logq)
    return _ClosedFormKL.apply(s, t, temperature, reverse)


@criterion("forward_kl", reference=R.forward_kl_d, sparse=sparse_forward_kl, closed_form=forward_kl_with_grad)
def forward_kl(
    s: Tensor, t: Tensor, y: Tensor, *, temperature: float = 1.0, row: Tensor | None = None, u: Tensor | None = None
) -> Tensor:
    """KL(p_t || q_t) = sum_v p (log p - log q), at temperature T."""
    return _kl(s, t, temperature, reverse=False)


@criterion(
    "reverse_kl",
    reference=R.reverse_kl_d,
    closed_form=reverse_kl_with_grad,
    sparse=sparse_reverse_kl,
    sparse_forms=frozenset({"renormalized", "tail"}),  # random zeros give log 0; a raw sum below 1 goes negative
)
def reverse_kl(
    s: Tensor, t: Tensor, y: Tensor, *, temperature: float = 1.0, row: Tensor | None = None, u: Tensor | None = None
) -> Tensor:
    """KL(q_t || p_t) = sum_v q (log q - log p), at temperature T."""
    return _kl(s, t, temperature, reverse=True)


# ---- decoupled KD (Zhao et al. 2022) --------------------------------------------------------


def _binary_log(logp: Tensor, y: Tensor) -> Tensor:
    """log [p(y), 1 - p(y)] from log-probabilities, stably.  [N,V],[N] -> [N,2]"""
    is_y = torch.zeros_like(logp, dtype=torch.bool).scatter_(1, y.long().unsqueeze(-1), True)
    log_t = logp.gather(1, y.long().unsqueeze(-1)).squeeze(-1)
    log_rest = torch.logsumexp(logp.masked_fill(is_y, float("-inf")), dim=-1)
    return torch.stack([log_t, log_rest], dim=-1)


def _non_target_log(logp: Tensor, y: Tensor) -> Tensor:
    """log of the distribution renormalized over v != y (-inf at y).  [N,V] -> [N,V]"""
    is_y = torch.zeros_like(logp, dtype=torch.bool).scatter_(1, y.long().unsqueeze(-1), True)
    return torch.log_softmax(logp.masked_fill(is_y, float("-inf")), dim=-1)


def tckd(s: Tensor, t: Tensor, y: Tensor, temperature: float = 1.0) -> Tensor:
    """TCKD = KL(b^p || b^q), b = [p(y), 1 - p(y)] at temperature T.  [N]"""
    return _kl_from_logp(_binary_log(_log_softmax(t, temperature), y), _binary_log(_log_softmax(s, temperature), y))


def nckd(s: Tensor, t: Tensor, y: Tensor, temperature: float = 1.0) -> Tensor:
    """NCKD = KL(p^ || q^), p^(v) = p(v) / (1 - p(y)) over v != y, at temperature T.  [N]"""
    logp_hat = _non_target_log(_log_softmax(t, temperature), y)
    return _kl_from_logp(logp_hat, _non_target_log(_log_softmax(s, temperature), y))


@dataclass(frozen=True)
class DKDOptions:
    """alpha, beta >= 0: the weights of TCKD and NCKD, not both 0 (that would train on nothing)."""

    alpha: float = 1.0
    beta: float = 8.0

    def __post_init__(self):
        at_least("alpha", self.alpha, 0)
        at_least("beta", self.beta, 0)
        if self.alpha == 0 and self.beta == 0:
            raise OptionError("beta", self.beta, "> 0 when alpha=0 (the loss would be 0)")


@criterion("dkd", options=DKDOptions, reference=R.dkd_d, example={"alpha": 1.0, "beta": 2.0})
def dkd(
    s: Tensor,
    t: Tensor,
    y: Tensor,
    *,
    temperature: float = 1.0,
    alpha: float = 1.0,
    beta: float = 8.0,
    row: Tensor | None = None,
    u: Tensor | None = None,
) -> Tensor:
    """D = alpha * TCKD + beta * NCKD (Zhao et al. 2022), at temperature T; the objective adds T^2."""
    return alpha * tckd(s, t, y, temperature) + beta * nckd(s, t, y, temperature)


# ---- AT-KD (Zhong et al. 2024) --------------------------------------------------------------


def hard_mask(u_t: Tensor, hard_fraction: float) -> Tensor:
    """The ceil(hard_fraction * P) positions of largest u (at least 1; ties: lower index).  [P] -> bool[P]"""
    P = u_t.numel()
    n_hard = min(P, max(1, math.ceil(hard_fraction * P - 1e-9))) if P and hard_fraction > 0 else 0
    order = u_t.argsort(descending=True, stable=True)
    return torch.zeros(P, dtype=torch.bool, device=u_t.device).index_fill_(0, order[:n_hard], True)


@dataclass(frozen=True)
class ATKDOptions:
    """hard_fraction: the share of positions that are hard; easy_weight: the easy positions' weight; both in [0, 1]."""

    hard_fraction: float = 0.5
    easy_weight: float = 0.2

    def __post_init__(self):
        in_range("hard_fraction", self.hard_fraction, 0, 1)
        in_range("easy_weight", self.easy_weight, 0, 1)


def atkd_prepare(sel: Selected, *, hard_fraction: float, easy_weight: float) -> ChunkD:
    """AT-KD's split over the batch: hard = the top hard_fraction of u_t = 1 - p_t(x_{t+1}) over all
    selected positions (a no-grad teacher pass); then D_t is pointwise."""
    hard = hard_mask(1.0 - teacher_target_prob(sel), hard_fraction)  #                     bool[N]

    def d_atkd(s: Tensor, t: Tensor, sl: slice) -> Tensor:
        y, T = sel.y[sl], sel.temperature
        nc = nckd(s, t, y, T)
        return torch.where(hard[sl], (1.0 - easy_weight) * (tckd(s, t, y, T) + nc), easy_weight * nc)

    return d_atkd


@criterion(
    "atkd",
    options=ATKDOptions,
    reference=R.atkd_d,
    coupling="batch",
    needs=frozenset({"teacher"}),
    prepare=atkd_prepare,
)
def atkd(
    s: Tensor,
    t: Tensor,
    y: Tensor,
    *,
    temperature: float = 1.0,
    hard_fraction: float = 0.5,
    easy_weight: float = 0.2,
    row: Tensor | None = None,
    u: Tensor | None = None,
) -> Tensor:
    """u_t = 1 - p_t(x_{t+1}); over the positions passed in, the top hard_fraction by u_t are hard:
    D = easy_weight * NCKD (easy), (1 - easy_weight) * (TCKD + NCKD) (hard), so that
    mean_t D = (0.2 sum_easy NCKD + 0.8 sum_hard (TCKD + NCKD)) / P. The paper runs it at T = 1.
    """
    if not 0.0 <= hard_fraction <= 1.0 or not 0.0 <= easy_weight <= 1.0:
        raise ValueError(f"atkd hard_fraction={hard_fraction!r}, easy_weight={easy_weight!r}; both must be in [0, 1]")
    with torch.no_grad():
        u_t = 1.0 - _log_softmax(t, temperature).gather(1, y.long().unsqueeze(-1)).squeeze(-1).exp()  # [P]
    hard = hard_mask(u_t, hard_fraction)
    nc = nckd(s, t, y, temperature)
    return torch.where(hard, (1.0 - easy_weight) * (tckd(s, t, y, temperature) + nc), easy_weight * nc)


# ---- weighted KD ----------------------------------------------------------------------------


def weighted_scale(u: Tensor, row: Tensor) -> Tensor:
    """n_i w_t / sum_{t' in i} w_t' (1 where a sequence's w are all 0), w = u >= 0: weighted KD's factor.  [P]"""
    w = u.detach().double()
    if not bool(torch.isfinite(w).all()):
        raise ValueError("criterion 'weighted': u(t) must be finite at the positions passed in")
    if bool((w < -1e-5 * max(1.0, float(w.abs().max()))).any()):
        raise ValueError(
            "criterion 'weighted': w_t = u(t) must be >= 0; use a non-negative signal "
            "(or normalization=minmax, not zscore)"
        )
    w = w.clamp_min(0.0)
    n_rows = int(row.max().item()) + 1 if row.numel() else 0
    W = torch.zeros(n_rows, dtype=w.dtype, device=w.device).index_add(0, row, w)  # sum_t w_t      [rows]
    n = torch.zeros(n_rows, dtype=w.dtype, device=w.device).index_add(0, row, torch.ones_like(w))  # [rows]
    return torch.where(W[row] > 0, n[row] * w / W[row].clamp_min(1e-300), torch.ones_like(w))


def weighted_prepare(sel: Selected) -> ChunkD:
    """Weighted KD's factor n_i w_t / sum_{t' in i} w_t' needs only u and the rows; then D_t is pointwise."""
    assert sel.u is not None  # Criterion.over: it declares needs={"u"}
    scale = weighted_scale(sel.u, sel.row)  #                                                  [N]

    def d_weighted(s: Tensor, t: Tensor, sl: slice) -> Tensor:
        kl = forward_kl(s, t, sel.y[sl], temperature=sel.temperature)
        return kl * scale[sl].to(kl.dtype)

    return d_weighted


@criterion("weighted", reference=R.weighted_d, coupling="batch", needs=frozenset({"u"}), prepare=weighted_prepare)
def weighted(
    s: Tensor, t: Tensor, y: Tensor, *, temperature: float = 1.0, row: Tensor | None = None, u: Tensor | None = None
) -> Tensor:
    """D_t = n_i w_t KL_t / sum_{t' in i} w_t', w_t = u(t) detached, n_i = positions of sequence i passed in,
    so the objective's per-sequence mean gives sum_t w_t KL_t / sum_t w_t. Meant for unit-weight policies
    (all, top_k, random, gls, curriculum); a sequence whose w are all 0 falls back to the plain mean.
    """
    if u is None:
        raise ValueError("criterion 'weighted' needs a signal: w_t = u(t)")
    kl = forward_kl(s, t, y, temperature=temperature)  # KL_t                         [P]
    r = torch.zeros_like(y, dtype=torch.long) if row is None else row.long()
    scale = weighted_scale(u, r)  # n_i w_t / sum_t' w_t'                                 [P]
    return kl * scale.to(kl.dtype)
