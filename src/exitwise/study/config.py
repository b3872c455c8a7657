"""The study's and calibration's options, importable without torch (the CLI builds its flags from them); each checks
itself when made, importing what it checks against only then."""
from __future__ import annotations

from dataclasses import dataclass

import math

from ..config import DEFAULT_DELTA, as_tuple, check_micro_batch, check_precision
from ..errors import UserError

DEFAULT_DESIRED = tuple(round(0.60 + 0.05 * i, 2) for i in range(7))
CALIBRATION_METHODS = ("per-exit", "seed-percentile")  # calibration.METHODS, by name
COSTS = ("macs", "latency")


@dataclass
class StudyConfig:
    cutoff: float = 0.6
    num_cutoffs: int = 100
    desired_accuracies: tuple[float, ...] = DEFAULT_DESIRED
    methods: tuple[str, ...] = CALIBRATION_METHODS
    policy: str = "entropy"
    batch_size: int = 256
    precision: str = "auto"      # auto: the fastest of fp32, bf16, mixed measured here that agrees with fp32
    precision_check_images: int = 1000
    device: str = "auto"         # auto: cuda, else mps, else cpu
    micro_batch: int | None = None  # rows through the network together; None: the fastest, measured here
    timing_check_images: int = 1000  # the first test images every real early-exit run is timed on
    within_points: float = 0.5
    delta: float = DEFAULT_DELTA  # allowed failure probability of the "guaranteed" calibration
    progress: bool = True

    def __post_init__(self):
        from ..device import resolve_device
        from ..policies import get_policy
        from . import calibration
        self.desired_accuracies = as_tuple(self.desired_accuracies, "desired_accuracies")
        self.methods = as_tuple(self.methods, "methods")
        if not math.isfinite(self.cutoff) or self.cutoff < 0:
            raise UserError(f"cutoff must be a non-negative number, got {self.cutoff}")
        if not self.desired_accuracies:
            raise UserError("give at least one desired accuracy")
        if not self.methods:  # else the study fails after its long measuring, choosing among no settings
            raise UserError(f"give at least one calibration method ({', '.join(calibration.METHODS)})")
        for d in self.desired_accuracies:
            calibration.check_desired_accuracy(d)
        calibration.check_delta(self.delta)
        calibration.check_points(self.within_points)
        if self.num_cutoffs < 1 or self.timing_check_images < 1:
            raise UserError(f"num_cutoffs and timing_check_images must be at least 1, got {self.num_cutoffs} and "
                            f"{self.timing_check_images}")
        unknown = [m for m in self.methods if m not in calibration.METHODS]
        if unknown:
            raise UserError(f"unknown calibration method {unknown[0]!r}; known: {', '.join(calibration.METHODS)}")
        if self.batch_size < 1:
            raise UserError(f"batch size must be positive, got {self.batch_size}")
        if get_policy(self.policy).max_score(2) <= 0:  # patience: thresholds are -p, no cutoff range to sweep
            raise UserError(f"the study sweeps cutoffs from 0 up: use entropy, max-prob or margin; the "
                            f"{self.policy!r} policy is in every study's frontiers and in `exitwise calibrate`")
        check_precision(self.precision)
        check_micro_batch(self.micro_batch)
        resolve_device(self.device)


@dataclass(frozen=True)
class CalibrateConfig:
    """`exitwise calibrate`: exactly one goal (an accuracy `target`, a target `within_points` of the final exit's
    accuracy, or a budget in MACs or milliseconds per sample), how to search, and where to re-time the stages."""
    policy: str = "entropy"
    target: float | None = None
    within_points: float | None = None
    budget_macs: float | None = None
    budget_ms: float | None = None
    guarantee: bool = False
    delta: float = DEFAULT_DELTA
    cost: str = "macs"           # what a target search minimizes: "macs" or "latency"
    temperature_scaling: bool = False
    device: str | None = None    # re-time the stages there first; None: the study's measured times
    precision: str | None = None
    micro_batch: int | None = None

    def __post_init__(self):
        from ..device import resolve_device
        from ..policies import get_policy
        from . import calibration
        goals = {"target": self.target, "within_points": self.within_points, "budget_macs": self.budget_macs,
                 "budget_ms": self.budget_ms}
        given = [name for name, v in goals.items() if v is not None]
        if len(given) != 1:
            raise UserError(f"give exactly one of {', '.join(goals)}; got {', '.join(given) or 'none'}")
        if self.cost not in COSTS:
            raise UserError(f"unknown cost {self.cost!r}; choose one of {', '.join(COSTS)}")
        if self.delta != DEFAULT_DELTA and not self.guarantee:  # else silently unused
            raise UserError("--delta is the failure probability of --guarantee: give --guarantee too")
        if self.cost == "latency" and self.budget_macs is not None:  # a budget's unit is its own: MACs were used
            raise UserError("--cost latency with --budget-macs: a budget sets its own unit (--budget-ms for latency)")
        calibration.check_goal(self.target, self.budget, self.guarantee, self.delta, self.within_points)
        get_policy(self.policy)
        if self.device is not None:
            resolve_device(self.device)
        elif self.precision is not None or self.micro_batch is not None:
            raise UserError("--precision and --micro-batch are for re-timing the stages: give --device too")
        check_precision(self.precision or "auto")
        check_micro_batch(self.micro_batch)

    @property
    def budget(self) -> float | None:
        return self.budget_macs if self.budget_macs is not None else self.budget_ms
