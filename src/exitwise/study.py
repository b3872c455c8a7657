"""The founding early-exit study, done right: one pass per split, then array arithmetic.

`run_study` collects every exit's logits on the validation and test splits once, measures the time
of each stage, and derives everything else (per-exit accuracy, the oracle, a fixed cutoff, the
cutoff sweep, calibrated per-exit thresholds, the best settings) from those arrays. Times in the
sweep come from a per-stage cost model; real early-exit runs at several settings check it.
"""
from __future__ import annotations

import math
import platform
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from . import __version__, analysis, calibration
from .costs import backbone_macs, exit_macs
from .data import Splits
from .errors import UserError
from .io import atomic_write_json, staged_output
from .logits_cache import FILENAME as LOGITS_FILENAME, ExitLogits, save_logits
from .models.base import MultiExitNetwork
from .policies import POLICIES, ExitPolicy, get_policy
from .hardware import (check_micro_batch, check_precision, choose_micro_batch, choose_precision, machine,
                       machine_load, resolve_device)
from .runtime import Run, all_exit_logits, prepare, run_early_exit, warm_up

DEFAULT_DESIRED = tuple(round(0.60 + 0.05 * i, 2) for i in range(7))
GUARANTEE_DELTA = 0.1


@dataclass
class StudyConfig:
    cutoff: float = 0.6
    num_cutoffs: int = 100
    desired_accuracies: tuple[float, ...] = DEFAULT_DESIRED
    methods: tuple[str, ...] = ("per-exit", "seed-percentile")
    policy: str = "entropy"
    batch_size: int = 256
    precision: str = "auto"      # auto: the fastest of fp32, bf16, mixed measured here that agrees with fp32
    precision_check_images: int = 1000
    device: str = "auto"         # auto: cuda, else mps, else cpu
    micro_batch: int | None = None  # rows through the network together; None: the fastest, measured here
    timing_check_images: int = 2500
    within_points: float = 0.5
    progress: bool = True

    def __post_init__(self):
        if not np.isfinite(self.cutoff) or self.cutoff < 0:
            raise UserError(f"cutoff must be a non-negative number, got {self.cutoff}")
        for d in self.desired_accuracies:
            calibration.check_desired_accuracy(d)
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


@dataclass
class ExitArrays:
    """One split's cached scores and correctness, (K, N) each."""
    scores: np.ndarray
    correct: np.ndarray
    logits: np.ndarray = field(repr=False)


def exit_arrays(logits: np.ndarray, labels: torch.Tensor, policy: str | ExitPolicy) -> ExitArrays:
    policy = get_policy(policy) if isinstance(policy, str) else policy
    scores = policy.scores(torch.from_numpy(logits)).numpy().astype(np.float64)
    return ExitArrays(scores, logits.argmax(-1) == labels.numpy()[None, :], logits)


def seconds_per_sample(run: Run, reach: np.ndarray) -> np.ndarray:
    """Each stage's measured time over the samples that ran it; the loop's time outside the stages
    (reading and converting batches) is charged to stage 0, which every sample runs."""
    per_sample = np.array(run.stage_seconds) / np.maximum(reach, 1)
    per_sample[0] += (run.seconds - sum(run.stage_seconds)) / reach[0]
    return per_sample


@dataclass
class Study:
    results: dict       # what results.json holds
    logits: ExitLogits  # what logits.safetensors holds


@dataclass
class Evaluator:
    """Any thresholds' accuracy, exit shares, mean MACs and predicted time on either split, from the cached
    scores of every policy: `by_policy[name]` is (validation, test)."""
    by_policy: dict[str, tuple[ExitArrays, ExitArrays]]
    macs: Sequence[float]
    per_sample: np.ndarray
    policy: str

    def test(self, thresholds: np.ndarray, policy: str | None = None, samples: slice = slice(None)) -> dict:
        return self._evaluate(self.by_policy[policy or self.policy][1], thresholds, samples)

    def val(self, thresholds: np.ndarray, policy: str | None = None) -> dict:
        return self._evaluate(self.by_policy[policy or self.policy][0], thresholds, slice(None))

    def _evaluate(self, split: ExitArrays, thresholds: np.ndarray, samples: slice) -> dict:
        return analysis.evaluate(split.scores[:, samples], split.correct[:, samples], thresholds, self.macs,
                                 self.per_sample)


Setting = tuple[str, str, np.ndarray]  # (label, policy name, thresholds)


def run_study(model: MultiExitNetwork, splits: Splits, config: StudyConfig, model_info: dict) -> Study:
    """The whole study: the `results.json` dictionary and the cached logits it was computed from."""
    policies = {name: get_policy(name) for name in POLICIES}
    policy = policies[config.policy]
    macs = exit_macs(model)
    k_exits = model.num_exits
    max_cutoff = policy.max_score(model.num_classes)

    load = machine_load()
    device = resolve_device(config.device)
    precision, precision_check = choose_precision(model, splits.test, config.precision, device,
                                                  config.precision_check_images)
    full_macs = float(backbone_macs(model))
    model = prepare(model, precision, device)
    micro_batch, micro_batch_probe = ((config.micro_batch, None) if config.micro_batch else
                                      choose_micro_batch(model, splits.test, device, precision, config.batch_size))
    run_kwargs = dict(batch_size=config.batch_size, micro_batch=micro_batch)
    warm_up(model, splits.test, **run_kwargs)

    test_run = all_exit_logits(model, splits.test, progress=config.progress, **run_kwargs)
    val_run = all_exit_logits(model, splits.val, progress=config.progress, **run_kwargs)
    by_policy = {name: (exit_arrays(val_run.logits, splits.val.labels, p),
                        exit_arrays(test_run.logits, splits.test.labels, p)) for name, p in policies.items()}
    val, test = by_policy[config.policy]

    # the cost model: per-sample seconds of each stage, from the real early-exit run at the fixed cutoff
    # (compaction and exit decisions included); stages too few samples reached fall back to the all-exits pass
    fixed_thr = np.full(k_exits - 1, config.cutoff)
    fixed_run = run_early_exit(model, splits.test, fixed_thr, policy, progress=config.progress, **run_kwargs)
    reach = analysis.reach_counts(fixed_run.exits, k_exits)
    per_sample = np.where(reach >= config.batch_size, seconds_per_sample(fixed_run, reach),
                          seconds_per_sample(test_run, np.full(k_exits, len(splits.test))))
    ev = Evaluator(by_policy, macs, per_sample, config.policy)

    full_network = {"accuracy": float(test.correct[-1].mean()), "seconds": test_run.trunk_seconds,
                    "ms_per_image": 1e3 * test_run.trunk_seconds / len(splits.test), "mean_macs": full_macs,
                    "note": "every stage and the final classifier, no side exits: the all-exits pass over the "
                            "test set, measured, without its side heads' measured time"}
    exits = [{"index": k, "accuracy": float(test.correct[k].mean()), "val_accuracy": float(val.correct[k].mean()),
              "macs": int(macs[k])} for k in range(k_exits)]

    fixed = ev.test(fixed_thr)
    fixed_cutoff = {
        "cutoff": config.cutoff, "overall_accuracy": fixed["overall_accuracy"], "seconds": fixed_run.seconds,
        "ms_per_image": 1e3 * fixed_run.seconds / len(splits.test),
        "mean_macs": fixed["mean_macs"],
        "per_exit": [{"index": k, "count": fixed["exit_counts"][k], "accuracy": fixed["exit_accuracy"][k],
                      "seconds": fixed_run.stage_seconds[k]} for k in range(k_exits)],
    }

    cutoffs = np.linspace(0.0, max_cutoff, config.num_cutoffs)
    sweep = [{k: r[k] for k in ("cutoff", "overall_accuracy", "exit_shares", "mean_macs", "seconds")}
             for r in analysis.sweep(test.scores, test.correct, cutoffs, macs, per_sample)]
    calibrated = calibration_table(ev, config, max_cutoff)

    # candidates are chosen on validation (accuracy, predicted time), then evaluated on test: the founding
    # rule among the calibrated sets of the study's policy, as the founding system chose; the fastest among
    # those, the shared cutoffs and every policy's validation frontier of predicted time
    calibrated_sets = [(f"{c['method']} {c['desired_accuracy']:.2f}", config.policy,
                        analysis.as_thresholds(c["thresholds"], k_exits)) for c in calibrated]
    calibrated_on_val = [ev.val(thr) for _, _, thr in calibrated_sets]
    founding = max(zip(calibrated_sets, calibrated_on_val),
                   key=lambda c: c[1]["overall_accuracy"] / c[1]["seconds"])[0]
    candidates = [("no early exit", config.policy, np.full(k_exits - 1, -np.inf))] + calibrated_sets
    candidates += [(f"cutoff {c:.3f}", config.policy, np.full(k_exits - 1, c)) for c in cutoffs]
    candidates += latency_frontier({name: v for name, (v, _) in by_policy.items()}, per_sample)
    floor = val.correct[-1].mean() - config.within_points / 100
    candidates_on_val = [ev.val(thr, name) for _, name, thr in candidates]
    fastest = min((c for c in zip(candidates, candidates_on_val) if c[1]["overall_accuracy"] >= floor),
                  key=lambda c: c[1]["seconds"])[0]

    # the best settings and two more cutoffs run for real on the first test images only: enough to time
    # them and check the cost model, at a quarter of the time (the fixed cutoff above ran on every image)
    subset = splits.test.subset(torch.arange(min(config.timing_check_images, len(splits.test))))

    def time_on_subset(name: str, thr: np.ndarray) -> tuple[Run, float]:
        """The real run on the subset and the cost model's prediction for it."""
        return (run_early_exit(model, subset, thr, policies[name], **run_kwargs),
                ev.test(thr, name, slice(len(subset)))["seconds"])

    best, checks = {}, []
    for key, (label, name, thr) in (("founding_rule", founding),
                                    (f"fastest_within_{config.within_points:g}_points", fastest)):
        run, predicted = time_on_subset(name, thr)
        t, ms = ev.test(thr, name), 1e3 * run.seconds / len(subset)
        best[key] = {"label": label, "policy": name, "thresholds": analysis.thresholds_to_json(thr),
                     "test_accuracy": t["overall_accuracy"], "mean_macs": t["mean_macs"],
                     "exit_shares": t["exit_shares"], "seconds": run.seconds, "timed_images": len(subset),
                     "ms_per_image": ms, "predicted_seconds": predicted,
                     "speedup": full_network["ms_per_image"] / ms}
        checks.append((f"{label}, {name} ({len(subset)} images)", predicted, run.seconds))
    for cutoff in (0.1 * max_cutoff, 0.5 * max_cutoff):
        run, predicted = time_on_subset(config.policy, np.full(k_exits - 1, cutoff))
        checks.append((f"cutoff {cutoff:.3f} ({len(subset)} images)", predicted, run.seconds))
    checks.append(("all exits, no early exit", float(per_sample.sum() * len(splits.test)), test_run.seconds))
    timing_checks = [{"label": label, "predicted_seconds": p, "measured_seconds": m, "relative_error": (p - m) / m}
                     for label, p, m in checks]

    frontiers = policy_frontiers(val.logits, splits.val.labels, test.logits, splits.test.labels, macs, "MACs",
                                 policies, config.desired_accuracies, config.num_cutoffs, by_policy)
    frontiers["marks"] = [{"label": f"fixed cutoff {config.cutoff:g}", "cost": fixed["mean_macs"],
                           "accuracy": fixed["overall_accuracy"]}]
    frontiers["marks"] += [{"label": key.replace("_", " "), "cost": b["mean_macs"], "accuracy": b["test_accuracy"]}
                           for key, b in best.items()]
    oracle = oracle_report(test, macs, fixed_thr, full_network["accuracy"], fixed, best)

    results = {
        "exitwise_version": __version__,
        "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "software": software_versions(),
        "dataset": splits.describe(),
        "model": model_info,
        "machine": machine(device).to_json(),
        "precision": precision, "precision_check": precision_check,
        "micro_batch": micro_batch, "micro_batch_probe": micro_batch_probe,
        "batch_size": config.batch_size, "policy": config.policy, "max_cutoff": max_cutoff,
        "exits": exits,
        "oracle_accuracy": oracle["accuracy"], "oracle_mean_macs": oracle["mean_macs"],
        "oracle": oracle,
        "full_network": full_network,
        "fixed_cutoff": fixed_cutoff,
        "sweep": sweep,
        "timing_model": {"stage_seconds_per_sample": per_sample.tolist(), "checks": timing_checks,
                         "machine_load_at_start": load,
                         "mean_abs_relative_error": float(np.mean([abs(c["relative_error"]) for c in timing_checks]))},
        "calibration": calibrated + target_calibration(val, test, macs, per_sample, config.desired_accuracies),
        "frontiers": frontiers,
        "best": best,
    }
    logits = ExitLogits(val_logits=val.logits, val_labels=splits.val.labels.numpy(), test_logits=test.logits,
                        test_labels=splits.test.labels.numpy(), exit_macs=np.asarray(macs, dtype=np.int64),
                        stage_seconds_per_sample=per_sample,
                        info={"model": model_info, "dataset": results["dataset"], "precision": precision,
                              "batch_size": config.batch_size, "micro_batch": micro_batch,
                              "machine": results["machine"]})
    return Study(results, logits)


def calibration_table(ev: Evaluator, config: StudyConfig, max_cutoff: float) -> list[dict]:
    """Calibration-table entries of the founding methods: thresholds from validation for each desired
    accuracy, evaluated on both splits."""
    val = ev.by_policy[config.policy][0]
    entries = []
    for method in config.methods:
        for desired in config.desired_accuracies:
            thr = calibration.METHODS[method](val.scores, val.correct, desired, max_cutoff)
            t = ev.test(thr)
            entries.append({"method": method, "desired_accuracy": desired,
                            "thresholds": analysis.thresholds_to_json(thr),
                            "val_accuracy": ev.val(thr)["overall_accuracy"], "test_accuracy": t["overall_accuracy"],
                            "mean_macs": t["mean_macs"], "seconds": t["seconds"], "exit_shares": t["exit_shares"]})
    return entries


def oracle_report(test: ExitArrays, macs: Sequence[float], fixed_thr: np.ndarray, full_accuracy: float,
                  fixed: dict, best: dict[str, dict]) -> dict:
    """The hindsight oracle, how often an earlier exit was right where the later one was wrong (overthinking),
    and how far the full network, the fixed cutoff and the best settings are from the oracle's curve."""
    return {
        **analysis.oracle(test.correct, macs),
        "overthinking": {"full_network": analysis.overthinking(test.correct, macs),
                         "fixed_cutoff": analysis.overthinking(test.correct, macs,
                                                               analysis.exit_points(test.scores, fixed_thr))},
        "gap_at_full_network": analysis.gap_to_oracle(full_accuracy, macs[-1], test.correct, macs),
        "gap_at_fixed_cutoff": analysis.gap_to_oracle(fixed["overall_accuracy"], fixed["mean_macs"], test.correct,
                                                      macs),
        "gap_at_best": {key: analysis.gap_to_oracle(b["test_accuracy"], b["mean_macs"], test.correct, macs)
                        for key, b in best.items()},
    }


def target_calibration(val: ExitArrays, test: ExitArrays, macs: Sequence[float], per_sample: np.ndarray,
                       desired: Sequence[float], delta: float = GUARANTEE_DELTA) -> list[dict]:
    """Calibration-table entries of the accuracy-target searches on validation, evaluated on test: "empirical"
    (met on validation) and "guaranteed" (Learn then Test at `delta` for the accuracy over as many new samples as
    the test split holds). A target that is unreachable makes every higher one unreachable, so those are not
    searched again."""
    searches = {
        "empirical": (lambda d: calibration.empirical_thresholds(val.scores, val.correct, macs, d), {}),
        "guaranteed": (lambda d: calibration.guaranteed_thresholds(val.scores, val.correct, macs, d, delta,
                                                                   test_size=test.scores.shape[1]), {"delta": delta}),
    }
    entries = []
    for method, (search, extra) in searches.items():
        lowest_unreachable = math.inf
        for d in sorted(desired):
            r = search(d) if d < lowest_unreachable else {"status": "unreachable"}
            entry = {"method": method, "desired_accuracy": d, "thresholds": None, "status": r["status"], **extra,
                     **dict.fromkeys(("val_accuracy", "test_accuracy", "mean_macs", "seconds", "exit_shares"))}
            if r["status"] == "ok":
                t = analysis.evaluate(test.scores, test.correct, analysis.as_thresholds(r["thresholds"], len(macs)),
                                      macs, per_sample)
                entry.update(thresholds=r["thresholds"], val_accuracy=r["accuracy"],
                             test_accuracy=t["overall_accuracy"], mean_macs=t["mean_macs"], seconds=t["seconds"],
                             exit_shares=t["exit_shares"])
            else:
                lowest_unreachable = d
            entries.append(entry)
    return entries


def latency_frontier(val_by_policy: dict[str, ExitArrays],
                     stage_seconds_per_sample: np.ndarray) -> list[Setting]:
    """(label, policy name, thresholds) of each policy's Pareto frontier of (predicted time, accuracy) on
    validation, from its scores there: the settings no other setting of that policy beats on both."""
    costs = analysis.latency_costs(stage_seconds_per_sample)
    settings = []
    for name, val in val_by_policy.items():
        settings += [(f"frontier point {i + 1}", name, analysis.as_thresholds(p["thresholds"], len(costs)))
                     for i, p in enumerate(calibration.pareto_frontier(val.scores, val.correct, costs))]
    return settings


def policy_frontiers(val_logits: np.ndarray, val_labels: torch.Tensor, test_logits: np.ndarray,
                     test_labels: torch.Tensor, costs: Sequence[float], unit: str, policies: dict[str, ExitPolicy],
                     desired: Sequence[float], num_cutoffs: int = 100,
                     arrays: dict[str, tuple[ExitArrays, ExitArrays]] | None = None) -> dict:
    """(mean cost, test accuracy) on one pair of axes: per policy its Pareto frontier chosen on validation and
    evaluated on test (with "val_cost", "val_accuracy"); the founding methods with the entropy policy (one shared
    cutoff from 0 to ln C; seed percentiles for each desired accuracy); and the hindsight oracle on test.
    `arrays`: each policy's (validation, test) scores, if the caller has them already."""
    num_exits, _, num_classes = test_logits.shape
    arrays = arrays or {name: (exit_arrays(val_logits, val_labels, p), exit_arrays(test_logits, test_labels, p))
                        for name, p in policies.items()}
    out = {"unit": unit, "policies": {}}
    for name, (val, test) in arrays.items():
        chosen = calibration.pareto_frontier(val.scores, val.correct, costs)
        points = analysis.cost_accuracy_points(test.scores, test.correct, costs,
                                               [analysis.as_thresholds(p["thresholds"], num_exits) for p in chosen])
        out["policies"][name] = [{**p, "val_cost": v["cost"], "val_accuracy": v["accuracy"]}
                                 for p, v in zip(points, chosen)]
    entropy = get_policy("entropy")  # as the founding system used it: no temperatures
    val, test = (arrays["entropy"] if policies.get("entropy") is entropy else
                 (exit_arrays(val_logits, val_labels, entropy), exit_arrays(test_logits, test_labels, entropy)))
    cutoffs = np.linspace(0.0, entropy.max_score(num_classes), num_cutoffs)
    out["shared_cutoffs"] = analysis.cost_accuracy_points(test.scores, test.correct, costs,
                                                          [np.full(num_exits - 1, c) for c in cutoffs])
    percentile = [calibration.seed_percentile(val.scores, val.correct, d, entropy.max_score(num_classes))
                  for d in desired]
    out["founding_percentile"] = [{**p, "desired_accuracy": d} for d, p in zip(
        desired, analysis.cost_accuracy_points(test.scores, test.correct, costs, percentile))]
    out["oracle"] = analysis.oracle_curve(test.correct, costs)
    return out


def software_versions() -> dict:
    return {"exitwise": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "numpy": np.__version__, "platform": platform.platform(), "cpu_threads": torch.get_num_threads()}


def write_study(study: Study, out_dir: str | Path) -> Path:
    """results.json, logits.safetensors, plots and reports into `out_dir`, all or nothing."""
    from .report import write_report
    with staged_output(out_dir) as stage:
        atomic_write_json(stage / "results.json", study.results)
        save_logits(study.logits, stage / LOGITS_FILENAME)
        write_report(study.results, stage)
    return Path(out_dir)
