"""Expected calibration error of multiple-choice answers (docs/method.md §11).

confidence = max softmax over an item's per-choice log-likelihoods; correct = argmax is gold;
ECE = sum_b (n_b / n) |acc_b - conf_b| over 15 equal-width confidence bins ((b-1)/15, b/15].
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

N_BINS = 15


def ece(confidence: Sequence[float] | np.ndarray, correct: Sequence[bool] | np.ndarray, n_bins: int = N_BINS) -> float:
    """sum_b (n_b/n) |acc_b - conf_b| with equal-width bins on (0, 1]; a fraction, not x100."""
    conf = np.asarray(confidence, dtype=np.float64)
    hit = np.asarray(correct, dtype=np.float64)
    if conf.shape != hit.shape or conf.ndim != 1:
        raise ValueError(f"confidence {conf.shape} and correct {hit.shape} must be equal 1-d shapes")
    if conf.size == 0:
        return float("nan")
    b = np.clip(np.ceil(conf * n_bins).astype(np.int64) - 1, 0, n_bins - 1)  # bin b holds (b/M, (b+1)/M]
    gap = np.abs(np.bincount(b, hit, n_bins) - np.bincount(b, conf, n_bins))  # n_b * |acc_b - conf_b|
    return float(gap.sum() / conf.size)


def confidence_correct(logliks: Iterable[Sequence[float]], gold: Iterable[int]) -> tuple[np.ndarray, np.ndarray]:
    """Per item: max softmax over its choices' log-likelihoods, and whether the argmax is gold."""
    conf, hit = [], []
    for ll, g in zip(logliks, gold, strict=True):
        z = np.asarray(ll, dtype=np.float64)
        p = np.exp(z - z.max())
        p /= p.sum()
        conf.append(p.max())
        hit.append(int(np.argmax(z)) == int(g))
    return np.asarray(conf), np.asarray(hit, dtype=bool)


def _gold(target: Any) -> int:
    if isinstance(target, str) and target.strip().isdigit():  # templates may render the index as text
        return int(target)
    if isinstance(target, (bool, list, tuple)) or not isinstance(target, (int, np.integer)):
        raise ValueError(f"expected one gold choice index, got {target!r}")
    return int(target)


def choice_logliks(samples: Iterable[dict]) -> tuple[list[list[float]], list[int]]:
    """(per-choice log-likelihoods, gold index) from lm-eval's `samples[task]` of a multiple_choice task."""
    logliks, gold = [], []
    for s in samples:
        # filtered_resps: one (loglik, is_greedy) per choice, after the task's "none" filter
        logliks.append([float(r[0]) for r in s["filtered_resps"]])
        gold.append(_gold(s["target"]))
    return logliks, gold


def task_ece(samples: Iterable[dict], n_bins: int = N_BINS) -> float:
    """ECE of one multiple-choice task's logged samples; a fraction."""
    conf, hit = confidence_correct(*choice_logliks(samples))
    return ece(conf, hit, n_bins)


def suite_ece(samples: dict[str, list[dict]], tasks: Sequence[str], n_bins: int = N_BINS) -> float:
    """Unweighted mean of the per-task ECEs over the suite's multiple-choice tasks; a fraction."""
    if not tasks:
        return float("nan")
    return float(np.mean([task_ece(samples[t], n_bins) for t in tasks]))
