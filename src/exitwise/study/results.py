"""A study's results as frozen dataclasses: the one definition of results.json (docs/results-schema.md reads it).

Names, one per quantity: `accuracy` is always on the test split and `val_accuracy` on validation;
`mean_macs` is MACs per sample; times say what they are (`predicted_seconds` from the per-stage cost
model, `measured_seconds` from a real run, `ms_per_image` measured per image). Thresholds are floats
in memory, -inf for "never leave at this exit", written as null in JSON. No numpy and no torch here.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..records import NEVER, Thresholds, from_json, to_json
from ..refs import DatasetRef, Load, Machine, MicroBatchProbe, ModelRef, PrecisionCheck, Software

SCHEMA_VERSION = 2
RESULTS_FILE = "results.json"  # what `exitwise study` writes
"""2: typed results (this module). 1: the dictionary before it; see docs/results-schema.md for the renames."""


@dataclass(frozen=True)
class Outcome:
    """One threshold setting on one split, from the cached scores."""
    accuracy: float
    mean_macs: float
    exit_shares: tuple[float, ...]
    predicted_seconds: float | None = None  # the cost model's time for the whole split


@dataclass(frozen=True)
class Setting:
    """What runs: an exit policy and one threshold per side exit."""
    label: str
    policy: str
    thresholds: Thresholds


@dataclass(frozen=True)
class Exit:
    """Exit k with every sample running through it."""
    index: int
    macs: int  # cumulative MACs of a sample leaving here
    accuracy: float
    val_accuracy: float


@dataclass(frozen=True)
class Leavers:
    """The samples that left at one exit in the fixed-cutoff run."""
    index: int
    count: int
    accuracy: float | None  # None when no sample left here
    measured_seconds: float | None  # the stage's time in the real run on the timed images (None: not measured)


@dataclass(frozen=True)
class FixedCutoff:
    """One shared cutoff at every side exit: its outcome on every test image, and a real early-exit run on the first
    `timed_images` of them (what `measured_seconds` and the leavers' stage times are for)."""
    cutoff: float
    test: Outcome
    per_exit: tuple[Leavers, ...]
    measured_seconds: float | None
    ms_per_image: float | None
    timed_images: int | None = None


@dataclass(frozen=True)
class FullNetwork:
    """Every stage and the final classifier, no side exits."""
    accuracy: float
    mean_macs: float
    measured_seconds: float | None
    ms_per_image: float | None
    note: str = ("the all-exits pass over the test set, measured, without its side heads' measured time")


@dataclass(frozen=True)
class SweepPoint:
    """One shared cutoff for every side exit, on test."""
    cutoff: float
    test: Outcome


@dataclass(frozen=True)
class CalibrationEntry:
    """Thresholds chosen on validation for one desired accuracy by one method, evaluated on test."""
    method: str
    desired_accuracy: float
    status: str  # "ok", or "unreachable" (then thresholds, val_accuracy and test are None)
    thresholds: Thresholds | None
    val_accuracy: float | None
    test: Outcome | None
    delta: float | None = None  # "guaranteed" only: the allowed failure probability


@dataclass(frozen=True)
class TimedRun:
    """A setting run for real with early exit on the first `images` test images."""
    images: int
    measured_seconds: float
    predicted_seconds: float

    @property
    def ms_per_image(self) -> float:
        return 1e3 * self.measured_seconds / self.images


@dataclass(frozen=True)
class Choice:
    """A setting chosen on validation, its test outcome, and (after `verify`) its real run and speedup."""
    setting: Setting
    test: Outcome
    timed: TimedRun | None = None
    speedup: float | None = None  # the full network's ms per image over this setting's


@dataclass(frozen=True)
class Best:
    founding_rule: Choice  # the founding system's rule: highest validation accuracy per predicted second
    fastest_within_points: Choice  # fastest on validation within `within_points` of the final exit's accuracy
    within_points: float

    def items(self) -> list[tuple[str, Choice]]:
        """(display name, choice) of both."""
        return [("founding rule", self.founding_rule),
                (f"fastest within {self.within_points:g} points", self.fastest_within_points)]


@dataclass(frozen=True)
class Gap:
    """A setting's mean MACs against the least any exit assignment needs at its accuracy, knowing the labels."""
    accuracy: float
    mean_macs: float
    oracle_macs: float
    extra_macs: float
    cost_ratio: float


@dataclass(frozen=True)
class Overthinking:
    samples: int
    correct_somewhere: int
    correct_earlier_wrong_final: int
    correct_earlier_wrong_at_exit: int
    wasted_macs_per_sample: float
    wasted_share: float


@dataclass(frozen=True)
class Oracle:
    """Each test sample at its first correct exit (wrong everywhere: the full network)."""
    accuracy: float
    mean_macs: float
    overthinking_full_network: Overthinking
    overthinking_fixed_cutoff: Overthinking
    gap_at_full_network: Gap
    gap_at_fixed_cutoff: Gap
    gap_at_founding_rule: Gap
    gap_at_fastest_within_points: Gap


@dataclass(frozen=True)
class CostPoint:
    """A point on cost-accuracy axes (the unit is the enclosing `Frontiers.unit`); optional fields as they apply."""
    cost: float
    accuracy: float
    thresholds: Thresholds | None = None
    val_cost: float | None = None
    val_accuracy: float | None = None
    desired_accuracy: float | None = None


@dataclass(frozen=True)
class Mark:
    """A labelled point drawn over the frontiers: a setting the study or `calibrate` chose."""
    label: str
    cost: float
    accuracy: float


@dataclass(frozen=True)
class Frontiers:
    """Mean cost vs test accuracy: per policy its Pareto frontier chosen on validation, the founding methods, the
    hindsight oracle, and labelled marks."""
    unit: str  # "MACs" or "ms"
    policies: dict[str, tuple[CostPoint, ...]]
    shared_cutoffs: tuple[CostPoint, ...]
    founding_percentile: tuple[CostPoint, ...]
    oracle: tuple[CostPoint, ...]
    marks: tuple[Mark, ...] = ()


@dataclass(frozen=True)
class TimingCheck:
    """The cost model's prediction for a real run, against the run."""
    label: str
    predicted_seconds: float
    measured_seconds: float

    @property
    def relative_error(self) -> float:
        return (self.predicted_seconds - self.measured_seconds) / self.measured_seconds


@dataclass(frozen=True)
class TimingModel:
    stage_seconds_per_sample: tuple[float, ...]
    checks: tuple[TimingCheck, ...]
    machine_load_at_start: Load | None

    @property
    def mean_abs_relative_error(self) -> float | None:
        return sum(abs(c.relative_error) for c in self.checks) / len(self.checks) if self.checks else None


@dataclass(frozen=True)
class StudyResults:
    """Everything results.json holds."""
    exitwise_version: str
    created: str
    software: Software | None
    dataset: DatasetRef
    model: ModelRef
    machine: Machine | None
    precision: str
    precision_check: PrecisionCheck | None
    batch_size: int
    micro_batch: int | None
    micro_batch_probe: MicroBatchProbe | None
    policy: str
    max_cutoff: float
    exits: tuple[Exit, ...]
    full_network: FullNetwork
    fixed_cutoff: FixedCutoff
    sweep: tuple[SweepPoint, ...]
    calibration: tuple[CalibrationEntry, ...]
    best: Best
    oracle: Oracle
    frontiers: Frontiers
    timing_model: TimingModel
    schema_version: int = field(default=SCHEMA_VERSION)

    def to_json(self) -> dict:
        return to_json(self)

    @classmethod
    def from_json(cls, doc: dict) -> StudyResults:
        if doc.get("schema_version") != SCHEMA_VERSION:
            from ..errors import UserError
            raise UserError(f"results schema {doc.get('schema_version', 1)} is not {SCHEMA_VERSION} "
                            f"(see docs/results-schema.md)")
        return from_json(cls, doc)


# ---- what `measure` records beside the logits (logits.safetensors' metadata "info")


@dataclass(frozen=True)
class FixedCutoffRun:
    """The real early-exit run at the study's fixed cutoff, on the first `images` test images."""
    policy: str
    cutoff: float
    images: int
    seconds: float
    stage_seconds: tuple[float, ...]


@dataclass(frozen=True)
class MeasuredTimes:
    """The times `measure` took (null where a cache predates them)."""
    machine_load_at_start: Load | None = None
    all_exits_seconds: float | None = None     # the all-exits pass over the test split
    full_network_seconds: float | None = None  # that pass without its side heads' time
    fixed_cutoff: FixedCutoffRun | None = None


@dataclass(frozen=True)
class Measurements:
    """How a study's logits were measured: the model, data, precision, batch, machine and times. Every field has a
    default, so an older cache missing some still reads (`model`, `dataset`: None, also where one holds `{}`)."""
    model: ModelRef | None = None
    dataset: DatasetRef | None = None            # `Splits.describe()`
    precision: str = ""
    batch_size: int | None = None
    micro_batch: int | None = None
    machine: Machine | None = None
    created: str = ""
    software: Software | None = None
    precision_check: PrecisionCheck | None = None
    micro_batch_probe: MicroBatchProbe | None = None
    backbone_macs: float | None = None           # the full network's MACs per sample, no side heads
    measured: MeasuredTimes = field(default_factory=MeasuredTimes)

    def to_json(self) -> dict:
        return to_json(self)

    @classmethod
    def from_json(cls, doc: dict) -> Measurements:
        return from_json(cls, doc)


# ---- `exitwise calibrate`: a threshold search's result and calibration.json


@dataclass(frozen=True)
class Found:
    """A setting a search found on the calibration split, with its accuracy, mean cost (in the search's unit) and
    exit shares there."""
    thresholds: Thresholds
    accuracy: float
    mean_cost: float
    exit_shares: tuple[float, ...]
    certifiable_target: float | None = None  # "guaranteed" only: the highest target this setting passes


@dataclass(frozen=True)
class SearchResult:
    """One calibration search (`calibration.empirical_thresholds`, `guaranteed_thresholds`, `budget_thresholds`):
    `status` "ok" with the setting found, or "unreachable" (then `thresholds` is None) with a `message`, what is
    `reachable` and the `closest` setting. Fields that do not apply to the method are None."""
    method: str                   # "empirical", "guaranteed" or "budget"
    status: str                   # "ok" or "unreachable"
    target: float | None = None   # the accuracy asked for (empirical, guaranteed)
    budget: float | None = None   # the mean cost allowed (budget)
    thresholds: Thresholds | None = None
    accuracy: float | None = None
    mean_cost: float | None = None
    exit_shares: tuple[float, ...] | None = None
    certifiable_target: float | None = None
    delta: float | None = None    # guaranteed: the allowed failure probability
    test_size: int | None = None  # guaranteed: the new samples the accuracy is promised over (None: expected)
    samples: dict[str, int] | None = None  # guaranteed: {"ordering", "testing"} calibration samples
    guarantee: str | None = None
    assumption: str | None = None
    procedure: str | None = None
    message: str | None = None
    reachable: dict[str, float] | None = None  # {"max_accuracy"} or {"max_certifiable_target"}
    closest: Found | None = None


@dataclass(frozen=True)
class CostUnit:
    unit: str                # "MACs" or "ms" (milliseconds per sample at the study's batch size)
    batch_size: int | None


@dataclass(frozen=True)
class SplitOutcome:
    """Calibrated thresholds on one split's cached scores."""
    samples: int
    accuracy: float
    mean_macs: float
    ms_per_sample: float     # predicted from the stage times used (`CalibrationReport.timing`)
    exit_shares: tuple[float, ...]


@dataclass(frozen=True)
class StageTimes:
    """The stage times a calibration used: the study's cost model, or re-timed (`study.time_stages`, whose
    evidence fills the other fields; null for the study's own)."""
    source: str                   # "the study's cost model" or "re-timed (study.time_stages)"
    device: str | None
    stage_seconds_per_sample: tuple[float, ...]
    machine: Machine | None = None
    machine_load_at_start: Load | None = None
    precision: str | None = None
    precision_check: PrecisionCheck | None = None
    micro_batch: int | None = None
    micro_batch_probe: MicroBatchProbe | None = None
    batch_size: int | None = None
    images: int | None = None
    seconds: float | None = None


@dataclass(frozen=True)
class ExitTemperature:
    """One exit's softmax temperature (fitted on validation) and its fit on one split, before and after."""
    exit: int
    temperature: float
    nll_before: float
    nll_after: float
    ece_before: float  # expected calibration error
    ece_after: float


@dataclass(frozen=True)
class TemperatureReport:
    """`--temperature-scaling`'s effect, per exit, on each split."""
    val: tuple[ExitTemperature, ...]
    test: tuple[ExitTemperature, ...]


@dataclass(frozen=True)
class CalibrationReport:
    """Everything calibration.json holds (docs/results-schema.md)."""
    exitwise_version: str = ""
    created: str = ""
    source: str = ""
    study: Measurements = field(default_factory=Measurements)
    policy: str = ""
    meaning: str = ""
    cost: CostUnit | None = None
    timing: StageTimes | None = None
    within_points: float | None = None
    temperatures: tuple[float, ...] | None = None
    temperature_report: TemperatureReport | None = None
    result: SearchResult | None = None
    evaluated: str = "thresholds"  # or "closest setting" (unreachable)
    calibration_split: SplitOutcome | None = None
    test: SplitOutcome | None = None
    frontier: Frontiers | None = None

    def to_json(self) -> dict:
        return to_json(self)

    @classmethod
    def from_json(cls, doc: dict) -> CalibrationReport:
        return from_json(cls, doc)
