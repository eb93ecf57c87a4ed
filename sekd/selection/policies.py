"""Selection policies m_t (SPEC §5): which positions of each sequence get teacher supervision.

A policy maps scores u [B,T] (-inf where invalid) and the valid mask to `Draws`: per sequence, the
selected positions in draw order with one weight each (repeats allowed for sampling policies).
All take keyword options bound at build time, plus `generator` and `step` at call time.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from sekd.registry import Registry

POLICIES = Registry("policy")


@dataclass
class Draws:
    """Selected positions per sequence: index/weight/mask [B,K], padded where mask is False."""

    index: Tensor
    weight: Tensor
    mask: Tensor

    def count(self) -> Tensor:
        """sum_t m_t per sequence (number of draws).  [B]"""
        return self.mask.sum(-1).to(self.weight.dtype)

    def dense(self, T: int) -> Tensor:
        """m_t * w_t laid on positions, repeats summed.  [B,T]"""
        out = torch.zeros(self.index.shape[0], T, dtype=self.weight.dtype, device=self.weight.device)
        return out.scatter_add_(1, self.index, self.weight * self.mask)

    @staticmethod
    def from_mask(m: Tensor, order: Tensor | None = None) -> "Draws":
        """Unit-weight draws from a boolean mask [B,T]; `order` [B,T] ranks them (default: position)."""
        B, T = m.shape
        K = int(m.sum(-1).max().item()) if m.numel() else 0
        key = torch.arange(T, device=m.device).expand(B, T).float() if order is None else order.float()
        key = key.masked_fill(~m, float("inf"))
        index = key.argsort(-1, stable=True)[:, :K]
        mask = torch.gather(m, 1, index)
        return Draws(index, torch.ones(B, K, device=m.device), mask)


def n_select(valid: Tensor, k: float) -> Tensor:
    """n_sel = ceil(k * n_valid), at least 1 when n_valid >= 1.  [B]"""
    n_valid = valid.sum(-1)
    n = torch.ceil(n_valid.double() * k - 1e-9).long()
    return torch.minimum(n.clamp_min(1), n_valid)


def rank_desc(u: Tensor) -> Tensor:
    """Rank of each position by descending u, ties broken by lower position.  [B,T] -> [B,T]"""
    order = u.argsort(-1, descending=True, stable=True)
    return order.argsort(-1)


@POLICIES.register("all")
def all_positions(u: Tensor, valid: Tensor, *, generator=None, step: int = 0) -> Draws:
    """m_t = valid(t): Full KD."""
    return Draws.from_mask(valid)


@POLICIES.register("top_k")
def top_k(u: Tensor, valid: Tensor, *, k: float, generator=None, step: int = 0) -> Draws:
    """m_t = 1 for the ceil(k * n_valid) largest u(t) of each sequence."""
    rank = rank_desc(u)
    m = (rank < n_select(valid, k).unsqueeze(-1)) & valid
    return Draws.from_mask(m, order=rank)


@POLICIES.register("random")
def random_positions(u: Tensor, valid: Tensor, *, k: float, generator=None, step: int = 0) -> Draws:
    """ceil(k * n_valid) valid positions uniformly without replacement."""
    noise = torch.rand(valid.shape, generator=generator).to(valid.device).masked_fill(~valid, -1.0)
    rank = rank_desc(noise)
    m = (rank < n_select(valid, k).unsqueeze(-1)) & valid
    return Draws.from_mask(m, order=rank)


def budget_fraction(k: float) -> str:
    """k as the paper writes it (0.2 -> '20%')."""
    pct = k * 100
    return f"{pct:g}%" if not math.isclose(pct, round(pct)) else f"{round(pct)}%"
