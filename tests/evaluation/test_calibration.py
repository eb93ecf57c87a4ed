import math

import numpy as np
import pytest

from sekd.evaluation.calibration import N_BINS, choice_logliks, confidence_correct, ece, suite_ece, task_ece


def slow_ece(conf, correct, n_bins=N_BINS):
    """Obvious reference: loop over bins ((b-1)/M, b/M], the first also taking 0."""
    total = 0.0
    for b in range(n_bins):
        lo, hi = b / n_bins, (b + 1) / n_bins
        members = [i for i, c in enumerate(conf) if (lo < c <= hi) or (b == 0 and c == 0)]
        if members:
            acc = sum(correct[i] for i in members) / len(members)
            avg = sum(conf[i] for i in members) / len(members)
            total += len(members) / len(conf) * abs(acc - avg)
    return total


def test_hand_computed():
    # bins: 0.95 -> 14, 0.90 and 0.92 -> 13, 0.50 -> 7, 0.34 -> 5
    conf = [0.95, 0.90, 0.92, 0.50, 0.34]
    correct = [1, 0, 1, 1, 0]
    expected = (0.05 + 2 * abs(0.5 - 0.91) + 0.5 + 0.34) / 5  # = 0.342
    assert ece(conf, correct) == pytest.approx(expected, abs=1e-12)
    assert expected == pytest.approx(0.342)


def test_bin_edges():
    # 1/15 closes bin 0, 1.0 closes the last bin
    assert ece([1 / 15], [0]) == pytest.approx(1 / 15)
    assert ece([1.0], [1]) == 0.0
    assert ece([1.0, 1.0], [1, 0]) == pytest.approx(0.5)


@pytest.mark.parametrize("seed", range(5))
def test_matches_slow_reference(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 300))
    conf = rng.uniform(0.2, 1.0, n)
    conf[: n // 10] = np.round(conf[: n // 10] * 15) / 15  # some exactly on bin edges
    conf = np.clip(conf, 0.2, 1.0)
    correct = rng.random(n) < 0.6
    assert ece(conf, correct) == pytest.approx(slow_ece(conf.tolist(), correct.tolist()), abs=1e-12)


def test_perfectly_calibrated_is_near_zero():
    rng = np.random.default_rng(0)
    conf = rng.uniform(0.25, 1.0, 400_000)
    correct = rng.random(conf.size) < conf  # P(correct | conf) = conf
    assert ece(conf, correct) < 0.005
    assert ece(conf, ~correct) > 0.2  # and the opposite is far from calibrated


def test_confidence_from_logliks():
    p = np.array([0.7, 0.2, 0.1])
    conf, hit = confidence_correct([np.log(p) - 50.0, np.log(p[::-1])], [0, 0])
    np.testing.assert_allclose(conf, [0.7, 0.7])
    assert hit.tolist() == [True, False]


def test_from_lm_eval_samples():
    # the shape lm-eval logs: one (loglik, is_greedy) per choice; the target may be an int or its text
    samples = [
        {"filtered_resps": [(-1.0, False), (-3.0, False)], "target": 0},
        {"filtered_resps": [[-2.0, False], [-0.5, True], [-4.0, False]], "target": "2"},
        {"filtered_resps": [(np.float64(-9.0), False), (np.float64(-9.5), False)], "target": np.int64(1)},
    ]
    logliks, gold = choice_logliks(samples)
    assert gold == [0, 2, 1]
    assert logliks[1] == [-2.0, -0.5, -4.0]
    conf, hit = confidence_correct(logliks, gold)
    assert task_ece(samples) == pytest.approx(ece(conf, hit))
    assert suite_ece({"a": samples, "b": samples[:1]}, ["a", "b"]) == pytest.approx(
        (task_ece(samples) + task_ece(samples[:1])) / 2
    )
    with pytest.raises(ValueError):
        choice_logliks([{"filtered_resps": [(-1.0, False)], "target": [0, 1]}])


def test_empty():
    assert math.isnan(ece([], []))
    with pytest.raises(ValueError):
        ece([0.5, 0.6], [1])
