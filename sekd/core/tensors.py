"""Tensor conventions every layer shares, defined once.

Imports nothing (not even torch), so the cache's `verify | ls | stats` commands that use IGNORE still
start without loading torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import Tensor

IGNORE = -100  # a label with no next-token target (padding, a document boundary, a prompt token); torch's ignore_index


def upcast(x: Tensor) -> Tensor:
    """At least float32: half precision and integers go to float32; float32 and float64 stay as they are
    (float64 for the reference tests)."""
    return x if x.dtype.is_floating_point and x.dtype.itemsize >= 4 else x.float()
