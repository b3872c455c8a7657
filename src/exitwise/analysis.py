"""Pure array arithmetic over cached exit scores: no model needed, so sweeps cost milliseconds.

Conventions: `scores` and `correct` are (K, N) arrays for K exits and N samples; `thresholds` has
K - 1 entries, one per side exit, where -inf means "never leave here"; the final exit takes the rest.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from .errors import UserError


def as_thresholds(values: Sequence[float | None], num_exits: int) -> np.ndarray:
    """One threshold per side exit as a float array (None -> -inf), checked for length and NaN."""
    if len(values) != num_exits - 1:
        raise UserError(f"expected {num_exits - 1} thresholds (one per side exit), got {len(values)}")
    out = np.array([-np.inf if v is None else v for v in values], dtype=np.float64)
    if np.isnan(out).any():
        raise UserError("thresholds must be numbers, not NaN")
    return out


def thresholds_to_json(thresholds: np.ndarray) -> list[float | None]:
    """-inf (never leave) becomes None so the JSON stays standard."""
    return [None if np.isneginf(t) else float(t) for t in thresholds]


def exit_points(scores: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Index of the exit each sample leaves at: the first side exit with score <= threshold, else the last."""
    leave = np.empty(scores.shape, dtype=bool)
    leave[:-1] = scores[:-1] <= np.asarray(thresholds)[:, None]
    leave[-1] = True
    return leave.argmax(axis=0)


def reach_counts(exits: np.ndarray, num_exits: int) -> np.ndarray:
    """How many samples run stage k: those leaving at exit k or later."""
    leaving = np.bincount(exits, minlength=num_exits)
    return leaving[::-1].cumsum()[::-1]


def evaluate(scores: np.ndarray, correct: np.ndarray, thresholds: np.ndarray, exit_macs: Sequence[int],
             stage_seconds_per_sample: Sequence[float] | None = None) -> dict:
    """Overall accuracy, exit shares, per-exit counts and accuracy, mean MACs (and predicted seconds)."""
    num_exits, n = scores.shape
    exits = exit_points(scores, thresholds)
    right = correct[exits, np.arange(n)]
    counts = np.bincount(exits, minlength=num_exits)
    hits = np.bincount(exits, weights=right, minlength=num_exits)
    result = {
        "overall_accuracy": float(right.mean()),
        "exit_shares": (counts / n).tolist(),
        "exit_counts": counts.tolist(),
        "exit_accuracy": [float(h / c) if c else None for h, c in zip(hits, counts)],
        "mean_macs": float(np.asarray(exit_macs, dtype=np.float64)[exits].mean()),
    }
    if stage_seconds_per_sample is not None:
        result["seconds"] = float(reach_counts(exits, num_exits) @ np.asarray(stage_seconds_per_sample))
    return result


def oracle(correct: np.ndarray, exit_macs: Sequence[int]) -> dict:
    """Each sample at its first correct exit; samples wrong everywhere pay the full network."""
    any_right = correct.any(axis=0)
    first_right = np.where(any_right, correct.argmax(axis=0), correct.shape[0] - 1)
    return {"accuracy": float(any_right.mean()),
            "mean_macs": float(np.asarray(exit_macs, dtype=np.float64)[first_right].mean())}


def sweep(scores: np.ndarray, correct: np.ndarray, cutoffs: np.ndarray, exit_macs: Sequence[int],
          stage_seconds_per_sample: Sequence[float] | None = None) -> list[dict]:
    """One shared cutoff for every side exit, for each value in `cutoffs`."""
    rows = []
    for cutoff in cutoffs:
        r = evaluate(scores, correct, np.full(scores.shape[0] - 1, cutoff), exit_macs, stage_seconds_per_sample)
        rows.append({"cutoff": float(cutoff), **r})
    return rows
