"""benchmarks/reference_losses.py: the losses the benchmarks time sekd's flows against."""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from tests.helpers import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
from reference_losses import floor_loss, plain_full_kd  # noqa: E402


def test_floor_loss_reaches_the_body():
    h = torch.randn(2, 3, 4, requires_grad=True)
    floor_loss(h).backward()
    torch.testing.assert_close(h.grad, 2 * h.detach() / h.numel())


def test_plain_full_kd_is_the_mean_kl_over_positions_with_a_target():
    g = torch.Generator().manual_seed(0)
    s, t = (
        torch.randn(2, 5, 7, generator=g, dtype=torch.float64),
        torch.randn(2, 5, 7, generator=g, dtype=torch.float64),
    )
    p, logq = F.softmax(t[:, :-1], -1), F.log_softmax(s[:, :-1], -1)
    ref = (p * (p.log() - logq)).sum(-1).mean()
    torch.testing.assert_close(plain_full_kd(s, t).double(), ref.float().double(), rtol=1e-6, atol=1e-7)
