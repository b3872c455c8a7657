"""Pure array arithmetic over cached exit scores: no model needed, so sweeps cost milliseconds.

Conventions: `scores` and `correct` are (K, N) arrays for K exits and N samples; `thresholds` has
K - 1 entries, one per side exit, where -inf means "never leave here"; the final exit takes the rest.
`exit_macs` is each exit's cumulative cost per sample: MACs, or any other cost (milliseconds) in the same unit
throughout. Results are frozen dataclasses: `Evaluation` (here), and results.json's own types where they are the
same quantity (`CostPoint`; `Gap` and `Overthinking`, whose fields say MACs, as results.json does, whatever the unit).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..exit_rule import as_thresholds, leaves, thresholds_to_json  # noqa: F401  (analysis.leaves etc. stay valid)
from .results import CostPoint, Gap, Outcome, Overthinking


@dataclass(frozen=True)
class Evaluation:
    """One threshold setting on one split: accuracy, the mean of the per-exit costs, and per exit the share, count
    and accuracy of the samples leaving there (None where none left)."""
    accuracy: float
    mean_cost: float
    exit_shares: tuple[float, ...]
    exit_counts: tuple[int, ...]
    exit_accuracy: tuple[float | None, ...]
    predicted_seconds: float | None = None  # the cost model's time for the whole split, given stage times

    def outcome(self) -> Outcome:
        """results.json's outcome of this setting, its costs being MACs."""
        return Outcome(self.accuracy, self.mean_cost, self.exit_shares, self.predicted_seconds)


def exit_points(scores: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Index of the exit each sample leaves at: the first side exit where it `leaves`, else the last.

    thresholds (K - 1,) gives (N,) exits; a stack of S settings (S, K - 1) gives (S, N)."""
    thresholds = np.asarray(thresholds)
    staying = np.ones((*thresholds.shape[:-1], scores.shape[1]), dtype=bool)
    exits = np.zeros(staying.shape, dtype=np.min_scalar_type(scores.shape[0] - 1))  # small ints: fast adds
    for k in range(scores.shape[0] - 1):  # a sample's exit is the number of side exits it stays past in a row
        staying &= ~leaves(scores[k], thresholds[..., k, None])
        exits += staying
    return exits.astype(np.intp)


def reach_counts(exits: np.ndarray, num_exits: int) -> np.ndarray:
    """How many samples run stage k: those leaving at exit k or later."""
    leaving = np.bincount(exits, minlength=num_exits)
    return leaving[::-1].cumsum()[::-1]


def evaluate(scores: np.ndarray, correct: np.ndarray, thresholds: np.ndarray, exit_macs: Sequence[int],
             stage_seconds_per_sample: Sequence[float] | None = None) -> Evaluation:
    """Accuracy, exit shares, per-exit counts and accuracy, the mean of the per-exit costs `exit_macs` and, given
    stage times, the predicted seconds for all N samples."""
    num_exits, n = scores.shape
    exits = exit_points(scores, thresholds)
    right = correct[exits, np.arange(n)]
    counts = np.bincount(exits, minlength=num_exits)
    hits = np.bincount(exits, weights=right, minlength=num_exits)
    predicted = None if stage_seconds_per_sample is None else float(
        reach_counts(exits, num_exits) @ np.asarray(stage_seconds_per_sample))
    return Evaluation(accuracy=float(right.mean()),
                      mean_cost=float(np.asarray(exit_macs, dtype=np.float64)[exits].mean()),
                      exit_shares=tuple((counts / n).tolist()), exit_counts=tuple(counts.tolist()),
                      exit_accuracy=tuple(float(h / c) if c else None for h, c in zip(hits, counts)),
                      predicted_seconds=predicted)


def oracle(correct: np.ndarray, exit_macs: Sequence[int]) -> CostPoint:
    """(mean cost, accuracy) with each sample at its first correct exit; samples wrong everywhere pay the full
    network."""
    any_right = correct.any(axis=0)
    first_right = np.where(any_right, correct.argmax(axis=0), correct.shape[0] - 1)
    return CostPoint(cost=float(np.asarray(exit_macs, dtype=np.float64)[first_right].mean()),
                     accuracy=float(any_right.mean()))


def sweep(scores: np.ndarray, correct: np.ndarray, cutoffs: np.ndarray, exit_macs: Sequence[int],
          stage_seconds_per_sample: Sequence[float] | None = None) -> list[Evaluation]:
    """One shared cutoff for every side exit: the evaluation of each value in `cutoffs`, in their order."""
    return [evaluate(scores, correct, np.full(scores.shape[0] - 1, cutoff), exit_macs, stage_seconds_per_sample)
            for cutoff in cutoffs]


def latency_costs(stage_seconds_per_sample: Sequence[float]) -> np.ndarray:
    """Milliseconds per sample of leaving at exit k (stages 0..k), a cost vector like exit MACs."""
    return 1000 * np.cumsum(np.asarray(stage_seconds_per_sample, dtype=np.float64))


def cost_accuracy_points(scores: np.ndarray, correct: np.ndarray, costs: Sequence[float],
                         settings: Sequence[np.ndarray]) -> list[CostPoint]:
    """Cost (mean per sample), accuracy and thresholds of each threshold setting on this split (thresholds as a
    tuple of floats, -inf never)."""
    points = []
    for thresholds in settings:
        t = np.asarray(thresholds, dtype=np.float64)
        r = evaluate(scores, correct, t, costs)
        points.append(CostPoint(r.mean_cost, r.accuracy, tuple(t.tolist())))
    return points


def non_dominated(points: Sequence[CostPoint]) -> list[CostPoint]:
    """The points no other point beats (no costlier and no less accurate, better in one), by rising cost."""
    out: list[CostPoint] = []
    for p in sorted(points, key=lambda p: (p.cost, -p.accuracy)):
        if not out or p.accuracy > out[-1].accuracy:
            out.append(p)
    return out


def overthinking(correct: np.ndarray, exit_macs: Sequence[float], exits: np.ndarray | None = None) -> Overthinking:
    """Samples an earlier exit got right, and cost spent after each sample's first correct exit.

    `exits` is where each sample left (default: the final exit, i.e. the full network). Wasted cost
    is summed over samples correct somewhere and divided by all N, so it compares with the mean cost.
    """
    num_exits, n = correct.shape
    costs = np.asarray(exit_macs, dtype=np.float64)
    exits = np.full(n, num_exits - 1) if exits is None else np.asarray(exits)
    any_right = correct.any(axis=0)
    first_right = correct.argmax(axis=0)
    earlier = any_right & (first_right < exits)
    wasted = np.where(earlier, costs[exits] - costs[first_right], 0.0).sum() / n
    return Overthinking(samples=int(n), correct_somewhere=int(any_right.sum()),
                        correct_earlier_wrong_final=int((earlier & ~correct[-1] & (exits == num_exits - 1)).sum()),
                        correct_earlier_wrong_at_exit=int((earlier & ~correct[exits, np.arange(n)]).sum()),
                        wasted_macs_per_sample=float(wasted), wasted_share=float(wasted / costs[exits].mean()))


def oracle_cost_at(correct: np.ndarray, exit_macs: Sequence[float], accuracy: float | np.ndarray) -> float | np.ndarray:
    """The least mean cost of reaching `accuracy` by any exit assignment, knowing the labels: a lower bound for
    every policy on this split.

    Everyone starts at the first exit; to gain accuracy the oracle moves the samples wrong there but right
    later to their first correct exit, cheapest extra cost first. Accuracies above the oracle's give nan.
    """
    costs = np.asarray(exit_macs, dtype=np.float64)
    n = correct.shape[1]
    later = ~correct[0] & correct.any(axis=0)
    extra = np.sort(costs[correct.argmax(axis=0)[later]] - costs[0])
    acc = (correct[0].sum() + np.arange(len(extra) + 1)) / n
    cost = costs[0] + np.concatenate(([0.0], np.cumsum(extra))) / n
    need = np.ceil(np.round((np.asarray(accuracy, dtype=np.float64) - acc[0]) * n, 9)).clip(min=0)
    out = np.where(need <= len(extra), cost[np.minimum(need, len(extra)).astype(int)], np.nan)
    return float(out) if out.ndim == 0 else out


def oracle_curve(correct: np.ndarray, exit_macs: Sequence[float], num: int = 100) -> list[CostPoint]:
    """Points of `oracle_cost_at` from the first exit's accuracy to the oracle's, for plots."""
    accuracies = np.linspace(correct[0].mean(), correct.any(axis=0).mean(), num)
    costs = oracle_cost_at(correct, exit_macs, accuracies)
    return [CostPoint(float(c), float(a)) for a, c in zip(accuracies, costs)]


def gap_to_oracle(accuracy: float, mean_macs: float, correct: np.ndarray, exit_macs: Sequence[float]) -> Gap:
    """A setting's extra mean cost over the hindsight oracle at the same accuracy (`oracle_cost_at`)."""
    best = oracle_cost_at(correct, exit_macs, accuracy)
    return Gap(accuracy=float(accuracy), mean_macs=float(mean_macs), oracle_macs=best,
               extra_macs=float(mean_macs - best), cost_ratio=float(mean_macs / best))
