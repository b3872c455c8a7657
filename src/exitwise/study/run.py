"""The founding early-exit study, done right: one pass per split, then array arithmetic.

`run_study` is three calls. `measure` needs the model: the precision and micro-batch probes, every
exit's logits on the validation and test splits, and each stage's time (what `logits.safetensors`
holds). `analyse` derives everything else from those arrays alone (per-exit accuracy, the oracle, a
fixed cutoff, the cutoff sweep, calibrated thresholds, frontiers, the best settings), times from a
per-stage cost model. `verify` runs the best settings for real with early exit to check it.
"""
from __future__ import annotations

import dataclasses
import math
import platform
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from ..config import __version__, check_micro_batch, check_precision
from .config import StudyConfig
from . import analysis, calibration
from ..models.costs import backbone_macs, exit_macs
from ..data import ImageSet, Splits
from ..early_exit import EarlyExitModel
from .frontiers import Split, latency_frontier, policy_frontiers
from ..errors import UserError
from ..io import atomic_write_json, staged_output
from .logits_cache import FILENAME as LOGITS_FILENAME, ExitLogits, save_logits
from ..models import ModelRef, MultiExitNetwork
from ..refs import Software
from ..device import machine, machine_load, resolve_device
from ..tune import tune
from ..policies import POLICIES, ExitArrays, exit_arrays, get_policy
from .results import (NEVER, RESULTS_FILE, Best, CalibrationEntry, Choice, Exit, FixedCutoff, FixedCutoffRun,
                      FullNetwork, Gap, Leavers, Mark, MeasuredTimes, Measurements, Oracle, Outcome, Setting,
                      StudyResults, StageTimes, SweepPoint, TimedRun, TimingCheck, TimingModel)
from ..runtime import Run, all_exit_logits, run_early_exit, warm_up

def seconds_per_sample(run: Run, reach: np.ndarray) -> np.ndarray:
    """Each stage's measured time over the samples that ran it; the loop's time outside the stages
    (reading and converting batches) is charged to stage 0, which every sample runs."""
    per_sample = np.array(run.stage_seconds) / np.maximum(reach, 1)
    per_sample[0] += (run.seconds - sum(run.stage_seconds)) / reach[0]
    return per_sample


# ---- 1. measure: everything that needs the model


def measure(model: MultiExitNetwork, splits: Splits, config: StudyConfig, ref: ModelRef) -> ExitLogits:
    """Every exit's logits on validation and test, and the per-stage cost model: the precision probe, one
    all-exits pass per split, and a real early-exit run at the fixed cutoff (what `logits.safetensors` holds)."""
    num_exits = model.num_exits
    load = machine_load()
    device = resolve_device(config.device)
    full_macs = float(backbone_macs(model))
    tuned = tune(model, splits.val, config.precision, config.micro_batch, device, config.batch_size,
                 config.precision_check_images)  # a setting chosen on validation, as everything the study chooses
    net, precision, micro_batch = tuned.network, tuned.precision, tuned.micro_batch
    run_kwargs = dict(batch_size=config.batch_size, micro_batch=micro_batch)
    # validation first: its time is not used, so it also warms up the kernels for the timed test pass
    val_run = all_exit_logits(net, splits.val, progress=config.progress, **run_kwargs)
    test_run = all_exit_logits(net, splits.test, progress=config.progress, **run_kwargs)
    # per-sample seconds of each stage, from the real early-exit run at the fixed cutoff (compaction and exit
    # decisions included); stages too few samples reached fall back to the all-exits pass
    timed = timing_subset(splits.test, config)
    fixed_run = second_pass(lambda: run_early_exit(net, timed, np.full(num_exits - 1, config.cutoff),
                                                   get_policy(config.policy), **run_kwargs))
    reach = analysis.reach_counts(fixed_run.exits, num_exits)
    per_sample = np.where(reach >= config.batch_size, seconds_per_sample(fixed_run, reach),
                          seconds_per_sample(test_run, np.full(num_exits, len(splits.test))))
    measured = MeasuredTimes(load, test_run.seconds, test_run.trunk_seconds,
                             FixedCutoffRun(config.policy, config.cutoff, len(timed), fixed_run.seconds,
                                            tuple(fixed_run.stage_seconds)))
    info = Measurements(model=ref, dataset=splits.describe(), precision=precision,
                        batch_size=config.batch_size, micro_batch=micro_batch, machine=machine(device),
                        created=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), software=software_versions(),
                        precision_check=tuned.precision_check, micro_batch_probe=tuned.micro_batch_probe,
                        backbone_macs=full_macs, measured=measured)
    return ExitLogits(val_logits=val_run.logits, val_labels=splits.val.labels.numpy(), test_logits=test_run.logits,
                      test_labels=splits.test.labels.numpy(), exit_macs=np.asarray(exit_macs(model), dtype=np.int64),
                      stage_seconds_per_sample=per_sample, measurements=info)


def time_stages(model: MultiExitNetwork, device: str = "auto", precision: str = "auto", micro_batch: int | None = None,
                images: int = 1024, batch_size: int = 256) -> tuple[np.ndarray, StageTimes]:
    """Each stage's seconds per sample (with its head) on `device`, from an all-exits pass over `images` random
    images of the model's input shape, in `precision` and the micro-batch measured fastest there (or given): a
    study's cost model re-timed for another device or machine, without its data (a dense network's time does not
    depend on pixel values; "auto" precision judges agreement with fp32 on those random images). Without compaction,
    so a little under the stage times of a real early-exit run; the evidence comes back with them (`StageTimes`)."""
    check_precision(precision)
    check_micro_batch(micro_batch)
    dev = resolve_device(device)
    load = machine_load()  # before the probes and the timed pass, as its name says
    c, h, w = model.input_shape
    pixels = torch.randint(0, 256, (images, h, w, c), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    data = ImageSet.from_tensors(pixels, torch.zeros(images, dtype=torch.long))
    tuned = tune(model, data, precision, micro_batch, dev, batch_size, check_images=images)
    warm_up(tuned.network, data, batch_size, micro_batch=tuned.micro_batch)
    run = all_exit_logits(tuned.network, data, batch_size, micro_batch=tuned.micro_batch)
    per_sample = seconds_per_sample(run, np.full(model.num_exits, images))
    return per_sample, StageTimes(
        "re-timed (study.time_stages)", str(dev), tuple(per_sample.tolist()), machine(dev), load, tuned.precision,
        tuned.precision_check, tuned.micro_batch, tuned.micro_batch_probe, batch_size, images, run.seconds)


# ---- 2. analyse: pure arrays


@dataclass(frozen=True)
class Evaluator:
    """Any setting's outcome on either split, from the cached scores of every policy: `by_policy[name]` is
    (validation, test)."""
    by_policy: dict[str, Split]
    macs: np.ndarray
    per_sample: np.ndarray

    def evaluate(self, split: int, policy: str, thresholds: np.ndarray) -> analysis.Evaluation:
        arrays = self.by_policy[policy][split]
        return analysis.evaluate(arrays.scores, arrays.correct, thresholds, self.macs, self.per_sample)

    def val(self, s: Setting) -> analysis.Evaluation:
        return self.evaluate(0, s.policy, np.asarray(s.thresholds, dtype=np.float64))

    def test(self, s: Setting) -> Outcome:
        return self.evaluate(1, s.policy, np.asarray(s.thresholds, dtype=np.float64)).outcome()


def analyse(cache: ExitLogits, config: StudyConfig) -> StudyResults:
    """Everything the study reports from the cached logits alone: a pure function of `cache` and `config`
    (the times in it are the ones `measure` recorded, and the cost model's predictions from them)."""
    macs, per_sample = cache.exit_macs, cache.stage_seconds_per_sample
    num_exits, _, num_classes = cache.test_logits.shape
    by_policy = {name: (exit_arrays(cache.val_logits, cache.val_labels, p),
                        exit_arrays(cache.test_logits, cache.test_labels, p)) for name, p in POLICIES.items()}
    val, test = by_policy[config.policy]
    ev = Evaluator(by_policy, macs, per_sample)
    max_cutoff = get_policy(config.policy).max_score(num_classes)
    info, n_test = cache.measurements, cache.test_labels.size
    if info.model is None or info.dataset is None:  # results.json always names both
        raise UserError("the logits cache does not name the model and data it was measured on: make it with "
                        "exitwise study")
    measured = info.measured

    full_seconds = measured.full_network_seconds
    full_network = FullNetwork(accuracy=float(test.correct[-1].mean()),
                               mean_macs=float(macs[-1]) if info.backbone_macs is None else info.backbone_macs,
                               measured_seconds=full_seconds,
                               ms_per_image=None if full_seconds is None else 1e3 * full_seconds / n_test)
    exits = tuple(Exit(k, int(macs[k]), float(test.correct[k].mean()), float(val.correct[k].mean()))
                  for k in range(num_exits))

    fixed = ev.evaluate(1, config.policy, np.full(num_exits - 1, config.cutoff))
    fixed_run = measured.fixed_cutoff
    if fixed_run is not None and (fixed_run.policy, fixed_run.cutoff) != (config.policy, config.cutoff):
        fixed_run = None  # measured at another setting: not this one's time
    stage_seconds = fixed_run.stage_seconds if fixed_run is not None else [None] * num_exits
    fixed_seconds, fixed_images = (fixed_run.seconds, fixed_run.images) if fixed_run is not None else (None, n_test)
    fixed_cutoff = FixedCutoff(
        cutoff=config.cutoff, test=fixed.outcome(),
        per_exit=tuple(Leavers(k, fixed.exit_counts[k], fixed.exit_accuracy[k], stage_seconds[k])
                       for k in range(num_exits)),
        measured_seconds=fixed_seconds, timed_images=None if fixed_seconds is None else fixed_images,
        ms_per_image=None if fixed_seconds is None else 1e3 * fixed_seconds / fixed_images)

    cutoffs = np.linspace(0.0, max_cutoff, config.num_cutoffs)
    sweep = tuple(SweepPoint(float(c), r.outcome())
                  for c, r in zip(cutoffs, analysis.sweep(test.scores, test.correct, cutoffs, macs, per_sample)))
    founding_methods = calibration_table(ev, config, max_cutoff)
    spaces = {name: calibration.SearchSpace.build(v.scores, v.correct, macs) for name, (v, _) in by_policy.items()}
    targets = target_calibration(val, test, macs, per_sample, config.desired_accuracies, config.delta,
                                 spaces[config.policy])
    best = choose(ev, config, founding_methods, cutoffs, num_exits)
    fixed_exits = analysis.exit_points(test.scores, np.full(num_exits - 1, config.cutoff))

    frontiers = policy_frontiers(by_policy, by_policy["entropy"], macs, "MACs", config.desired_accuracies,
                                 config.num_cutoffs, spaces)
    marks = [Mark(f"fixed cutoff {config.cutoff:g}", fixed.mean_cost, fixed.accuracy)]
    marks += [Mark(name, c.test.mean_macs, c.test.accuracy) for name, c in best.items()]
    all_exits = measured.all_exits_seconds
    checks = () if all_exits is None else (
        TimingCheck("all exits, no early exit", float(per_sample.sum() * n_test), all_exits),)
    return StudyResults(
        exitwise_version=__version__, created=info.created, software=info.software,
        dataset=info.dataset, model=info.model, machine=info.machine,
        precision=info.precision, precision_check=info.precision_check,
        batch_size=config.batch_size if info.batch_size is None else info.batch_size, micro_batch=info.micro_batch,
        micro_batch_probe=info.micro_batch_probe,
        policy=config.policy, max_cutoff=max_cutoff, exits=exits, full_network=full_network,
        fixed_cutoff=fixed_cutoff, sweep=sweep, calibration=tuple(founding_methods + targets), best=best,
        oracle=oracle_report(test, macs, fixed, fixed_exits, full_network, best),
        frontiers=dataclasses.replace(frontiers, marks=tuple(marks)),
        timing_model=TimingModel(tuple(per_sample.tolist()), checks, measured.machine_load_at_start))


def choose(ev: Evaluator, config: StudyConfig, founding_methods: list[CalibrationEntry], cutoffs: np.ndarray,
           num_exits: int) -> Best:
    """The two settings the study runs for real, both chosen on validation (accuracy, predicted time) and
    evaluated on test: the founding rule (best accuracy per second) among the calibrated sets of the founding
    methods, as the founding system chose; and the fastest within `within_points` of the final exit's validation
    accuracy among those, no early exit, the shared cutoffs and every policy's validation frontier of time."""
    calibrated_sets = [Setting(f"{c.method} {c.desired_accuracy:.2f}", config.policy, c.thresholds)
                       for c in founding_methods]
    founding = max(calibrated_sets, key=lambda s: (lambda r: r.accuracy / r.predicted_seconds)(ev.val(s)))
    candidates = [Setting("no early exit", config.policy, (NEVER,) * (num_exits - 1))] + calibrated_sets
    candidates += [Setting(f"cutoff {c:.3f}", config.policy, (float(c),) * (num_exits - 1)) for c in cutoffs]
    candidates += latency_frontier({name: v for name, (v, _) in ev.by_policy.items()}, ev.per_sample)
    floor = ev.by_policy[config.policy][0].correct[-1].mean() - config.within_points / 100
    on_val = [ev.val(s) for s in candidates]
    fastest = min((c for c in zip(candidates, on_val) if c[1].accuracy >= floor),
                  key=lambda c: c[1].predicted_seconds)[0]
    return Best(Choice(founding, ev.test(founding)), Choice(fastest, ev.test(fastest)), config.within_points)


def calibration_table(ev: Evaluator, config: StudyConfig, max_cutoff: float) -> list[CalibrationEntry]:
    """Calibration-table entries of the founding methods: thresholds from validation for each desired
    accuracy, evaluated on both splits."""
    val = ev.by_policy[config.policy][0]
    entries = []
    for method in config.methods:
        for desired in config.desired_accuracies:
            thr = calibration.METHODS[method](val.scores, val.correct, desired, max_cutoff)
            s = Setting("", config.policy, tuple(thr.tolist()))
            entries.append(CalibrationEntry(method, desired, "ok", s.thresholds, ev.val(s).accuracy, ev.test(s)))
    return entries


def target_calibration(val: ExitArrays, test: ExitArrays, macs: Sequence[float], per_sample: np.ndarray,
                       desired: Sequence[float], delta: float,
                       space: calibration.SearchSpace | None = None) -> list[CalibrationEntry]:
    """Calibration-table entries of the accuracy-target searches on validation, evaluated on test: "empirical"
    (met on validation) and "guaranteed" (Learn then Test at `delta` for the accuracy over as many new samples as
    the test split holds). A target that is unreachable makes every higher one unreachable, so those are not
    searched again. `space`: validation's search space in MACs, if built already; the guarantee's ordering
    samples get theirs here, once for every target."""
    learn, _ = calibration.ordering_split(val.scores.shape[1])
    ordering = calibration.SearchSpace.build(val.scores[:, learn], val.correct[:, learn], macs)
    searches = {
        "empirical": (lambda d: calibration.empirical_thresholds(val.scores, val.correct, macs, d, space=space), None),
        "guaranteed": (lambda d: calibration.guaranteed_thresholds(val.scores, val.correct, macs, d, delta,
                                                                   test_size=test.scores.shape[1], ordering=ordering),
                       delta),
    }
    entries = []
    for method, (search, entry_delta) in searches.items():
        lowest_unreachable = math.inf
        for d in sorted(desired):
            r = search(d) if d < lowest_unreachable else None
            if r is not None and r.status == "ok":
                t = analysis.evaluate(test.scores, test.correct, np.asarray(r.thresholds), macs, per_sample)
                entries.append(CalibrationEntry(method, d, "ok", r.thresholds, r.accuracy, t.outcome(), entry_delta))
            else:
                lowest_unreachable = d
                entries.append(CalibrationEntry(method, d, "unreachable", None, None, None, entry_delta))
    return entries


def oracle_report(test: ExitArrays, macs: Sequence[float], fixed: analysis.Evaluation, fixed_exits: np.ndarray,
                  full: FullNetwork, best: Best) -> Oracle:
    """The hindsight oracle, how often an earlier exit was right where the later one was wrong (overthinking),
    and how far the full network, the fixed cutoff and the best settings are from the oracle's curve."""
    correct = test.correct

    def gap(accuracy: float, mean_macs: float) -> Gap:
        return analysis.gap_to_oracle(accuracy, mean_macs, correct, macs)

    o = analysis.oracle(correct, macs)
    return Oracle(o.accuracy, o.cost, analysis.overthinking(correct, macs),
                  analysis.overthinking(correct, macs, fixed_exits),
                  gap(full.accuracy, macs[-1]), gap(fixed.accuracy, fixed.mean_cost),
                  gap(best.founding_rule.test.accuracy, best.founding_rule.test.mean_macs),
                  gap(best.fastest_within_points.test.accuracy, best.fastest_within_points.test.mean_macs))


# ---- 3. verify: the real early-exit runs


def second_pass(run: Callable[[], Run]) -> Run:
    """The second of two identical early-exit runs: the first sets up kernels for every survivor count it meets
    (on the H200 about 6x the time of a later pass, on the Zen 4 CPU 2-10% more, `benchmarks/first_pass.py`), so
    every real run the study reports is timed warm, as the full network's pass is (after the validation pass)."""
    run()
    return run()


def timing_subset(test_data, config: StudyConfig):
    """The first `timing_check_images` test images: what every real early-exit run of the study is timed on (the
    accuracy of every setting comes from all test images' cached logits)."""
    return test_data.subset(torch.arange(min(config.timing_check_images, len(test_data))))


def verify(model: MultiExitNetwork, test_data, results: StudyResults, config: StudyConfig) -> StudyResults:
    """The best settings and two more shared cutoffs run for real with early exit on `timing_subset`: enough to
    time them and check the cost model's predictions."""
    subset = timing_subset(test_data, config)
    per_sample = np.asarray(results.timing_model.stage_seconds_per_sample)
    num_exits = len(results.exits)
    base = EarlyExitModel.create(model, results.model.name, results.policy,
                                 (NEVER,) * (num_exits - 1)).prepare(results.precision, resolve_device(config.device))

    def timed(s: Setting) -> TimedRun:
        setting = base.with_setting(s.policy, s.thresholds)
        run = second_pass(lambda: setting.run(subset, batch_size=results.batch_size, micro_batch=results.micro_batch))
        predicted = float(analysis.reach_counts(run.exits, num_exits) @ per_sample)
        return TimedRun(len(subset), run.seconds, predicted)

    best, checks = {}, []
    for key, choice in (("founding_rule", results.best.founding_rule),
                        ("fastest_within_points", results.best.fastest_within_points)):
        t = timed(choice.setting)
        full_ms = results.full_network.ms_per_image
        best[key] = dataclasses.replace(choice, timed=t, speedup=None if full_ms is None else full_ms / t.ms_per_image)
        checks.append(TimingCheck(f"{choice.setting.label}, {choice.setting.policy} ({len(subset)} images)",
                                  t.predicted_seconds, t.measured_seconds))
    for cutoff in (0.1 * results.max_cutoff, 0.5 * results.max_cutoff):
        t = timed(Setting("", results.policy, (cutoff,) * (num_exits - 1)))
        checks.append(TimingCheck(f"cutoff {cutoff:.3f} ({len(subset)} images)", t.predicted_seconds,
                                  t.measured_seconds))
    timing = dataclasses.replace(results.timing_model, checks=tuple(checks) + results.timing_model.checks)
    return dataclasses.replace(results, best=dataclasses.replace(results.best, **best), timing_model=timing)


@dataclass(frozen=True)
class Study:
    results: StudyResults    # what results.json holds
    logits: ExitLogits       # what logits.safetensors holds
    early_exit: EarlyExitModel  # the fastest setting within `within_points`, as early_exit.json names it


def run_study(model: MultiExitNetwork, splits: Splits, config: StudyConfig, ref: ModelRef) -> Study:
    """The whole study: measure, analyse, verify."""
    logits = measure(model, splits, config, ref)
    results = verify(model, splits.test, analyse(logits, config), config)
    chosen = results.best.fastest_within_points.setting
    return Study(results, logits, EarlyExitModel.create(model, ref.name, chosen.policy, chosen.thresholds,
                                                        class_names=splits.test.classes))


def software_versions() -> Software:
    return Software(__version__, platform.python_version(), torch.__version__, np.__version__, platform.platform(),
                    torch.get_num_threads())


def write_study(study: Study, out_dir: str | Path) -> Path:
    """results.json, logits.safetensors, early_exit.json (naming the checkpoint by path and SHA-256), plots and
    reports into `out_dir`, all or nothing."""
    from .report import write_report
    model = study.results.model
    with staged_output(out_dir) as stage:
        atomic_write_json(stage / RESULTS_FILE, study.results.to_json())
        save_logits(study.logits, stage / LOGITS_FILENAME)
        study.early_exit.write(stage, weights=model.weights, weights_sha256=model.weights_sha256)
        write_report(study.results, stage)
    return Path(out_dir)
