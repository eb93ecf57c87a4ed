"""Alignment criteria D(p_t, q_t) (docs/method.md §3), per selected position.

A criterion maps flat selected positions to a divergence each:
(s_logits [N,V], t_logits [N,V], targets [N], *, temperature, row [N], u [N]) -> D [N].
`row` (the sequence of each position) and `u` (its score) are there for batch-level criteria
(AT-KD's hard/easy split, weighted KD); simple divergences ignore them.

No criterion multiplies by T^2: the objective does (l(t) = lam T^2 D + ...).
The objective averages D over each sequence's selected positions, L_i = sum_t m_t w_t D_t / sum_t m_t;
batch-level criteria return per-position values whose mean gives their formula.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from sekd.registry import NoOptions, OptionError, Registry, at_least, in_range
from sekd.tensors import upcast

CRITERIA = Registry("criterion", call_time=("temperature", "row", "u"))


def _log_softmax(z: Tensor, temperature: float) -> Tensor:
    """log softmax(z / T) in at least float32.  [N,V] -> [N,V]"""
    return torch.log_softmax(upcast(z) / temperature, dim=-1)


def _kl_from_logp(logp: Tensor, logq: Tensor) -> Tensor:
    """KL(p || q) = sum_v p (log p - log q), with 0 log 0 = 0.  [N,V] -> [N]"""
    p = logp.exp()
    diff = torch.where(p > 0, logp - logq, torch.zeros_like(p))  # no nan from -inf - -inf, nor in grads
    return (p * diff).sum(-1)


@CRITERIA.register("forward_kl", options=NoOptions)
def forward_kl(s: Tensor, t: Tensor, y: Tensor, *, temperature: float = 1.0, row=None, u=None) -> Tensor:
    """KL(p_t || q_t) = sum_v p (log p - log q), at temperature T."""
    return _kl_from_logp(_log_softmax(t, temperature), _log_softmax(s, temperature))


@CRITERIA.register("reverse_kl", options=NoOptions)
def reverse_kl(s: Tensor, t: Tensor, y: Tensor, *, temperature: float = 1.0, row=None, u=None) -> Tensor:
    """KL(q_t || p_t) = sum_v q (log q - log p), at temperature T."""
    return _kl_from_logp(_log_softmax(s, temperature), _log_softmax(t, temperature))


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


@CRITERIA.register("dkd", options=DKDOptions)
def dkd(s: Tensor, t: Tensor, y: Tensor, *, temperature: float = 1.0, alpha: float = 1.0, beta: float = 8.0,
        row=None, u=None) -> Tensor:
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


@CRITERIA.register("atkd", options=ATKDOptions)
def atkd(s: Tensor, t: Tensor, y: Tensor, *, temperature: float = 1.0, hard_fraction: float = 0.5,
         easy_weight: float = 0.2, row=None, u=None) -> Tensor:
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
        raise ValueError("criterion 'weighted': w_t = u(t) must be >= 0; use a non-negative signal "
                         "(or normalization=minmax, not zscore)")
    w = w.clamp_min(0.0)
    n_rows = int(row.max().item()) + 1 if row.numel() else 0
    W = torch.zeros(n_rows, dtype=w.dtype, device=w.device).index_add(0, row, w)  # sum_t w_t      [rows]
    n = torch.zeros(n_rows, dtype=w.dtype, device=w.device).index_add(0, row, torch.ones_like(w))  # [rows]
    return torch.where(W[row] > 0, n[row] * w / W[row].clamp_min(1e-300), torch.ones_like(w))


@CRITERIA.register("weighted", options=NoOptions)
def weighted(s: Tensor, t: Tensor, y: Tensor, *, temperature: float = 1.0, row=None, u=None) -> Tensor:
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
