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

CLASSES: Registry[ClassSampler] = Registry("class selector", call_time=("temperature", "generator", "keys"))


@dataclass
class SparseTarget:
    """p~ over C_t per position: ids/probs/mask [N,K], padded where mask is False."""

    ids: Tensor
    probs: Tensor
    mask: Tensor

    def take(self, index: Tensor) -> "SparseTarget":
        """The targets of a subset of positions.  index [M] -> [M,K]"""
        return SparseTarget(self.ids[index], self.probs[index], self.mask[index])

    def to(self, device: torch.device | str) -> "SparseTarget":
        return SparseTarget(self.ids.to(device), self.probs.to(device), self.mask.to(device))


def sparse_forward_kl(s: Tensor, target: SparseTarget, temperature: float = 1.0) -> Tensor:
    """sum_{v in C_t} p~(v) (log p~(v) - log q_t(v)), q_t the full-vocabulary softmax.  [N,V] -> [N]"""
    s = upcast(s)
    logq = torch.log_softmax(s / temperature, dim=-1).gather(1, target.ids)  # [N,K]
    p = target.probs.to(logq.dtype).masked_fill(~target.mask, 0.0)
    logp = torch.where(target.mask, p.clamp_min(1e-30).log(), torch.zeros_like(p))
    return (p * (logp - logq)).sum(-1)


@dataclass(frozen=True)
class RSKDOptions:
    """n_draws: N, the draws from p_t per position, >= 1."""

    n_draws: int = 64

    def __post_init__(self):
        at_least("n_draws", self.n_draws, 1)


NORMALIZATIONS = ("renormalized", "raw")


@dataclass(frozen=True)
class TruncationOptions:
    """top: how many of the teacher's most likely classes to keep, >= 1 (0 would train on nothing);
    normalization: `renormalized` (p_t over the support, summing to 1) or `raw` (p_t as it is, the missing
    mass dropped: the two readings frameworks give a stored top-k)."""

    top: int = 64
    normalization: str = "renormalized"

    def __post_init__(self):
        at_least("top", self.top, 1)
        if self.normalization not in NORMALIZATIONS:
            raise OptionError("normalization", self.normalization, f"one of: {', '.join(NORMALIZATIONS)}")


@dataclass(frozen=True)
class TopPOptions:
    """p: the teacher's mass the support must hold, in (0, 1]; max_k: the most classes it may take, >= 1."""

    p: float = 0.9
    max_k: int = 64

    def __post_init__(self):
        in_range("p", self.p, 0, 1, open_lo=True)
        at_least("max_k", self.max_k, 1)


@dataclass(frozen=True)
class ClassSampler:
    """A registered class selector: (z_t [N,V], *, temperature, generator) -> p~ over C_t [N,K]."""

    name: str
    fn: Callable[..., SparseTarget]
    random: bool  # draws from the generator on each call
    options: Mapping[str, Any] = field(default_factory=dict)
    reference: Callable[..., Tensor] | None = None  # E[p~] dense [N,V] in float64 (sekd.testing)
    example: Mapping[str, Any] = field(default_factory=dict)  # options the conformance kit runs it with

    def __call__(self, t: Tensor, **kw: Any) -> SparseTarget:
        return self.fn(t, **{**self.options, **kw})

    def bind(self, **options: Any) -> "ClassSampler":
        return replace(self, options=dict(options))


def class_sampler(
    name: str,
    options: type = NoOptions,
    *,
    random: bool,
    reference: Callable[..., Tensor] | None = None,
    example: Mapping[str, Any] | None = None,
) -> Callable[[Callable], ClassSampler]:
    """Register `fn` as the class selector `name`, with what it declares (see `ClassSampler`); `reference`:
    the target distribution in expectation, (t [N,V] float64, *, temperature, **options) -> [N,V]."""

    def add(fn: Callable[..., SparseTarget]) -> ClassSampler:
        piece = ClassSampler(name, fn, random, reference=reference, example=dict(example or {}))
        CLASSES.register(name, options=options)(piece)
        return piece

    return add


@class_sampler("rs_kd", RSKDOptions, random=True, reference=R.teacher_distribution, example={"n_draws": 8})
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
    vals, ids = t.topk(min(top, t.shape[-1]), dim=-1)
    probs = torch.softmax(vals, -1) if normalization == "renormalized" else (vals - t.logsumexp(-1, keepdim=True)).exp()
    return SparseTarget(ids, probs, torch.ones_like(ids, dtype=torch.bool))


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
    return SparseTarget(ids, kept / kept.sum(-1, keepdim=True), mask)


def build_classes(name: str, **opts: Any) -> ClassSampler | None:
    """None for `full` (the dense distribution), else the bound class selector."""
    if name == "full":
        return None
    return CLASSES.build(name, **opts)
