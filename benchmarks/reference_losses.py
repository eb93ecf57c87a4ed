"""Losses the benchmarks time sekd's flows against, none of them sekd's objective: the floor (the bodies alone)
and plain torch's Full KD. benchmarks/kd_step.py and benchmarks/kd_loss.py import them."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from sekd.core.tensors import upcast


def floor_loss(h_s: Tensor) -> Tensor:
    """mean(h^2): a loss of the body alone, the benchmark's floor (no LM head, no KD).  [B,L,d] -> []"""
    return upcast(h_s).square().mean()


def plain_full_kd(s_logits: Tensor, t_logits: Tensor) -> Tensor:
    """KL(p || q) with F.kl_div over the log-softmaxes, averaged over the positions with a target (all but each
    row's last): what plain torch does.  [B,L,V] x 2 -> []"""
    logq = F.log_softmax(s_logits[:, :-1].float(), -1).flatten(0, 1)
    logp = F.log_softmax(t_logits[:, :-1].float(), -1).flatten(0, 1)
    return F.kl_div(logq, logp, log_target=True, reduction="batchmean")
