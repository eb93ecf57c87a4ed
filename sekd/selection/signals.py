"""Importance signals u(t) (SPEC §4): per-position scores, computed without gradient in float32.

Each signal maps flat positions to scores: (s_logits [N,V], t_logits [N,V] | None, targets [N]) -> [N].
Working on flat positions keeps them chunk-friendly; `score` lays them back on [B,T] with
invalid positions at -inf, and applies the optional per-sequence normalization of combined signals.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from sekd.registry import Registry

SIGNALS = Registry("signal")


@dataclass(frozen=True)
class Signal:
    """A named sum of per-position terms; `needs_teacher` means teacher logits at every position."""

    name: str
    terms: tuple[Callable[..., Tensor], ...]
    needs_teacher: bool
    random: bool = False


def signal(name: str, *terms: Callable[..., Tensor], needs_teacher: bool, random: bool = False) -> Signal:
    sig = Signal(name, terms, needs_teacher, random)
    SIGNALS.register(name)(sig)
    return sig


def entropy(logits: Tensor) -> Tensor:
    """H(softmax(z)) per row.  [N,V] -> [N]"""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def student_entropy_term(s: Tensor, t: Tensor | None, y: Tensor) -> Tensor:
    """H(q_t)"""
    return entropy(s)


signal("student_entropy", student_entropy_term, needs_teacher=False)
signal("random", needs_teacher=False, random=True)

NORMALIZATIONS = ("sum", "zscore", "minmax")


def _normalize(x: Tensor, valid: Tensor, how: str) -> Tensor:
    """Per-sequence normalization of one term over its valid positions.  [B,T] -> [B,T]"""
    if how == "sum":
        return x
    n = valid.sum(-1, keepdim=True).clamp_min(1)
    xv = x.masked_fill(~valid, 0.0)
    if how == "zscore":
        mean = xv.sum(-1, keepdim=True) / n
        var = ((x - mean).masked_fill(~valid, 0.0) ** 2).sum(-1, keepdim=True) / n
        return (x - mean) / var.sqrt().clamp_min(1e-6)
    lo = x.masked_fill(~valid, float("inf")).amin(-1, keepdim=True)
    hi = x.masked_fill(~valid, float("-inf")).amax(-1, keepdim=True)
    return (x - lo) / (hi - lo).clamp_min(1e-6)


@torch.no_grad()
def score(
    sig: Signal,
    s_logits: Tensor,
    t_logits: Tensor | None,
    labels: Tensor,
    valid: Tensor,
    *,
    generator: torch.Generator | None = None,
    normalization: str = "sum",
) -> Tensor:
    """u(t) on [B,T] (-inf where not valid) from dense logits [B,T,V]."""
    if sig.needs_teacher and t_logits is None:
        raise ValueError(f"signal {sig.name!r} needs teacher logits at every position")
    B, T = labels.shape
    if sig.random:
        u = torch.rand(B, T, generator=generator, device="cpu").to(labels.device)
        return u.masked_fill(~valid, float("-inf"))
    rows, cols = valid.nonzero(as_tuple=True)
    y = labels[rows, cols]
    s = s_logits[rows, cols].float()
    t = t_logits[rows, cols].float() if t_logits is not None else None
    u = torch.zeros(B, T, dtype=torch.float32, device=labels.device)
    for term in sig.terms:
        x = torch.zeros(B, T, dtype=torch.float32, device=labels.device)
        x[rows, cols] = term(s, t, y).float()
        u = u + _normalize(x, valid, normalization)
    return u.masked_fill(~valid, float("-inf"))
