"""sekd/selection/draws.py: RS-KD draws are i.i.d. from softmax(z / T), reduced losslessly, seeded per sample."""

import pytest
import torch

from sekd.selection.draws import rs_kd_draws, sample_generator, to_sparse

torch.set_num_threads(1)


def dense(ids_pad, probs_pad, mask, V):
    """p~ as a dense [P,V] matrix."""
    return torch.zeros(ids_pad.shape[0], V).scatter_add_(1, ids_pad, probs_pad * mask)


@pytest.mark.parametrize("T", [1.0, 2.0, 0.5])
def test_frequencies_match_p(T):
    """Over P positions x N draws, each class's frequency is p(v) within 5 standard errors; E[p~] = p."""
    V, P, N = 12, 4000, 64
    z = torch.randn(V, generator=torch.Generator().manual_seed(3)) * 2
    p = torch.softmax(z.double() / T, -1)
    ids, counts, offsets = rs_kd_draws(z.expand(P, V), N, T, torch.Generator().manual_seed(0))
    freq = torch.zeros(V, dtype=torch.float64).index_add_(0, ids, counts.double()) / (P * N)
    se = (p * (1 - p) / (P * N)).sqrt()
    assert ((freq - p).abs() <= 5 * se + 1e-12).all(), (freq, p)
    p_tilde = dense(*to_sparse(ids, counts, offsets, N), V).double().mean(0)  # the target the loss sees
    assert torch.allclose(p_tilde, freq, atol=1e-6)


def test_peaked_p_with_impossible_classes():
    """A peaked p with classes of probability 0 (logit -inf): those are never drawn, and the target's
    expectation over many positions is still p (the inverse CDF's edges are where they belong)."""
    z = torch.tensor([float("-inf"), 9.0, 0.0, float("-inf"), 4.0, -3.0, float("-inf"), 1.0, -12.0])
    V, P, N = z.numel(), 6000, 32
    p = torch.softmax(z.double(), -1)
    ids, counts, offsets = rs_kd_draws(z.expand(P, V), N, 1.0, torch.Generator().manual_seed(7))
    p_tilde = dense(*to_sparse(ids, counts, offsets, N), V).double().mean(0)  # E[p~] = p
    se = (p * (1 - p) / (P * N)).sqrt()
    assert ((p_tilde - p).abs() <= 5 * se + 1e-7).all(), (p_tilde, p)
    assert not torch.isin(ids, torch.tensor([0, 3, 6])).any()


def test_flat_form_is_distinct_sorted_and_sums_to_n():
    P, V, N = 50, 40, 64
    z = torch.randn(P, V, generator=torch.Generator().manual_seed(1))
    ids, counts, offsets = rs_kd_draws(z, N, 1.0, torch.Generator().manual_seed(2))
    assert offsets.shape == (P + 1,) and offsets[0] == 0 and offsets[-1] == len(ids) == len(counts)
    for i in range(P):
        row, c = ids[offsets[i] : offsets[i + 1]], counts[offsets[i] : offsets[i + 1]]
        assert (row[1:] > row[:-1]).all() and (c >= 1).all() and c.sum() == N
        assert ((row >= 0) & (row < V)).all()


def test_draws_equal_multinomial_reduced():
    """The distinct ids and counts are exactly those of torch.multinomial's N draws under the same generator."""
    P, V, N = 20, 30, 16
    z = torch.randn(P, V, generator=torch.Generator().manual_seed(5))
    raw = torch.multinomial(torch.softmax(z / 1.5, -1), N, replacement=True, generator=torch.Generator().manual_seed(9))
    ids, counts, offsets = rs_kd_draws(z, N, 1.5, torch.Generator().manual_seed(9))
    for i in range(P):
        u, c = raw[i].unique(return_counts=True)
        assert torch.equal(ids[offsets[i] : offsets[i + 1]], u) and torch.equal(counts[offsets[i] : offsets[i + 1]], c)


def test_to_sparse():
    ids, counts, offsets = torch.tensor([3, 7, 1, 2, 5, 9]), torch.tensor([2, 2, 1, 1, 1, 1]), torch.tensor([0, 2, 6])
    ids_pad, probs_pad, mask = to_sparse(ids, counts, offsets, 4)
    assert ids_pad.tolist() == [[3, 7, 0, 0], [1, 2, 5, 9]]
    assert probs_pad.tolist() == [[0.5, 0.5, 0, 0], [0.25] * 4]
    assert mask.tolist() == [[True, True, False, False], [True] * 4]
    assert probs_pad.dtype == torch.float32 and ids_pad.dtype == torch.long


def test_empty_positions():
    ids, counts, offsets = rs_kd_draws(torch.zeros(0, 10), 8, 1.0, torch.Generator().manual_seed(0))
    assert ids.numel() == 0 and offsets.tolist() == [0]
    ids_pad, probs_pad, mask = to_sparse(ids, counts, offsets, 8)
    assert ids_pad.shape[0] == probs_pad.shape[0] == mask.shape[0] == 0


def test_sample_generator_depends_on_id_and_seed_only():
    z = torch.randn(10, 50, generator=torch.Generator().manual_seed(0))
    a = rs_kd_draws(z, 64, 1.0, sample_generator("00ab12cd34ef5678", 0))
    b = rs_kd_draws(z, 64, 1.0, sample_generator("00ab12cd34ef5678", 0))
    c = rs_kd_draws(z, 64, 1.0, sample_generator("00ab12cd34ef5678", 1))
    d = rs_kd_draws(z, 64, 1.0, sample_generator("00ab12cd34ef5679", 0))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], c[0]) and not torch.equal(a[0], d[0])


def test_rejects_bad_arguments():
    with pytest.raises(ValueError, match="n_draws"):
        rs_kd_draws(torch.zeros(2, 3), 0, 1.0)
    with pytest.raises(ValueError, match="temperature"):
        rs_kd_draws(torch.zeros(2, 3), 4, 0.0)


def test_blocks_and_rows_do_not_change_the_draws(monkeypatch):
    # positions are drawn a block at a time, and `rows` reads the valid positions in place: the same draws as
    # one pass over the copied-out positions
    from sekd.selection import draws as D

    g = torch.Generator().manual_seed(3)
    z = torch.randn(40, 300, generator=g) * 3
    rows = torch.tensor([0, 2, 3, 5, 8, 13, 21, 34, 39])
    whole = rs_kd_draws(z[rows], 16, 1.5, torch.Generator().manual_seed(9))
    monkeypatch.setattr(D, "_BLOCK_ELEMENTS", 2 * 300)  # two positions per block
    got = rs_kd_draws(z, 16, 1.5, torch.Generator().manual_seed(9), rows=rows)
    assert all(torch.equal(a, b) for a, b in zip(got, whole))
