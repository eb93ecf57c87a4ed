"""The class axis (docs/method.md §6): which vocabulary classes C_t the divergence uses, and their target p~.

`full` keeps the dense teacher distribution; `rs_kd` (N i.i.d. draws from p_t, p~(v) = c_v / N: unbiased
for Full KD's gradient) and `top_k_truncation` (the teacher's `top` classes, renormalized: a biased
baseline) give a sparse target over C_t, compared by `sparse_forward_kl` with the student's full-vocabulary
softmax (no renormalization over C_t); a criterion declares whether it consumes one (criteria.py). Each is
a registered `ClassSampler`: it reads the teacher's logits at the selected positions (z_t [N,V]) and
nothing else, and `random` says whether it draws on each call. A random one takes the positions' keys
(`keys`, sekd/core/rng.py `PositionKeys`: position (r, c) draws from row r's per-sample key), so its draws
do not depend on the chunk, the batch or the rank; without keys it draws from the generator.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable, Mapping

import torch
from torch import Tensor

from sekd.core.registry import NoOptions, OptionError, Registry, at_least, in_range
from sekd.selection import references as R
from sekd.core.rng import PositionKeys
from sekd.core.tensors import upcast

CLASSES: Registry[ClassSampler] = Registry("class selector", call_time=("temperature", "generator", "keys", "student"))

# What p~ over C_t is, which decides the criteria that can read it (docs/method.md §6):
FORMS = {
    "draws": "an unbiased random estimate of p_t (sums to 1)",
    "renormalized": "p_t renormalized over C_t (sums to 1)",
    "raw": "p_t on C_t, the missing mass dropped (sums to less than 1)",
    "tail": "p_t on C_t plus one tail class holding the missing mass",
}


@dataclass
class SparseTarget:
    """p~ over C_t per position: ids/probs/mask [N,K], padded where mask is False; `tail` [N]: the
    teacher's mass outside C_t, one extra "ghost" class (a tail target), else None; `form`: what p~ is."""

    ids: Tensor
    probs: Tensor
    mask: Tensor
    tail: Tensor | None = None
    form: str = "draws"

    def take(self, index: Tensor) -> "SparseTarget":
        """The targets of a subset of positions.  index [M] -> [M,K]"""
        tail = self.tail[index] if self.tail is not None else None
        return SparseTarget(self.ids[index], self.probs[index], self.mask[index], tail, self.form)

    def to(self, device: torch.device | str) -> "SparseTarget":
        tail = self.tail.to(device) if self.tail is not None else None
        return SparseTarget(self.ids.to(device), self.probs.to(device), self.mask.to(device), tail, self.form)


def in_support(target: SparseTarget, vocab: int) -> Tensor:
    """v in C_t per position (padding ignored, repeated ids counted once).  -> bool [N,V]"""
    hits = torch.zeros(target.ids.shape[0], vocab, dtype=torch.int32, device=target.ids.device)
    return hits.scatter_add_(1, target.ids, target.mask.to(torch.int32)) > 0


def log_outside(logits: Tensor, target: SparseTarget) -> Tensor:
    """log of the mass softmax(logits) puts outside C_t (-inf where C_t = V).  [N,V] -> [N]"""
    outside = logits.masked_fill(in_support(target, logits.shape[-1]), float("-inf")).logsumexp(-1)
    return outside - logits.logsumexp(-1)


def _xlogy_ratio(a: Tensor, log_a: Tensor, log_b: Tensor) -> Tensor:
    """a (log a - log b), 0 where a = 0 (0 log 0 = 0; the where sits inside the product, so a log of 0
    sends no nan into the gradient)."""
    return a * torch.where(a > 0, log_a - log_b, torch.zeros_like(a))


def sparse_forward_kl(s: Tensor, target: SparseTarget, temperature: float = 1.0) -> Tensor:
    """sum_{v in C_t} p~(v) (log p~(v) - log q_t(v)), q_t the full-vocabulary softmax; a tail target adds
    p~_tail (log p~_tail - log q_tail), q_tail = the student's mass outside C_t.  [N,V] -> [N]"""
    z = upcast(s) / temperature
    logq = torch.log_softmax(z, dim=-1).gather(1, target.ids)  # [N,K]
    p = target.probs.to(logq.dtype).masked_fill(~target.mask, 0.0)
    d = _xlogy_ratio(p, p.clamp_min(1e-30).log(), logq).sum(-1)
    if target.tail is not None:
        tail = target.tail.to(logq.dtype)
        d = d + _xlogy_ratio(tail, tail.clamp_min(1e-30).log(), log_outside(z, target))
    return d


def sparse_reverse_kl(s: Tensor, target: SparseTarget, temperature: float = 1.0) -> Tensor:
    """KL(q || p~) over C_t, a distribution there: a renormalized target against the student renormalized
    over C_t; a tail target against the student's mass on C_t and its tail (both coarsened to C_t + 1
    classes). Only targets that sum to 1 without random zeros have a finite, >= 0 reverse KL.  [N,V] -> [N]"""
    z = upcast(s) / temperature
    p = target.probs.to(z.dtype).masked_fill(~target.mask, 0.0)
    logp = p.clamp_min(1e-30).log()
    at = z.gather(1, target.ids).masked_fill(~target.mask, float("-inf"))  # [N,K]
    if target.tail is None:
        logq = torch.log_softmax(at, dim=-1)
        return _xlogy_ratio(logq.exp(), logq, logp).sum(-1)
    logq = at - z.logsumexp(-1, keepdim=True)
    log_tail_q = log_outside(z, target)
    tail = target.tail.to(z.dtype)
    d = _xlogy_ratio(logq.exp(), logq, logp).sum(-1)
    return d + _xlogy_ratio(log_tail_q.exp(), log_tail_q, tail.clamp_min(1e-30).log())


@dataclass(frozen=True)
class RSKDOptions:
    """n_draws: N, the draws from p_t per position, >= 1."""

    n_draws: int = 64

    def __post_init__(self):
        at_least("n_draws", self.n_draws, 1)


NORMALIZATIONS = ("renormalized", "raw")
SUPPORT_NORMALIZATIONS = ("renormalized", "raw", "tail")  # a chosen support's three readings


def _normalization(value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise OptionError("normalization", value, f"one of: {', '.join(allowed)}")


@dataclass(frozen=True)
class TruncationOptions:
    """top: how many of the teacher's most likely classes to keep, >= 1 (0 would train on nothing);
    normalization: `renormalized` (p_t over the support, summing to 1) or `raw` (p_t as it is, the missing
    mass dropped: the two readings frameworks give a stored top-k)."""

    top: int = 64
    normalization: str = "renormalized"

    def __post_init__(self):
        at_least("top", self.top, 1)
        _normalization(self.normalization, NORMALIZATIONS)


@dataclass(frozen=True)
class TopKOptions:
    """top: how many classes to keep, >= 1."""

    top: int = 64

    def __post_init__(self):
        at_least("top", self.top, 1)


@dataclass(frozen=True)
class StudentTopKOptions:
    """top: how many of the student's (union: each model's) most likely classes, >= 1; normalization:
    p_t over them `renormalized`, `raw`, or raw with a `tail` class holding the rest."""

    top: int = 64
    normalization: str = "renormalized"

    def __post_init__(self):
        at_least("top", self.top, 1)
        _normalization(self.normalization, SUPPORT_NORMALIZATIONS)


@dataclass(frozen=True)
class TopPOptions:
    """p: the teacher's mass the support must hold, in (0, 1]; max_k: the most classes it may take, >= 1."""

    p: float = 0.9
    max_k: int = 64

    def __post_init__(self):
        in_range("p", self.p, 0, 1, open_lo=True)
        at_least("max_k", self.max_k, 1)


@dataclass(frozen=True)
class RSKDTailOptions:
    """top: the teacher's most likely classes kept exactly, >= 0; n_draws: draws from the rest, >= 1."""

    top: int = 8
    n_draws: int = 16

    def __post_init__(self):
        at_least("top", self.top, 0)
        at_least("n_draws", self.n_draws, 1)


@dataclass(frozen=True)
class ClassSampler:
    """A registered class selector: (z_t [N,V], *, temperature, generator, keys, student) -> p~ over C_t [N,K].

    random: draws on each call; form: what p~ is (FORMS; a sampler with a `normalization` option has that
    form instead); needs_student: C_t depends on the student's logits (`student` [N,V], detached), so no
    offline cache can hold it."""

    name: str
    fn: Callable[..., SparseTarget]
    random: bool
    form: str = "renormalized"
    needs_student: bool = False
    options: Mapping[str, Any] = field(default_factory=dict)
    reference: Callable[..., Tensor] | None = None  # E[p~] dense [N,V] (+ a tail column) in float64
    example: Mapping[str, Any] = field(default_factory=dict)  # options the conformance kit runs it with

    def __post_init__(self):
        if self.form not in FORMS:
            raise ValueError(f"class sampler {self.name!r}: form={self.form!r}; allowed: {', '.join(FORMS)}")

    def __call__(self, t: Tensor, **kw: Any) -> SparseTarget:
        if not self.needs_student:
            kw.pop("student", None)
        elif kw.get("student") is None:
            raise ValueError(f"class sampler {self.name!r} chooses classes by the student: it needs its logits")
        target = self.fn(t, **{**self.options, **kw})
        return target if target.form == self.form_of() else replace(target, form=self.form_of())  # as declared

    def bind(self, **options: Any) -> "ClassSampler":
        return replace(self, options=dict(options))

    def form_of(self, options: Mapping[str, Any] | None = None) -> str:
        """The form of p~ under `options` (default: the bound ones)."""
        return str({**self.options, **(options or {})}.get("normalization", self.form))


def class_sampler(
    name: str,
    options: type = NoOptions,
    *,
    random: bool,
    form: str = "renormalized",
    needs_student: bool = False,
    reference: Callable[..., Tensor] | None = None,
    example: Mapping[str, Any] | None = None,
) -> Callable[[Callable], ClassSampler]:
    """Register `fn` as the class selector `name`, with what it declares (see `ClassSampler`); `reference`:
    the target in expectation, (t [N,V] float64, *, temperature, [student,] **options) -> [N,V], with one
    more column (the tail's mass) for a tail target."""

    def add(fn: Callable[..., SparseTarget]) -> ClassSampler:
        piece = ClassSampler(name, fn, random, form, needs_student, reference=reference, example=dict(example or {}))
        CLASSES.register(name, options=options)(piece)
        return piece

    return add


def on_support(t: Tensor, ids: Tensor, mask: Tensor, normalization: str) -> SparseTarget:
    """p~ on the support `ids` [N,K] (mask: which are real) of the scaled teacher logits t [N,V]: p_t
    renormalized over it, raw, or raw with the tail class (its mass from the logits outside, not 1 - sum)."""
    lse = t.logsumexp(-1, keepdim=True)
    p = (t.gather(1, ids) - lse).exp().masked_fill(~mask, 0.0)
    if normalization == "renormalized":
        return SparseTarget(ids, p / p.sum(-1, keepdim=True), mask, form="renormalized")
    if normalization == "raw":
        return SparseTarget(ids, p, mask, form="raw")
    target = SparseTarget(ids, p, mask, form="tail")
    target.tail = log_outside(t, target).exp()
    return target


@class_sampler(
    "rs_kd", RSKDOptions, random=True, form="draws", reference=R.teacher_distribution, example={"n_draws": 8}
)
def rs_kd(
    t: Tensor,
    *,
    n_draws: int = 64,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
    keys: PositionKeys | None = None,
) -> SparseTarget:
    """C_t = distinct ids among N draws from p_t = softmax(z_t / T); p~(v) = c_v / N.  [N,V] -> [N,K]
    With `keys` (one per row of t), position n's N uniforms come from its row's per-sample key."""
    from sekd.selection.draws import rs_kd_draws, to_sparse

    u = keys.uniform(n_draws, "rs_kd classes", t.device) if keys is not None else None
    ids, counts, offsets = rs_kd_draws(t, n_draws, temperature, generator, u=u)
    ids_pad, probs_pad, mask = to_sparse(ids, counts, offsets, n_draws)
    return SparseTarget(ids_pad.to(t.device), probs_pad.to(t.device), mask.to(t.device))


@class_sampler(
    "rs_kd_tail",
    RSKDTailOptions,
    random=True,
    form="draws",
    reference=R.head_and_tail_draws,
    example={"top": 2, "n_draws": 4},
)
def rs_kd_tail(
    t: Tensor,
    *,
    top: int = 8,
    n_draws: int = 16,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
    keys: PositionKeys | None = None,
) -> SparseTarget:
    """The teacher's `top` classes exactly, and N draws from the rest renormalized, each weighing
    p_tail c_v / N: p~ = p_t on the head, an unbiased estimate of it on the tail.  [N,V] -> [N,top+K]"""
    z = upcast(t) / temperature
    head = top_k_truncation(z, top=top, normalization="raw") if top else None
    rest = z if head is None else z.masked_fill(in_support(head, z.shape[-1]), float("-inf"))
    log_tail = rest.logsumexp(-1, keepdim=True) - z.logsumexp(-1, keepdim=True)  # [N,1], -inf where top >= V
    empty = torch.isinf(log_tail)
    drawn = rs_kd(rest.masked_fill(empty, 0.0), n_draws=n_draws, generator=generator, keys=keys)
    weight = log_tail.exp().masked_fill(empty, 0.0)  # a position with no tail draws, at weight 0
    drawn.probs = drawn.probs.to(z.dtype) * weight
    if head is None:
        return drawn
    return SparseTarget(
        torch.cat([head.ids, drawn.ids], 1),
        torch.cat([head.probs, drawn.probs], 1),
        torch.cat([head.mask, drawn.mask], 1),
        form="draws",
    )


@class_sampler(
    "top_k_truncation", TruncationOptions, random=False, reference=R.truncated_distribution, example={"top": 5}
)
def top_k_truncation(
    t: Tensor,
    *,
    top: int = 64,
    normalization: str = "renormalized",
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
    keys: PositionKeys | None = None,
) -> SparseTarget:
    """C_t = the teacher's `top` most likely classes; p~ = p_t renormalized over them, or p_t itself
    (`raw`: the missing mass dropped).  [N,V] -> [N,K]"""
    t = upcast(t) / temperature
    ids = t.topk(min(top, t.shape[-1]), dim=-1).indices
    return on_support(t, ids, torch.ones_like(ids, dtype=torch.bool), normalization)


@class_sampler("top_k_tail", TopKOptions, random=False, form="tail", reference=R.tail_distribution, example={"top": 4})
def top_k_tail(
    t: Tensor,
    *,
    top: int = 64,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
    keys: PositionKeys | None = None,
) -> SparseTarget:
    """C_t = the teacher's `top` most likely classes with p~ = p_t there, plus one tail class holding
    1 - sum_{C_t} p_t (the "ghost token"), matched by the student's mass outside C_t.  [N,V] -> [N,K]"""
    t = upcast(t) / temperature
    ids = t.topk(min(top, t.shape[-1]), dim=-1).indices
    return on_support(t, ids, torch.ones_like(ids, dtype=torch.bool), "tail")


@class_sampler("top_p", TopPOptions, random=False, reference=R.nucleus_distribution, example={"p": 0.5, "max_k": 6})
def top_p(
    t: Tensor,
    *,
    p: float = 0.9,
    max_k: int = 64,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
    keys: PositionKeys | None = None,
) -> SparseTarget:
    """C_t = the fewest most likely classes holding `p` of p_t (at most `max_k`: a per-position size);
    p~ = p_t renormalized over them.  [N,V] -> [N,K], padded where the support is smaller"""
    t = upcast(t) / temperature
    vals, ids = t.topk(min(max_k, t.shape[-1]), dim=-1)
    probs = (vals - t.logsumexp(-1, keepdim=True)).exp()
    mask = probs.cumsum(-1) - probs < p  # every class the ones before it leave short of p; the first always
    kept = probs.masked_fill(~mask, 0.0)
    return SparseTarget(ids, kept / kept.sum(-1, keepdim=True), mask, form="renormalized")


@class_sampler(
    "student_top_k",
    StudentTopKOptions,
    random=False,
    needs_student=True,
    reference=R.student_top_distribution,
    example={"top": 4, "normalization": "tail"},
)
def student_top_k(
    t: Tensor,
    *,
    student: Tensor,
    top: int = 64,
    normalization: str = "renormalized",
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
    keys: PositionKeys | None = None,
) -> SparseTarget:
    """C_t = the student's `top` most likely classes; p~ = p_t there (normalization).  [N,V] -> [N,K]"""
    ids = student.detach().topk(min(top, t.shape[-1]), dim=-1).indices
    return on_support(upcast(t) / temperature, ids, torch.ones_like(ids, dtype=torch.bool), normalization)


@class_sampler(
    "union_top_k",
    StudentTopKOptions,
    random=False,
    needs_student=True,
    reference=R.union_top_distribution,
    example={"top": 3},
)
def union_top_k(
    t: Tensor,
    *,
    student: Tensor,
    top: int = 64,
    normalization: str = "renormalized",
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
    keys: PositionKeys | None = None,
) -> SparseTarget:
    """C_t = the teacher's `top` classes and the student's together (top to 2 top of them); p~ = p_t there
    (normalization).  [N,V] -> [N,2K], padded where the two agree"""
    k = min(top, t.shape[-1])
    mine, theirs = t.topk(k, dim=-1).indices, student.detach().topk(k, dim=-1).indices
    repeated = (theirs.unsqueeze(-1) == mine.unsqueeze(-2)).any(-1)  # the student's picks the teacher has  [N,K]
    ids = torch.cat([mine, theirs], 1)
    mask = torch.cat([torch.ones_like(repeated), ~repeated], 1)
    return on_support(upcast(t) / temperature, ids, mask, normalization)


def build_classes(name: str, **opts: Any) -> ClassSampler | None:
    """None for `full` (the dense distribution), else the bound class selector."""
    if name == "full":
        return None
    return CLASSES.build(name, **opts)
