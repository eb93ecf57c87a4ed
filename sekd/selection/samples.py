"""Sample selection (docs/method.md §7): which packed samples s_i training iterates over, budget l.

A sample selector ranks samples by U_i = mean over the sample's valid positions of a position signal
u(t) of docs/method.md §4; the floor(l * N) samples with the largest U_i are kept, ties by lower index.
This module holds the pure rules (the registry, the budget, the ranking, U_i from logits); running the
pre-pass over a model and storing U_i by sample content is sekd/stores/sample_importance.py.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from sekd.core.registry import Registry
from sekd.selection.signals import SIGNALS, importance_terms
from sekd.core.tensors import IGNORE

SAMPLE_SELECTORS: Registry[SampleSelector] = Registry("sample selector")
CHUNK = 2048  # flat positions per signal call: bounds the float32 [CHUNK,V] temporaries


@dataclass(frozen=True)
class SampleSelector:
    """A sample selector: `signal` averaged into U_i (None: no pre-pass), the models it runs, and how."""

    name: str
    signal: str | None
    needs_student: bool
    needs_teacher: bool
    random: bool = False
    uses_temperature: bool = False  # entropies use raw logits (T = 1), so T stays out of their key


def sample_selector(
    name: str,
    *,
    signal: str | None,
    needs_student: bool,
    needs_teacher: bool,
    random: bool = False,
    uses_temperature: bool = False,
) -> SampleSelector:
    """Register the sample selector `name`: U_i = the mean of `signal` over a sample (None: no pre-pass), the
    models its pre-pass runs, whether it draws, and whether T enters its scores (and their store key)."""
    selector = SampleSelector(name, signal, needs_student, needs_teacher, random, uses_temperature)
    SAMPLE_SELECTORS.register(name)(selector)
    return selector


sample_selector("all", signal=None, needs_student=False, needs_teacher=False)
sample_selector("random", signal=None, needs_student=False, needs_teacher=False, random=True)
sample_selector("top_student_entropy", signal="student_entropy", needs_student=True, needs_teacher=False)
sample_selector("ce_ratio", signal="ce_ratio", needs_student=True, needs_teacher=True, uses_temperature=True)
sample_selector("kl", signal="kl", needs_student=True, needs_teacher=True, uses_temperature=True)


# ---- budget and ranking -----------------------------------------------------------------------


def sample_budget(n: int, l: float) -> int:
    """floor(l * N), at least 1 when N >= 1; l in (0, 1]."""
    if not 0.0 < l <= 1.0:
        raise ValueError(f"sample budget l must be in (0, 1], got {l}")
    # the epsilon keeps 0.29 * 100 = 28.999999999999996 at 29
    return min(n, max(1, math.floor(l * n + 1e-9))) if n else 0


def top_samples(U: Tensor, n_keep: int) -> list[int]:
    """The n_keep indices with the largest U_i, ties by lower index, returned ascending."""
    U = U.float().nan_to_num(nan=float("-inf"))
    order = torch.sort(U, descending=True, stable=True).indices  # stable: equal U keep index order
    return sorted(order[:n_keep].tolist())


def random_samples(n: int, n_keep: int, seed: int) -> list[int]:
    """n_keep of range(n) uniformly without replacement, from a generator seeded only by `seed`."""
    # salted so the kept set does not line up with the epoch order drawn from the same seed
    mixed = int.from_bytes(hashlib.sha256(f"samples/{seed}".encode()).digest()[:8], "big")
    g = torch.Generator().manual_seed(mixed)
    return sorted(torch.randperm(n, generator=g)[:n_keep].tolist())


# ---- U_i from logits ----------------------------------------------------------------------


@torch.no_grad()
def mean_signal(
    sig_name: str, s_logits: Tensor, t_logits: Tensor | None, labels: Tensor, *, temperature: float = 1.0
) -> Tensor:
    """U_i = (1 / n_i) sum_{t valid} u(t), float32, -inf where n_i = 0.  [B,T,V] -> [B]"""
    sig = SIGNALS.get(sig_name)
    valid = labels != IGNORE  # t < L_i                                          [B,T]
    rows, cols = valid.nonzero(as_tuple=True)  # flat valid positions            [P]
    u = torch.zeros(labels.shape, dtype=torch.float32, device=labels.device)  # u(t), 0 where invalid  [B,T]
    for lo in range(0, rows.numel(), CHUNK):  # never a float32 [P,V] copy of the whole batch
        r, c = rows[lo : lo + CHUNK], cols[lo : lo + CHUNK]
        t = t_logits[r, c] if t_logits is not None else None
        u[r, c] = importance_terms(sig, s_logits[r, c], t, labels[r, c], temperature=temperature).sum(0)  # [p]
    total, n = u.sum(-1), valid.sum(-1)  # a row sum, not atomics: the same U_i on every run
    return torch.where(n > 0, total / n.clamp_min(1), torch.full_like(total, float("-inf")))
