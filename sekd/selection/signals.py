"""Importance signals u(t) (docs/method.md §4): per-position scores, computed without gradient in float32.

Each signal is a sum of terms; a term maps flat positions to scores:
(s_logits [N,V], t_logits [N,V] | None, targets [N], *, temperature) -> [N].
Working on flat positions keeps them chunk-friendly; `score` lays them back on [B,T] with
invalid positions at -inf, and applies the optional per-sequence normalization of combined signals.

Entropies use the raw logits (T = 1); divergences and cross-entropies use the KD temperature T.
`ce_ratio_plus_student_entropy` adds H(q_t) / ln|V|, as the paper's runs computed it (docs/method.md §4);
`ce_ratio_plus_student_entropy_unscaled` is the plain sum ce_ratio + H(q_t).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from sekd.core.registry import Registry
from sekd.core.rng import RowKeys, row_keys
from sekd.selection import references as R

SIGNALS: Registry[Signal] = Registry("signal")
CE_RATIO_EPS = 1e-6


@dataclass(frozen=True)
class Signal:
    """A named sum of per-position terms, and what it declares to a flow: with `terms`, u(t) is pointwise
    (any chunking of positions gives the same terms; only the per-sequence normalization, `normalize`,
    needs the whole row); `needs_teacher`: the teacher's logits at every valid position, not only the
    selected ones; `random`: u(t) is drawn (T uniforms per row from its per-sample key, sekd/core/rng.py
    `RowKeys`, or from keys drawn from the generator), not computed from logits; `reference`: u(t) in
    float64 written plainly, (s [N,V], t [N,V] | None, y [N], *, temperature) -> [N] (sekd.testing)."""

    name: str
    terms: tuple[Callable[..., Tensor], ...]  # (s [N,V], t [N,V] | None, y [N], *, temperature) -> [N]
    needs_teacher: bool
    random: bool = False
    reference: Callable[..., Tensor] | None = None


def combined_signal(
    name: str,
    *terms: Callable[..., Tensor],
    needs_teacher: bool,
    random: bool = False,
    reference: Callable[..., Tensor] | None = None,
) -> Signal:
    """Register u(t) = the sum of `terms` as the signal `name` (no terms and random=True: drawn scores)."""
    if random == bool(terms):
        raise ValueError(f"signal {name!r}: a signal has terms, or is random with none")
    sig = Signal(name, terms, needs_teacher, random, reference)
    SIGNALS.register(name)(sig)
    return sig


def signal(
    name: str, *, needs_teacher: bool, reference: Callable[..., Tensor] | None = None
) -> Callable[[Callable[..., Tensor]], Callable[..., Tensor]]:
    """Decorator: register one term (s, t, y, *, temperature) -> [N] as the signal `name`; the term is
    returned unchanged, so `combined_signal` can sum it with others."""

    def add(term: Callable[..., Tensor]) -> Callable[..., Tensor]:
        combined_signal(name, term, needs_teacher=needs_teacher, reference=reference)
        return term

    return add


# ---- per-row quantities ---------------------------------------------------------------------


def entropy(logits: Tensor) -> Tensor:
    """H(softmax(z)) per row.  [N,V] -> [N]"""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def cross_entropy(logits: Tensor, y: Tensor, temperature: float = 1.0) -> Tensor:
    """-log softmax(z / T)[y] per row.  [N,V],[N] -> [N]"""
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    return -logp.gather(-1, y.long().unsqueeze(-1)).squeeze(-1)


def kl_div(p_logits: Tensor, q_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """KL(p || q) = sum_v p (log p - log q), p = softmax(z_p / T), q = softmax(z_q / T).  [N,V] -> [N]"""
    logp = torch.log_softmax(p_logits.float() / temperature, dim=-1)
    logq = torch.log_softmax(q_logits.float() / temperature, dim=-1)
    return (logp.exp() * (logp - logq)).sum(-1)


def _teacher(t: Tensor | None) -> Tensor:
    if t is None:
        raise ValueError("this signal term needs teacher logits")
    return t


# ---- terms: (s, t, y, *, temperature) -> [N] ------------------------------------------------


@signal("student_entropy", needs_teacher=False, reference=R.student_entropy)
def student_entropy_term(s: Tensor, t: Tensor | None, y: Tensor, *, temperature: float = 1.0) -> Tensor:
    """H(q_t), raw logits (T = 1)."""
    return entropy(s)


def student_entropy_per_log_v_term(s: Tensor, t: Tensor | None, y: Tensor, *, temperature: float = 1.0) -> Tensor:
    """H(q_t) / ln|V|, raw logits (T = 1): entropy in [0, 1]. |V| is the logits' width, whole in every chunk."""
    return entropy(s) / math.log(s.shape[-1])


@signal("teacher_entropy", needs_teacher=True, reference=R.teacher_entropy)
def teacher_entropy_term(s: Tensor, t: Tensor | None, y: Tensor, *, temperature: float = 1.0) -> Tensor:
    """H(p_t), raw logits (T = 1)."""
    return entropy(_teacher(t))


@signal("student_ce", needs_teacher=False, reference=R.student_ce)
def student_ce_term(s: Tensor, t: Tensor | None, y: Tensor, *, temperature: float = 1.0) -> Tensor:
    """CE_s = -log q_t(x_{t+1}) at temperature T."""
    return cross_entropy(s, y, temperature)


@signal("teacher_ce", needs_teacher=True, reference=R.teacher_ce)
def teacher_ce_term(s: Tensor, t: Tensor | None, y: Tensor, *, temperature: float = 1.0) -> Tensor:
    """CE_t = -log p_t(x_{t+1}) at temperature T."""
    return cross_entropy(_teacher(t), y, temperature)


@signal("kl", needs_teacher=True, reference=R.kl)
def kl_term(s: Tensor, t: Tensor | None, y: Tensor, *, temperature: float = 1.0) -> Tensor:
    """KL(p_t || q_t) at temperature T."""
    return kl_div(_teacher(t), s, temperature)


@signal("reverse_kl", needs_teacher=True, reference=R.reverse_kl)
def reverse_kl_term(s: Tensor, t: Tensor | None, y: Tensor, *, temperature: float = 1.0) -> Tensor:
    """KL(q_t || p_t) at temperature T."""
    return kl_div(s, _teacher(t), temperature)


@signal("ce_ratio", needs_teacher=True, reference=R.ce_ratio)
def ce_ratio_term(s: Tensor, t: Tensor | None, y: Tensor, *, temperature: float = 1.0) -> Tensor:
    """CE_s / (CE_t + 1e-6) at temperature T."""
    return cross_entropy(s, y, temperature) / (cross_entropy(_teacher(t), y, temperature) + CE_RATIO_EPS)


combined_signal(
    "kl_plus_student_entropy", kl_term, student_entropy_term, needs_teacher=True, reference=R.kl_plus_student_entropy
)
combined_signal(
    "ce_ratio_plus_student_entropy",
    ce_ratio_term,
    student_entropy_per_log_v_term,
    needs_teacher=True,
    reference=R.ce_ratio_plus_student_entropy,
)
combined_signal(
    "ce_ratio_plus_student_entropy_unscaled",
    ce_ratio_term,
    student_entropy_term,
    needs_teacher=True,
    reference=R.ce_ratio_plus_student_entropy_unscaled,
)
combined_signal("random", needs_teacher=False, random=True)

# ---- laying scores on [B,T] -----------------------------------------------------------------

NORMALIZATIONS = ("sum", "zscore", "minmax")


def normalize(x: Tensor, valid: Tensor, how: str) -> Tensor:
    """Per-sequence normalization of one term over its valid positions.  [B,T] -> [B,T]"""
    if how == "sum":
        return x
    n = valid.sum(-1, keepdim=True).clamp_min(1)
    xv = x.masked_fill(~valid, 0.0)
    if how == "zscore":
        mean = xv.sum(-1, keepdim=True) / n
        var = ((x - mean).masked_fill(~valid, 0.0) ** 2).sum(-1, keepdim=True) / n
        return (x - mean) / var.sqrt().clamp_min(1e-6)
    if how == "minmax":
        lo = x.masked_fill(~valid, float("inf")).amin(-1, keepdim=True)
        hi = x.masked_fill(~valid, float("-inf")).amax(-1, keepdim=True)
        return (x - lo) / (hi - lo).clamp_min(1e-6)
    raise ValueError(f"signal normalization {how!r}; allowed: {', '.join(NORMALIZATIONS)}")


@torch.no_grad()
def importance_terms(sig: Signal, s: Tensor, t: Tensor | None, y: Tensor, *, temperature: float = 1.0) -> Tensor:
    """Each term of u on flat positions, float32.  [N,V],[N,V]|None,[N] -> [n_terms,N]"""
    if sig.random:
        raise ValueError(f"signal {sig.name!r} draws its scores; use `importance`")
    if sig.needs_teacher and t is None:
        raise ValueError(f"signal {sig.name!r} needs teacher logits at every position")
    return torch.stack([term(s, t, y, temperature=temperature).float() for term in sig.terms])


@torch.no_grad()
def importance(
    sig: Signal,
    s_logits: Tensor,
    t_logits: Tensor | None,
    labels: Tensor,
    valid: Tensor,
    *,
    generator: torch.Generator | None = None,
    normalization: str = "sum",
    temperature: float = 1.0,
    keys: RowKeys | None = None,
) -> Tensor:
    """u(t) on [B,T] (-inf where not valid) from dense logits [B,T,V]; terms summed after normalization."""
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"signal normalization {normalization!r}; allowed: {', '.join(NORMALIZATIONS)}")
    if sig.needs_teacher and t_logits is None:
        raise ValueError(f"signal {sig.name!r} needs teacher logits at every position")
    B, T = labels.shape
    if sig.random:
        keys = row_keys(B, keys=keys, generator=generator, who="random signal")
        u = keys.uniform([T] * B, "random signal", labels.device)  # [B,T]
        return u.masked_fill(~valid, float("-inf"))
    rows, cols = valid.nonzero(as_tuple=True)  # flat valid positions            [N]
    y = labels[rows, cols]
    s = s_logits[rows, cols]
    t = t_logits[rows, cols] if t_logits is not None else None
    u = torch.zeros(B, T, dtype=torch.float32, device=labels.device)
    for term in importance_terms(sig, s, t, y, temperature=temperature):  # [N] each
        x = torch.zeros(B, T, dtype=torch.float32, device=labels.device)
        x[rows, cols] = term
        u = u + normalize(x, valid, normalization)
    return u.masked_fill(~valid, float("-inf"))
