"""RS-KD draws (docs/method.md §6): N i.i.d. classes per position from p = softmax(z / T), kept as distinct ids
with their counts, so the target is p~(v) = c_v / N over C_t = the distinct draws.

The flat form (ids, counts, offsets) is what the cache stores; `to_sparse` pads it into the [P,K]
form the loss consumes. `sample_generator` seeds a generator from (sample id, seed) alone, so the
draws of a sample never depend on its batch, its position in the data, or the worker that built it.
The generator is a CPU one whatever the teacher's device (sekd/core/rng.py): a CUDA build draws what a CPU
build draws.
"""

from __future__ import annotations

import hashlib

import torch
from torch import Tensor

from sekd.core.rng import categorical, uniform

# positions are drawn this many logits at a time: on CPU small blocks stay in the caches and on the heap
# (a [P,V] softmax at V = 152K is hundreds of MB, mapped and page-faulted afresh every time); a GPU wants
# few, large kernels
_BLOCK_ELEMENTS = 1 << 20
_BLOCK_ELEMENTS_GPU = 1 << 26


def sample_generator(sample_id: str, seed: int) -> torch.Generator:
    """A CPU generator seeded with the first 8 bytes of sha256(f"{sample_id}/{seed}")."""
    mixed = int.from_bytes(hashlib.sha256(f"{sample_id}/{seed}".encode()).digest()[:8], "big")
    return torch.Generator().manual_seed(mixed)


def rs_kd_draws(
    t_logits: Tensor,
    n_draws: int,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
    u: Tensor | None = None,
    rows: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """N draws per row from softmax(z / T), reduced to distinct ids (ascending) and counts c_v; the
    uniforms come from `generator`, or are given (u [P,N], per-position keyed ones in training).
    rows: draw at t_logits[rows] only (read block by block, never copied out whole).

    [P,V] -> ids [R] long, counts [R] long (sum per row = N), offsets [P+1] long (row p is
    ids[offsets[p]:offsets[p+1]]); R = total distinct classes. All on t_logits' device.
    """
    if n_draws < 1:
        raise ValueError(f"n_draws must be >= 1, got {n_draws}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    P = t_logits.shape[0] if rows is None else rows.numel()
    dev = t_logits.device
    if P == 0:
        empty = torch.zeros(0, dtype=torch.long, device=dev)
        return empty, empty.clone(), torch.zeros(1, dtype=torch.long, device=dev)
    if u is None:  # all P x N at once, as one categorical call would draw them: blocks do not change the draws
        u = uniform((P, n_draws), generator, dev, torch.float64, "rs_kd draws")
    draws = torch.empty(P, n_draws, dtype=torch.long, device=dev)  #                                    [P,N]
    block = max(1, (_BLOCK_ELEMENTS if dev.type == "cpu" else _BLOCK_ELEMENTS_GPU) // t_logits.shape[-1])
    for a in range(0, P, block):
        z = (t_logits[a : a + block] if rows is None else t_logits[rows[a : a + block]]).float()  # float32
        p = torch.softmax(z if temperature == 1.0 else z / temperature, dim=-1)  #                       [b,V]
        draws[a : a + block] = categorical(p, n_draws, None, who="rs_kd draws", u=u[a : a + block])
    s = draws.sort(dim=-1).values  # equal ids are adjacent                                           [P,N]
    new = torch.ones_like(s, dtype=torch.bool)
    new[:, 1:] = s[:, 1:] != s[:, :-1]  # first of each run of equal ids; column 0 starts every row   [P,N]
    flat_new = new.reshape(-1)
    ids = s.reshape(-1)[flat_new]  # [R]
    starts = flat_new.nonzero().squeeze(1)  # flat index where each run starts (runs never cross rows)  [R]
    ends = torch.cat([starts[1:], torch.tensor([P * n_draws], device=dev)])
    counts = ends - starts  # [R]
    offsets = torch.zeros(P + 1, dtype=torch.long, device=dev)
    offsets[1:] = new.sum(-1).cumsum(0)
    return ids, counts, offsets


def to_sparse(ids: Tensor, counts: Tensor, offsets: Tensor, n_draws: int) -> tuple[Tensor, Tensor, Tensor]:
    """Pad the flat draws per row: p~ = c_v / N.  -> ids_pad [P,K] long, probs_pad [P,K] float32, mask [P,K] bool.

    K = the most distinct classes at any position; padding has id 0, probability 0, mask False.
    """
    dev = ids.device
    lens = offsets[1:] - offsets[:-1]  # distinct classes per position                              [P]
    P = lens.shape[0]
    K = int(lens.max()) if P else 0
    row = torch.repeat_interleave(torch.arange(P, device=dev), lens)  # [R]
    col = torch.arange(ids.shape[0], device=dev) - offsets[:-1][row]  # [R]
    ids_pad = torch.zeros(P, K, dtype=torch.long, device=dev)
    probs_pad = torch.zeros(P, K, dtype=torch.float32, device=dev)
    mask = torch.zeros(P, K, dtype=torch.bool, device=dev)
    ids_pad[row, col] = ids.long()
    probs_pad[row, col] = counts.float() / n_draws
    mask[row, col] = True
    return ids_pad, probs_pad, mask
