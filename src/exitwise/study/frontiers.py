"""Cost-accuracy frontiers of exit policies from cached scores: the settings a study or `calibrate` chooses among.

Each policy's Pareto frontier is chosen on validation (`calibration.pareto_frontier`) and evaluated
on test; beside it the founding methods (one shared entropy cutoff, the seed percentile rule) and
the hindsight oracle, all on one pair of axes in one cost unit (MACs or ms per sample).
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from . import analysis, calibration
from ..policies import ExitArrays, get_policy
from .results import CostPoint, Frontiers, Setting

Split = tuple[ExitArrays, ExitArrays]  # (validation, test)


def latency_frontier(val_by_policy: dict[str, ExitArrays], stage_seconds_per_sample: np.ndarray) -> list[Setting]:
    """Each policy's Pareto frontier of (predicted time, accuracy) on validation, from its scores there: the
    settings no other setting of that policy beats on both."""
    costs = analysis.latency_costs(stage_seconds_per_sample)
    settings = []
    for name, val in val_by_policy.items():
        settings += [Setting(f"frontier point {i + 1}", name, p.thresholds)
                     for i, p in enumerate(calibration.pareto_frontier(val.scores, val.correct, costs))]
    return settings


def policy_frontiers(by_policy: dict[str, Split], founding: Split, costs: Sequence[float], unit: str,
                     desired: Sequence[float], num_cutoffs: int = 100,
                     spaces: dict[str, calibration.SearchSpace] | None = None) -> Frontiers:
    """(mean cost, test accuracy): per policy in `by_policy` its frontier chosen on validation and evaluated on
    test; the founding methods on `founding`, the plain entropy policy's arrays (one shared cutoff from 0 to
    ln C; seed percentiles for each desired accuracy); and the hindsight oracle on test. `spaces`: each policy's
    validation search space in these costs, if built already."""
    policies = {}
    for name, (val, test) in by_policy.items():
        chosen = calibration.pareto_frontier(val.scores, val.correct, costs, space=(spaces or {}).get(name))
        on_test = analysis.cost_accuracy_points(test.scores, test.correct, costs, [p.thresholds for p in chosen])
        policies[name] = tuple(dataclasses.replace(t, val_cost=v.cost, val_accuracy=v.accuracy)
                               for t, v in zip(on_test, chosen))
    val, test = founding
    num_exits, num_classes = len(costs), founding[1].logits.shape[-1]
    max_score = get_policy("entropy").max_score(num_classes)
    cutoffs = np.linspace(0.0, max_score, num_cutoffs)
    shared = analysis.cost_accuracy_points(test.scores, test.correct, costs, [np.full(num_exits - 1, c) for c in cutoffs])
    percentile = [calibration.seed_percentile(val.scores, val.correct, d, max_score) for d in desired]
    founding_points = analysis.cost_accuracy_points(test.scores, test.correct, costs, percentile)
    return Frontiers(unit=unit, policies=policies, shared_cutoffs=tuple(shared),
                     founding_percentile=tuple(dataclasses.replace(p, desired_accuracy=d)
                                               for p, d in zip(founding_points, desired)),
                     oracle=tuple(analysis.oracle_curve(test.correct, costs)))
