"""Alignment criteria D(p_t, q_t) (SPEC §3), per selected position.

A criterion maps flat selected positions to a divergence each:
(s_logits [N,V], t_logits [N,V], targets [N], *, temperature, row [N], u [N]) -> D [N].
`row` (the sequence of each position) and `u` (its score) are there for batch-level criteria
(AT-KD's hard/easy split, weighted KD); simple divergences ignore them.
"""
from __future__ import annotations

import torch
from torch import Tensor

from sekd.registry import Registry

CRITERIA = Registry("criterion")


@CRITERIA.register("forward_kl")
def forward_kl(s: Tensor, t: Tensor, y: Tensor, *, temperature: float = 1.0, row=None, u=None) -> Tensor:
    """KL(p_t || q_t) = sum_v p (log p - log q), at temperature T."""
    logq = torch.log_softmax(s.float() / temperature, dim=-1)
    logp = torch.log_softmax(t.float() / temperature, dim=-1)
    return (logp.exp() * (logp - logq)).sum(-1)
