"""Random draws that are the same on every device (docs/method.md §1, "Randomness").

Every random number of a run comes from a CPU `torch.Generator` (seeded by the run, or per cache sample):
uniforms are drawn on the CPU and moved to the tensor's device, and a categorical draw is an inverse CDF
computed there, so a CUDA run draws what a CPU run draws for the same seed (up to logits that differ in
rounding), and no CPU generator ever meets a CUDA tensor inside torch (which refuses the pair). Training
draws are keyed per sample (`RowKeys`): a row's key hashes (seed, optimizer step, global sample index) and
each random piece draws from a CPU generator seeded by (row key, stream name), so a sample's draws do not
depend on its micro-batch, its rank, its place in the batch or the chunking. Callers without sample
indices get fresh keys drawn from their generator (`RowKeys.drawn`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

# float64 CDF rows are built this many elements at a time: on CPU blocks of 512 KiB stay in the caches and
# on the heap (a [P,V] float64 CDF at V = 152K is mapped and page-faulted afresh each time, several times
# slower); a GPU wants few, large kernels. Draws do not depend on the chunking
_CDF_ELEMENTS = 1 << 16
_CDF_ELEMENTS_GPU = 1 << 24


def check_cpu_generator(generator: torch.Generator | None, who: str) -> None:
    """Refuse a generator that is not a CPU one: the draws would depend on the device."""
    if generator is not None and generator.device.type != "cpu":
        raise ValueError(
            f"{who}: the generator is on {generator.device}; random draws take a CPU generator "
            "(the uniforms are drawn there and moved to the tensor's device)"
        )


def uniform(
    shape: int | Sequence[int],
    generator: torch.Generator | None,
    device: torch.device | str,
    dtype: torch.dtype = torch.float32,
    who: str = "uniform",
) -> Tensor:
    """U[0,1) of `shape` from the CPU `generator` (the global CPU one when None), on `device`."""
    check_cpu_generator(generator, who)
    return torch.rand(shape, generator=generator, dtype=dtype, device="cpu").to(device)


def categorical(
    probs: Tensor, n: int, generator: torch.Generator | None, who: str = "categorical", u: Tensor | None = None
) -> Tensor:
    """n i.i.d. draws with replacement per row of `probs` (>= 0, any positive row sum), by inverse CDF:
    draw v where cdf(v-1) <= u * sum < cdf(v), u ~ U[0,1) from the CPU generator (or the given
    uniforms u [P,n], e.g. per-row keyed ones). A class of probability 0 is never drawn. A row summing
    to 0 draws uniformly.  [P,V] -> [P,n] long, on probs' device."""
    P, V = probs.shape
    if u is None:
        u = uniform((P, n), generator, probs.device, torch.float64, who)  # [P,n]
    u = u.to(probs.device, torch.float64)
    out = torch.empty(P, n, dtype=torch.long, device=probs.device)
    rows = max(1, (_CDF_ELEMENTS if probs.device.type == "cpu" else _CDF_ELEMENTS_GPU) // max(V, 1))
    for a in range(0, P, rows):
        cdf = torch.cumsum(probs[a : a + rows], -1, dtype=torch.float64)  # summed in float64     [r,V]
        total = cdf[:, -1:].contiguous()  #                                                       [r,1]
        ua = u[a : a + rows]
        idx = torch.searchsorted(cdf, ua * total, right=True)  #                                  [r,n]
        # u * sum can round up to the sum: that draw belongs to the class where the cdf reaches the sum,
        # which has positive probability (the cdf steps up there), never to trailing zero-probability classes
        idx = torch.minimum(idx, torch.searchsorted(cdf, total))
        uniform_draw = (ua * V).long().clamp_max(V - 1)  # a row summing to 0 draws uniformly
        out[a : a + rows] = torch.where(total > 0, idx, uniform_draw)
    return out


# ---- per-sample keys ----------------------------------------------------------------------


def mix(*parts: object) -> int:
    """A 63-bit seed from the first 8 bytes of sha256("a/b/..."), as sekd/selection/draws.py `sample_generator`."""
    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:8], "big") >> 1


@dataclass(frozen=True)
class RowKeys:
    """One key per row of a micro-batch. A random piece draws row i's numbers from a CPU generator seeded
    by (key i, its stream name), so a row's draws depend on its key alone, never on the other rows.
    Draws of a longer length extend shorter ones (a CPU generator's stream: the first n of n' > n uniforms
    are the n uniforms), so a row padded to a longer batch keeps its draws at its own positions."""

    keys: tuple[int, ...]

    @staticmethod
    def of_samples(seed: int, step: int, rows: Sequence[int] | Tensor) -> "RowKeys":
        """Keys of the global sample indices `rows` at optimizer step `step` of the run seeded `seed`."""
        rows = rows.tolist() if isinstance(rows, Tensor) else list(rows)
        return RowKeys(tuple(mix("row", int(seed), int(step), int(r)) for r in rows))

    @staticmethod
    def drawn(n: int, generator: torch.Generator | None, who: str = "row keys") -> "RowKeys":
        """n fresh keys from the CPU `generator` (the global one when None): for callers without sample indices."""
        check_cpu_generator(generator, who)
        return RowKeys(tuple(torch.randint(0, 2**62, (n,), generator=generator, device="cpu").tolist()))

    def __len__(self) -> int:
        return len(self.keys)

    def generator(self, i: int, stream: str) -> torch.Generator:
        """Row i's CPU generator for `stream` (each random piece names its own)."""
        return torch.Generator().manual_seed(mix(self.keys[i], stream))

    def uniform(
        self, lengths: Sequence[int], stream: str, device: torch.device | str, dtype: torch.dtype = torch.float32
    ) -> Tensor:
        """Row i's first lengths[i] uniforms of `stream`, padded with 0 to the longest.  -> [B,max(lengths)]"""
        if len(lengths) != len(self.keys):
            raise ValueError(f"{stream}: {len(lengths)} rows, {len(self.keys)} row keys")
        width = max((int(n) for n in lengths), default=0)
        out = torch.zeros(len(self.keys), width, dtype=dtype)
        for i, n in enumerate(lengths):
            if n:
                out[i, : int(n)] = torch.rand(int(n), generator=self.generator(i, stream), dtype=dtype, device="cpu")
        return out.to(device)


def step_keys(n: int, *, generator: torch.Generator | None, step: int, rows: Sequence[int] | Tensor | None) -> RowKeys:
    """A micro-batch's row keys: from the global sample indices `rows` at `step`, seeded by the run's
    generator's seed (its stream is not consumed); without rows, n fresh keys drawn from the generator."""
    if rows is None:
        return RowKeys.drawn(n, generator)
    check_cpu_generator(generator, "row keys")
    if len(rows) != n:
        raise ValueError(f"row keys: {len(rows)} sample indices for a batch of {n} rows")
    seed = generator.initial_seed() if generator is not None else torch.initial_seed()
    return RowKeys.of_samples(seed, step, rows)


def row_keys(n: int, *, keys: RowKeys | None, generator: torch.Generator | None, who: str) -> RowKeys:
    """The given keys (checked against the batch), or n fresh ones drawn from `generator`."""
    if keys is None:
        return RowKeys.drawn(n, generator, who)
    if len(keys) != n:
        raise ValueError(f"{who}: {len(keys)} row keys for a batch of {n} rows")
    return keys


class PositionKeys:
    """Per-position uniforms for draws at selected positions (rows[n], cols[n]): position (r, c) takes the
    c-th block of `width` uniforms of row r's stream. Each stream's blocks of every row's T positions are drawn
    once per step on the CPU and moved to the device in one copy ([rows,T,width], shared by `take`), so any
    chunking of the positions gets the same numbers, and a chunk reads its own on the device: no host copy or
    sync per chunk (rows and cols stay where they are)."""

    def __init__(self, keys: RowKeys, rows: Tensor, cols: Tensor, T: int, _memo: dict | None = None):
        self.keys, self.rows, self.cols, self.T = keys, rows, cols, int(T)
        self._memo: dict[tuple[str, int, str], Tensor] = {} if _memo is None else _memo

    def take(self, sl: slice) -> "PositionKeys":
        """The keys of the positions [sl] (a chunk)."""
        return PositionKeys(self.keys, self.rows[sl], self.cols[sl], self.T, self._memo)

    def table(self, width: int, stream: str, device: torch.device | str) -> Tensor:
        """Every row's T x width uniforms of `stream`, drawn once.  -> [rows,T,width] float64 on `device`"""
        device = torch.device(device)
        key = (stream, int(width), str(device))
        if key not in self._memo:
            cpu = torch.empty(len(self.keys), self.T, int(width), dtype=torch.float64)
            for r in range(len(self.keys)):
                torch.rand(
                    self.T,
                    int(width),
                    generator=self.keys.generator(r, stream),
                    dtype=torch.float64,
                    device="cpu",
                    out=cpu[r],
                )
            self._memo[key] = cpu.to(device)
        return self._memo[key]

    def uniform(self, width: int, stream: str, device: torch.device | str) -> Tensor:
        """`width` uniforms per position.  -> [n,width] float64 on `device`"""
        table = self.table(width, stream, device)
        return table[self.rows.to(table.device), self.cols.to(table.device)]
