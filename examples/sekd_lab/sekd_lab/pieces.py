"""Two ideas a researcher might try beside the paper's, registered with sekd's public decorators.

disagreement_margin (a signal): how much the teacher prefers its own top class over the student's,
    u(t) = p_t(argmax p_t) - p_t(argmax q_t), in [0, 1): 0 where both models' favourite class agrees, near 1
    where the student's favourite is a class the teacher thinks unlikely. Raw logits (T = 1).
top_p (a policy): per sequence, the fewest positions, by descending u(t), whose importance covers a share p of
    the sequence's total: a budget that adapts to how concentrated u is (u >= 0).

Each declares its float64 reference beside it, written the obvious way; `sekd.testing` holds the fast code
to them (tests/test_pieces.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

import sekd

# ---- the signal -----------------------------------------------------------------------------


def margin_reference(s: Tensor, t: Tensor | None, y: Tensor, *, temperature: float = 1.0) -> Tensor:
    """One position at a time, in float64.  [N,V],[N,V],[N] -> [N]"""
    assert t is not None
    out = torch.empty(s.shape[0], dtype=torch.float64)
    for n in range(s.shape[0]):
        p = torch.softmax(t[n].double(), -1)
        out[n] = p.max() - p[int(s[n].argmax())]
    return out


@sekd.signal("disagreement_margin", needs_teacher=True, reference=margin_reference)
def disagreement_margin(s: Tensor, t: Tensor | None, y: Tensor, *, temperature: float = 1.0) -> Tensor:
    """p_t(teacher's top class) - p_t(student's top class) per position.  [N,V],[N,V],[N] -> [N]"""
    assert t is not None  # declared needs_teacher: the flows pass the teacher's logits
    p = torch.softmax(t.float(), -1)
    return p.max(-1).values - p.gather(-1, s.argmax(-1, keepdim=True)).squeeze(-1)


# ---- the policy -----------------------------------------------------------------------------


@dataclass(frozen=True)
class CoverageOptions:
    """p: the share of each sequence's total importance the selected positions cover, in (0, 1]."""

    p: float = 0.5

    def __post_init__(self):
        sekd.in_range("p", self.p, 0, 1, open_lo=True)


def top_p_reference(u: Tensor, valid: Tensor, *, step: int = 0, p: float = 0.5) -> Tensor:
    """The weight of each position (1 if selected), one sequence at a time in float64.  [B,T] -> [B,T]"""
    out = torch.zeros(u.shape, dtype=torch.float64)
    for b in range(u.shape[0]):
        positions = [i for i in range(u.shape[1]) if valid[b, i]]
        scores = {i: max(float(u[b, i]), 0.0) for i in positions}
        total, covered = sum(scores.values()), 0.0
        for i in sorted(positions, key=lambda i: (-scores[i], i)):  # ties: the lower position first
            out[b, i] = 1.0
            covered += scores[i]
            if covered >= p * total:
                break
    return out


@sekd.policy("top_p", CoverageOptions, reference=top_p_reference)
def top_p(u: Tensor, valid: Tensor, *, p: float, generator: torch.Generator | None = None, step: int = 0) -> sekd.Draws:
    """m_t = 1 for the highest-u positions of each sequence until they cover p of its total u (at least one)."""
    x = u.double().masked_fill(~valid, 0.0).clamp_min(0.0)
    order = x.masked_fill(~valid, -1.0).argsort(
        dim=-1, descending=True, stable=True
    )  # valid first; ties: lower position
    ranked = x.gather(-1, order)
    before = ranked.cumsum(-1) - ranked  # what the higher-ranked positions already cover
    first = torch.zeros_like(valid)
    first[:, 0] = True
    keep = ((before < p * x.sum(-1, keepdim=True)) | first) & valid.gather(-1, order)
    mask = torch.zeros_like(valid).scatter(-1, order, keep)
    rank = order.argsort(-1)
    return sekd.Draws.from_mask(mask, order=rank)
