"""The optimizer (AdamW, or bitsandbytes' 8-bit Adam), its learning-rate schedule (linear warm-up, then constant
or cosine) and the number of optimizer steps a run takes."""

from __future__ import annotations

import math
from typing import Iterable

import torch

from sekd.config.schema import TrainConfig


def build_optimizer(params: Iterable[torch.nn.Parameter], t: TrainConfig) -> torch.optim.Optimizer:
    betas = (t.betas[0], t.betas[1])  # TrainConfig checked there are two
    if t.optimizer == "adam8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise RuntimeError("train.optimizer=adam8bit needs bitsandbytes (pip install 'sekd[adam8bit]')") from None
        return bnb.optim.Adam8bit(params, lr=t.lr, betas=betas, weight_decay=t.weight_decay)
    return torch.optim.AdamW(params, lr=t.lr, betas=betas, weight_decay=t.weight_decay)


def build_schedule(opt: torch.optim.Optimizer, t: TrainConfig, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    warm = t.warmup_steps

    def factor(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / warm
        if t.lr_schedule == "cosine":
            frac = (step - warm) / max(1, total_steps - warm)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def total_steps(n_samples: int, t: TrainConfig, world_size: int = 1) -> int:
    """train.steps, or the optimizer steps of train.epochs over n_samples (micro_batch_size per rank)."""
    if t.steps is not None:
        return int(t.steps)
    per_epoch = math.ceil(n_samples / (t.micro_batch_size * world_size))
    return max(1, math.ceil(per_epoch * t.epochs / t.grad_accum))
