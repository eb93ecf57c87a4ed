"""Records: (class id, count) per distinct RS-KD draw, or (class id, probability) for every other kind.

Count record, narrow (vocab_size <= 2^18 and n_draws <= 64), 3 bytes, little-endian:
    r = id | (count - 1) << 18        bits 0-17 the id (Qwen3's 151,936 ids need 18), bits 18-23 count - 1
Count record, wide (otherwise), 6 bytes: id as uint32 LE, then count as uint16 LE.
Probability record, narrow (vocab_size <= 2^18), 4 bytes: r = id | h << 18, h the float16 bits of p in
[0, 1] (at most 0x3C00 = 1.0, so 14 bits); wide, 6 bytes: id as uint32 LE, then h as uint16 LE. Ids are
exact; p is float16 (round to nearest), the only rounding in the cache.

The paper's code packs 17-bit ids, which corrupts Qwen3 ids >= 131,072 (docs/method.md §13); 18 bits do not.
"""

from __future__ import annotations

import numpy as np

ID_BITS = 18
COUNT_BITS = 6
MAX_NARROW_VOCAB = 1 << ID_BITS  # ids 0 .. 2^18 - 1
MAX_NARROW_DRAWS = 1 << COUNT_BITS  # counts 1 .. 64, stored as count - 1
MAX_DRAWS = (1 << 16) - 1  # a wide record's uint16 count
NARROW_BYTES = 3
WIDE = np.dtype([("id", "<u4"), ("count", "<u2")])  # packed: itemsize 6, no padding


def is_wide(vocab_size: int, n_draws: int) -> bool:
    """True when a record does not fit 18 + 6 bits."""
    return vocab_size > MAX_NARROW_VOCAB or n_draws > MAX_NARROW_DRAWS


def bytes_per_record(vocab_size: int, n_draws: int) -> int:
    """3 when vocab_size <= 2^18 and n_draws <= 64, else 6."""
    if not 1 <= n_draws <= MAX_DRAWS:
        raise ValueError(f"n_draws must be in [1, {MAX_DRAWS}], got {n_draws}")
    return WIDE.itemsize if is_wide(vocab_size, n_draws) else NARROW_BYTES


def pack(ids, counts, n_draws: int, vocab_size: int) -> bytes:
    """(ids [R], counts [R]) -> R * bytes_per_record(vocab_size, n_draws) bytes.  Checks 0 <= id < V, 1 <= c <= N."""
    ids = np.asarray(ids.cpu() if hasattr(ids, "cpu") else ids, dtype=np.int64).reshape(-1)
    counts = np.asarray(counts.cpu() if hasattr(counts, "cpu") else counts, dtype=np.int64).reshape(-1)
    if ids.shape != counts.shape:
        raise ValueError(f"{ids.shape[0]} ids but {counts.shape[0]} counts")
    bytes_per_record(vocab_size, n_draws)  # validates n_draws
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        raise ValueError(f"class ids must be in [0, {vocab_size}), got [{ids.min()}, {ids.max()}]")
    if counts.size and (counts.min() < 1 or counts.max() > n_draws):
        raise ValueError(f"counts must be in [1, {n_draws}], got [{counts.min()}, {counts.max()}]")
    if is_wide(vocab_size, n_draws):
        rec = np.empty(ids.shape[0], dtype=WIDE)
        rec["id"], rec["count"] = ids, counts
        return rec.tobytes()
    r = (ids | ((counts - 1) << ID_BITS)).astype("<u4")  # [R]
    return r.view(np.uint8).reshape(-1, 4)[:, :NARROW_BYTES].tobytes()  # drop the always-zero high byte


def unpack(buf, n: int, wide: bool) -> tuple[np.ndarray, np.ndarray]:
    """The first n records of buf -> (ids [n] int64, counts [n] int64).  Inverse of `pack`."""
    size = WIDE.itemsize if wide else NARROW_BYTES
    if len(buf) < n * size:
        raise ValueError(f"{n} records need {n * size} bytes, got {len(buf)}")
    if wide:
        rec = np.frombuffer(buf, dtype=WIDE, count=n)
        return rec["id"].astype(np.int64), rec["count"].astype(np.int64)
    b = np.frombuffer(buf, dtype=np.uint8, count=n * NARROW_BYTES).reshape(n, NARROW_BYTES).astype(np.int64)
    r = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)  # [n]
    return r & (MAX_NARROW_VOCAB - 1), (r >> ID_BITS) + 1


PROB_BITS = 14  # float16 bits of a value in [0, 1]: sign 0, at most 0x3C00
ONE_CODE = 0x3C00  # float16 1.0
PROB_NARROW_BYTES = 4
PROB_WIDE = np.dtype([("id", "<u4"), ("prob", "<u2")])  # packed: itemsize 6


def ids_wide(vocab_size: int) -> bool:
    """True when an id does not fit 18 bits (a probability record's width depends on the ids alone)."""
    return vocab_size > MAX_NARROW_VOCAB


def prob_record_bytes(vocab_size: int) -> int:
    """4 when vocab_size <= 2^18, else 6."""
    return PROB_WIDE.itemsize if ids_wide(vocab_size) else PROB_NARROW_BYTES


def half_codes(values) -> np.ndarray:
    """Probabilities in [0, 1] -> their float16 bits [R] uint16 (round to nearest; -0 stored as 0)."""
    v = np.asarray(values.cpu() if hasattr(values, "cpu") else values, dtype=np.float64).reshape(-1)
    if v.size and not (np.isfinite(v).all() and v.min() >= 0 and v.max() <= 1 + 1e-6):
        raise ValueError(f"probabilities must be in [0, 1], got [{v.min()}, {v.max()}]")
    return np.minimum(v, 1.0).astype(np.float16).view(np.uint16) & 0x7FFF


def pack_probs(ids, probs, vocab_size: int) -> bytes:
    """(ids [R], probs [R]) -> R * prob_record_bytes(vocab_size) bytes.  Checks 0 <= id < V, 0 <= p <= 1."""
    ids = np.asarray(ids.cpu() if hasattr(ids, "cpu") else ids, dtype=np.int64).reshape(-1)
    codes = half_codes(probs)
    if ids.shape != codes.shape:
        raise ValueError(f"{ids.shape[0]} ids but {codes.shape[0]} probabilities")
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        raise ValueError(f"class ids must be in [0, {vocab_size}), got [{ids.min()}, {ids.max()}]")
    if ids_wide(vocab_size):
        rec = np.empty(ids.shape[0], dtype=PROB_WIDE)
        rec["id"], rec["prob"] = ids, codes
        return rec.tobytes()
    return (ids | (codes.astype(np.int64) << ID_BITS)).astype("<u4").tobytes()


def unpack_probs(buf, n: int, wide: bool) -> tuple[np.ndarray, np.ndarray]:
    """The first n probability records of buf -> (ids [n] int64, probs [n] float32).  Inverse of `pack_probs`."""
    size = PROB_WIDE.itemsize if wide else PROB_NARROW_BYTES
    if len(buf) < n * size:
        raise ValueError(f"{n} records need {n * size} bytes, got {len(buf)}")
    if wide:
        rec = np.frombuffer(buf, dtype=PROB_WIDE, count=n)
        return rec["id"].astype(np.int64), rec["prob"].view(np.float16).astype(np.float32)
    r = np.frombuffer(buf, dtype="<u4", count=n).astype(np.int64)
    codes = (r >> ID_BITS).astype(np.uint16)
    return r & (MAX_NARROW_VOCAB - 1), codes.view(np.float16).astype(np.float32)
