"""Per-exit thresholds chosen on a validation split for a desired accuracy.

Both methods read cached scores (K, N) and correctness (K, N) and return K - 1 thresholds
(-inf: the exit never lets a sample leave).
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from .errors import UserError


def check_desired_accuracy(desired: float) -> float:
    if not (0.0 < desired <= 1.0):  # also false for NaN
        raise UserError(f"desired accuracy must be in (0, 1], got {desired}")
    return float(desired)


def largest_accurate_threshold(scores: np.ndarray, correct: np.ndarray, desired: float) -> float:
    """The largest t such that the samples with score <= t are at least `desired` accurate (-inf if none)."""
    order = np.argsort(scores, kind="stable")
    s, c = scores[order], correct[order]
    accuracy = np.cumsum(c) / np.arange(1, len(s) + 1)
    # a threshold lets out every sample with an equal score, so only the end of a tie group counts
    group_end = np.append(s[1:] != s[:-1], True)
    ok = np.flatnonzero(group_end & (accuracy >= desired))
    return float(s[ok[-1]]) if len(ok) else -np.inf


def per_exit(scores: np.ndarray, correct: np.ndarray, desired: float) -> np.ndarray:
    """exitwise's rule: at each side exit in turn, the largest threshold whose leavers (of the samples
    still reaching that exit) are at least `desired` accurate on the validation split."""
    check_desired_accuracy(desired)
    reaching = np.ones(scores.shape[1], dtype=bool)
    thresholds = np.full(scores.shape[0] - 1, -np.inf)
    for k in range(scores.shape[0] - 1):
        if reaching.any():
            thresholds[k] = largest_accurate_threshold(scores[k, reaching], correct[k, reaching], desired)
        reaching &= ~(scores[k] <= thresholds[k])
    return thresholds


def seed_percentile(scores: np.ndarray, correct: np.ndarray, desired: float, max_score: float) -> np.ndarray:
    """The founding system's rule, with the exit comparison the right way round: if an exit is at least
    `desired` accurate over all validation samples, everyone may leave there (threshold = max score);
    otherwise the threshold is the (1 - desired) percentile of that exit's scores."""
    check_desired_accuracy(desired)
    thresholds = np.empty(scores.shape[0] - 1)
    for k in range(scores.shape[0] - 1):
        if correct[k].mean() >= desired:
            thresholds[k] = max_score
        else:
            thresholds[k] = np.percentile(scores[k], 100 * (1 - desired))
    return thresholds


METHODS: dict[str, Callable[..., np.ndarray]] = {
    "per-exit": lambda scores, correct, desired, max_score: per_exit(scores, correct, desired),
    "seed-percentile": seed_percentile,
}
