"""Pack tokenized documents into fixed-length samples with document-boundary masks (docs/method.md §1 valid(t)).

Every document gets eos appended; the documents form one stream, cut into windows of L+1 tokens that
overlap by one, so every stream token after the first is a target exactly once:

    input_ids = w[:-1], labels = w[1:], labels[t] = -100 where w[t+1] starts a new document.

Predicting the eos that ends a document is valid; predicting the first token of the next is not.
Empty documents are skipped.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from torch import Tensor

from sekd.core.files import atomic_torch_save
from sekd.core.tensors import IGNORE

FORMAT = 1  # bump when the saved layout changes


def sample_id(input_ids: Tensor, labels: Tensor) -> str:
    """First 16 hex chars of sha256(input_ids bytes + labels bytes), both as little-endian int64."""
    h = hashlib.sha256()
    h.update(input_ids.numpy().astype("<i8", copy=False).tobytes())
    h.update(labels.numpy().astype("<i8", copy=False).tobytes())
    return h.hexdigest()[:16]


@dataclass
class PackedData:
    """Packed samples: input_ids, labels LongTensor [N,L]; sample_ids content hashes, one per row."""

    input_ids: Tensor
    labels: Tensor
    sample_ids: list[str]

    def __post_init__(self) -> None:
        if self.input_ids.shape != self.labels.shape or self.input_ids.dim() != 2:
            raise ValueError(
                f"input_ids {tuple(self.input_ids.shape)} and labels {tuple(self.labels.shape)} must be equal [N,L]"
            )
        if len(self.sample_ids) != self.input_ids.shape[0]:
            raise ValueError(f"{len(self.sample_ids)} sample_ids for {self.input_ids.shape[0]} samples")

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def seq_len(self) -> int:
        return self.input_ids.shape[1]

    def subset(self, indices: Sequence[int] | Tensor) -> "PackedData":
        """The samples at `indices`, in that order (ids travel with their rows)."""
        idx = torch.as_tensor(indices, dtype=torch.long).reshape(-1)
        return PackedData(self.input_ids[idx], self.labels[idx], [self.sample_ids[i] for i in idx.tolist()])

    def save(self, path: str | Path) -> None:
        """One .pt file, written to a temp file beside it and moved into place (atomic)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        # int32 halves the file; token ids (< 2^31) and -100 fit losslessly
        blob = {
            "format": FORMAT,
            "input_ids": self.input_ids.to(torch.int32),
            "labels": self.labels.to(torch.int32),
            "sample_ids": list(self.sample_ids),
        }
        atomic_torch_save(path, blob)

    @classmethod
    def load(cls, path: str | Path) -> "PackedData":
        """Read a file written by `save`; refuses other format versions."""
        blob = torch.load(Path(path), map_location="cpu", weights_only=True)
        if blob.get("format") != FORMAT:
            raise ValueError(f"{path}: packed-data format {blob.get('format')!r}, expected {FORMAT}")
        return cls(blob["input_ids"].long(), blob["labels"].long(), list(blob["sample_ids"]))


def pack_documents(
    token_docs: Iterable[list[int]], seq_len: int, eos_id: int, token_budget: int | None = None
) -> PackedData:
    """Documents -> PackedData [N, seq_len]; N * seq_len <= token_budget, reading no further than needed."""
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    L = seq_len
    n_max = None if token_budget is None else token_budget // L
    offsets = np.arange(L + 1)  # one window's stream offsets                                    [L+1]
    windows: list[np.ndarray] = []  # token windows                                           [n,L+1]
    starts: list[np.ndarray] = []  # True where the stream token starts a document            [n,L+1]
    n = 0
    pend_tok: list[np.ndarray] = []  # stream not yet cut; its first token is the previous window's last
    pend_start: list[np.ndarray] = []
    pend_len = 0

    for doc in [] if n_max == 0 else token_docs:
        if len(doc) == 0:
            continue  # a lone eos would be a document whose only target is masked
        tok = np.asarray([*doc, eos_id], dtype=np.int64)
        st = np.zeros(len(tok), dtype=bool)
        st[0] = True
        pend_tok.append(tok)
        pend_start.append(st)
        pend_len += len(tok)
        if pend_len < L + 1:
            continue
        buf, sbuf = np.concatenate(pend_tok), np.concatenate(pend_start)
        k = (len(buf) - 1) // L  # full windows in the buffer
        if n_max is not None:
            k = min(k, n_max - n)
        idx = np.arange(k)[:, None] * L + offsets  # window k covers stream[kL : kL+L+1]      [k,L+1]
        windows.append(buf[idx])
        starts.append(sbuf[idx])
        n += k
        pend_tok, pend_start = [buf[k * L :]], [sbuf[k * L :]]  # keep the overlap token
        pend_len = len(pend_tok[0])
        if n_max is not None and n >= n_max:
            break  # budget reached: leave the rest of a streamed source unread
    # a trailing partial window is dropped

    if windows:
        w, s = torch.from_numpy(np.concatenate(windows)), torch.from_numpy(np.concatenate(starts))
    else:
        w, s = torch.zeros(0, L + 1, dtype=torch.long), torch.zeros(0, L + 1, dtype=torch.bool)
    input_ids = w[:, :-1].contiguous()  # [N,L]
    labels = w[:, 1:].masked_fill(s[:, 1:], IGNORE).contiguous()  # no target across a boundary   [N,L]
    ids = [sample_id(input_ids[i], labels[i]) for i in range(len(input_ids))]
    return PackedData(input_ids, labels, ids)
