"""Helpers shared by the data tests."""

from __future__ import annotations

import torch

from sekd.data.packing import PackedData


class Counting:
    """Delegates to a tokenizer and counts the calls that tokenize."""

    def __init__(self, tok):
        self._tok, self.calls = tok, 0

    def __getattr__(self, name):
        return getattr(self._tok, name)

    def __call__(self, *a, **kw):
        self.calls += 1
        return self._tok(*a, **kw)


def same(a: PackedData, b: PackedData) -> bool:
    return torch.equal(a.input_ids, b.input_ids) and torch.equal(a.labels, b.labels) and a.sample_ids == b.sample_ids
