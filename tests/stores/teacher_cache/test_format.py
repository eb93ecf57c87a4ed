"""sekd/stores/teacher_cache/format.py: 3-byte records (18-bit id | 6-bit count-1) and 6-byte wide records, lossless."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sekd.stores.teacher_cache import format as fmt

QWEN3_V = 151_936


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 2**18 - 1), st.integers(1, 64)), max_size=200))
def test_narrow_round_trip(recs):
    ids = np.array([r[0] for r in recs], dtype=np.int64)
    counts = np.array([r[1] for r in recs], dtype=np.int64)
    buf = fmt.pack(ids, counts, 64, 2**18)
    assert len(buf) == 3 * len(recs)
    i2, c2 = fmt.unpack(buf, len(recs), wide=False)
    assert np.array_equal(i2, ids) and np.array_equal(c2, counts)


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_wide_round_trip(data):
    V = data.draw(st.integers(1, 2**32 - 1))
    N = data.draw(st.integers(1, 2**16 - 1))
    n = data.draw(st.integers(0, 50))
    ids = np.array(data.draw(st.lists(st.integers(0, V - 1), min_size=n, max_size=n)), dtype=np.int64)
    counts = np.array(data.draw(st.lists(st.integers(1, N), min_size=n, max_size=n)), dtype=np.int64)
    wide = fmt.is_wide(V, N)
    buf = fmt.pack(ids, counts, N, V)
    assert len(buf) == n * fmt.bytes_per_record(V, N) == n * (6 if wide else 3)
    i2, c2 = fmt.unpack(buf, n, wide)
    assert np.array_equal(i2, ids) and np.array_equal(c2, counts)


def test_exhaustive_every_id_and_every_count():
    """All 2^18 ids (random counts), then every id x count pair over the top 2^10 ids (the bits that 17-bit packing loses)."""
    rng = np.random.default_rng(0)
    ids = np.arange(2**18, dtype=np.int64)
    counts = rng.integers(1, 65, size=ids.shape)
    i2, c2 = fmt.unpack(fmt.pack(ids, counts, 64, 2**18), len(ids), wide=False)
    assert np.array_equal(i2, ids) and np.array_equal(c2, counts)
    top = np.arange(2**18 - 2**10, 2**18)
    ids, counts = np.repeat(top, 64), np.tile(np.arange(1, 65), len(top))
    i2, c2 = fmt.unpack(fmt.pack(ids, counts, 64, 2**18), len(ids), wide=False)
    assert np.array_equal(i2, ids) and np.array_equal(c2, counts)


def test_qwen3_ids_above_2_17_survive():
    """docs/method.md §13: 17-bit ids corrupt Qwen3 ids >= 131,072; 18 bits keep them."""
    ids = np.array([131_071, 131_072, 140_000, QWEN3_V - 1])
    counts = np.array([64, 1, 33, 7])
    assert fmt.bytes_per_record(QWEN3_V, 64) == 3
    i2, c2 = fmt.unpack(fmt.pack(ids, counts, 64, QWEN3_V), 4, wide=False)
    assert i2.tolist() == ids.tolist() and c2.tolist() == counts.tolist()


def test_layout_is_little_endian_id_low_bits():
    buf = fmt.pack(np.array([0x3_FFFF, 1]), np.array([64, 2]), 64, 2**18)
    assert buf == bytes([0xFF, 0xFF, 0xFF, 0x01, 0x00, 0x04])  # 0x3FFFF|63<<18 ; 1|1<<18


def test_bytes_per_record():
    assert fmt.bytes_per_record(QWEN3_V, 64) == 3
    assert fmt.bytes_per_record(2**18, 64) == 3
    assert fmt.bytes_per_record(2**18 + 1, 64) == 6
    assert fmt.bytes_per_record(1000, 65) == 6
    assert fmt.bytes_per_record(1000, 12) == 3
    with pytest.raises(ValueError, match="n_draws"):
        fmt.bytes_per_record(1000, 0)


def test_pack_rejects_out_of_range():
    with pytest.raises(ValueError, match="ids"):
        fmt.pack(np.array([1000]), np.array([1]), 64, 1000)
    with pytest.raises(ValueError, match="counts"):
        fmt.pack(np.array([3]), np.array([65]), 64, 1000)
    with pytest.raises(ValueError, match="counts"):
        fmt.pack(np.array([3]), np.array([0]), 64, 1000)
    with pytest.raises(ValueError, match="bytes"):
        fmt.unpack(b"\x00\x00", 1, wide=False)


# ---------------------------------------------------------------- probability records


def test_every_float16_probability_round_trips_in_14_bits():
    """All 15,361 float16 values in [0, 1] (codes 0 .. 0x3C00), with ids at both ends of 18 bits."""
    codes = np.arange(fmt.ONE_CODE + 1, dtype=np.uint16)
    probs = codes.view(np.float16).astype(np.float64)
    ids = np.where(codes % 2 == 0, 2**18 - 1 - codes.astype(np.int64), codes)
    buf = fmt.pack_probs(ids, probs, 2**18)
    assert len(buf) == fmt.PROB_NARROW_BYTES * len(ids)
    i2, p2 = fmt.unpack_probs(buf, len(ids), wide=False)
    assert np.array_equal(i2, ids) and np.array_equal(p2, probs.astype(np.float32))


@pytest.mark.parametrize("V", [QWEN3_V, 2**18, 2**18 + 1, 2**32 - 1])
def test_probability_ids_above_2_17_and_2_18_survive(V):
    """Narrow (V <= 2^18: 4 bytes) keeps Qwen3's ids >= 2^17; wide (6 bytes) ids >= 2^18."""
    ids = np.array([0, 131_071, 131_072, min(2**18 - 1, V - 1), V - 1])
    probs = np.array([1.0, 0.5, 1 / 3, 1e-5, 0.0])
    buf = fmt.pack_probs(ids, probs, V)
    assert len(buf) == len(ids) * fmt.prob_record_bytes(V) == len(ids) * (6 if V > 2**18 else 4)
    i2, p2 = fmt.unpack_probs(buf, len(ids), fmt.ids_wide(V))
    assert i2.tolist() == ids.tolist() and np.array_equal(p2, probs.astype(np.float16).astype(np.float32))


def test_pack_probs_rejects_out_of_range():
    with pytest.raises(ValueError, match="ids"):
        fmt.pack_probs(np.array([1000]), np.array([0.5]), 1000)
    for bad in (1.5, -0.25, float("nan")):
        with pytest.raises(ValueError, match="probabilities"):
            fmt.pack_probs(np.array([3]), np.array([bad]), 1000)
    with pytest.raises(ValueError, match="bytes"):
        fmt.unpack_probs(b"\x00\x00", 1, wide=False)
