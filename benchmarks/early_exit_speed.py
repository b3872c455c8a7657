"""Does early exit save wall-clock time? Full network vs calibrated early exit, measured in one run.

    python benchmarks/early_exit_speed.py [--model b-resnet11 --model seed-branchynet ...] [--weights FILE]

For each model (shipped weights unless --weights) on the 10k CIFAR-10 test images: the full network
(every stage and the final classifier, no side exits) and real early exit at the fastest setting on
the validation frontiers of the exit policies (entropy, max-prob and margin unless --policy) whose
validation accuracy is within 0.5 points of the final exit's validation accuracy, as the study picks
(`fastest_within`); the test split only reports the chosen setting, never picks it.
Wall time at batch 256 (`--batch-size`) and at batch 1, the ratio of the two, and the mean-MACs ratio; beside them the cost
model's prediction from per-stage times (is early exit as fast as its stage times say, or does the runtime lose time?).
Each timing is the best of --repeats runs, the full network and early exit taking turns, so a burst from
another process or a drift of the machine's speed does not decide a ratio.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from exitwise.allocator import keep_freed_memory
from exitwise.study import analysis
from exitwise.api import load_model
from exitwise.models.costs import backbone_macs, exit_macs
from exitwise.data import load_splits
from exitwise.early_exit import EarlyExitModel
from exitwise.study.frontiers import latency_frontier
from exitwise.models import shipped_models
from exitwise.device import machine, machine_load, resolve_device
from exitwise.tune import tune
from exitwise.policies import ExitArrays, exit_arrays, get_policy
from exitwise.study.results import NEVER, Setting
from exitwise.runtime import all_exit_logits, run_backbone, warm_up

from timing_common import best_of_interleaved

SHARED = Path(__file__).resolve().parents[2] / "shared"


def fastest_within(settings: list[Setting], val: dict[str, ExitArrays], within_points: float, macs: np.ndarray,
                   per_sample: np.ndarray) -> Setting:
    """The setting predicted fastest on the validation split among those whose validation accuracy is within
    `within_points` of the final exit's there (the study's rule; test data plays no part)."""
    floor = next(iter(val.values())).correct[-1].mean() - within_points / 100
    def on_val(s: Setting) -> analysis.Evaluation:
        return analysis.evaluate(val[s.policy].scores, val[s.policy].correct,
                                 analysis.as_thresholds(s.thresholds, len(macs)), macs, per_sample)
    return min((r.predicted_seconds, i, s) for i, s in enumerate(settings)
               if (r := on_val(s)).accuracy >= floor)[2]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=SHARED / "data/cifar10-jpg.tar.gz")
    p.add_argument("--model", action="append", dest="models", help="repeatable; default: every shipped CIFAR model")
    p.add_argument("--weights", type=Path, help="weights for a single --model")
    p.add_argument("--within-points", type=float, default=0.5)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=256, help="the large batch timed beside batch 1")
    p.add_argument("--batch1-images", type=int, default=10000, help="test images timed at batch 1")
    p.add_argument("--policy", action="append", dest="policies", help="repeatable; default: entropy, max-prob, margin")
    p.add_argument("--precision", default="auto", help="auto (measured, as the study chooses), bf16, mixed or fp32")
    p.add_argument("--micro-batch", type=int, help="default: measured, as the study chooses")
    p.add_argument("--device", default="auto")
    p.add_argument("--images", type=int, help="N seeded validation and test images only (a smoke run)")
    args = p.parse_args()
    keep_freed_memory()  # as the `exitwise` commands run models (exitwise.allocator)
    device = resolve_device(args.device)
    models = args.models or shipped_models("cifar10")
    splits = load_splits("cifar10", args.data, progress=False)
    if args.images:
        splits = splits.sample(args.images)
    policies = [get_policy(name) for name in args.policies or ("entropy", "max-prob", "margin")]
    load = machine_load()
    print(f"machine: {machine(device).describe()}")
    print(load.describe())
    print(f"{len(splits.test)} test images, policies "
          f"{', '.join(p.name for p in policies)}, best of {args.repeats} runs per timing; the setting is the "
          f"fastest within {args.within_points:g} points of the final exit on the {len(splits.val)} validation "
          f"images (as the study picks), its accuracy reported on test")
    for name in models:
        model, info = load_model(name, args.weights if len(models) == 1 else None)
        macs, full_macs = exit_macs(model), backbone_macs(model)
        tuned = tune(model, splits.test, args.precision, args.micro_batch, device, args.batch_size)  # as the study does
        precision, check, micro_batch = tuned.precision, tuned.precision_check, tuned.micro_batch
        model = tuned.network
        early_exit = EarlyExitModel(model, policies[0], np.full(model.num_exits - 1, -np.inf), name,
                                    precision=precision)
        mb = dict(micro_batch=micro_batch)
        warm_up(model, splits.test, **mb)
        val = all_exit_logits(model, splits.val, **mb)
        test = all_exit_logits(model, splits.test, **mb)
        per_sample = np.array(test.stage_seconds) / len(splits.test)
        arrays = {split: {p.name: exit_arrays(r.logits, d.labels, p) for p in policies}
                  for split, r, d in (("val", val, splits.val), ("test", test, splits.test))}
        final = (test.logits[-1].argmax(-1) == splits.test.labels.numpy()).mean()  # the final exit's accuracy
        settings = [Setting("no early exit", policies[0].name, (NEVER,) * (model.num_exits - 1))]  # always in reach
        settings += latency_frontier(arrays["val"], per_sample)
        setting = fastest_within(settings, arrays["val"], args.within_points, macs, per_sample)
        test_arrays = arrays["test"][setting.policy]  # reported on test, chosen on validation
        chosen = analysis.evaluate(test_arrays.scores, test_arrays.correct,
                                   analysis.as_thresholds(setting.thresholds, model.num_exits), macs, per_sample)
        early_exit = early_exit.with_setting(setting.policy, setting.thresholds)
        policy = early_exit.policy
        big = args.batch_size
        one = splits.test.subset(torch.arange(min(args.batch1_images, len(splits.test))))
        full_big, early_big = best_of_interleaved(args.repeats, lambda: run_backbone(model, splits.test, big, **mb),
                                                lambda: early_exit.run(splits.test, batch_size=big, **mb))
        full1, early1 = best_of_interleaved(args.repeats, lambda: run_backbone(model, one, 1, **mb),
                                            lambda: early_exit.run(one, batch_size=1, **mb))
        accuracy = (early_big.predictions == splits.test.labels.numpy()).mean()
        timed = ", ".join(f"{t.precision} {t.ms_per_image:.2f}" for t in check.tried) if check else "not timed"
        print(f"\n{name} ({info.weights}, precision {precision} (ms/image in the probe: {timed}), "
              f"micro-batch {micro_batch})")
        print(f"  full network: test accuracy {final:.2%}, {full_macs / 1e6:.2f} M MACs, "
              f"batch {big}: {full_big.seconds:.2f} s, batch 1: {full1.seconds:.2f} s for {len(one)} images")
        print(f"  early exit:   test accuracy {accuracy:.2%}, {chosen.mean_cost / 1e6:.2f} M MACs, "
              f"batch {big}: {early_big.seconds:.2f} s, batch 1: {early1.seconds:.2f} s; exit shares "
              + ", ".join(f"{s:.1%}" for s in chosen.exit_shares))
        print(f"  policy {policy.name}, thresholds: {', '.join('never' if t == NEVER else f'{t:.3f}' for t in setting.thresholds)}")
        print(f"  speed-up: batch {big} {full_big.seconds / early_big.seconds:.2f}x, batch 1 {full1.seconds / early1.seconds:.2f}x, "
              f"MACs {full_macs / chosen.mean_cost:.2f}x")
        predicted = chosen.predicted_seconds
        print(f"  cost model (stage times of the all-exits pass, ms/image with heads: "
              f"{', '.join(f'{1e3 * t:.3f}' for t in per_sample)}): full {test.trunk_seconds:.2f} s, early exit "
              f"{predicted:.2f} s, {test.trunk_seconds / predicted:.2f}x; early exit at batch {big} measured "
              f"{early_big.seconds / predicted - 1:+.1%} against it")


if __name__ == "__main__":
    main()
