"""Whole study vs one evaluation pass of the founding system's loop, measured in one run.

    python benchmarks/study_speed.py [--data ../shared/data/cifar10-jpg.tar.gz] [--weights ../shared/seed/cifar10_branchyNet_m.h5]

The founding loop: batch 256, fp32, default (NCHW) layout, the whole batch through every stage
and head. The study: exitwise's whole study (10k test + 5k validation images, every table, plot
and report) with its defaults (precision and micro-batch measured on this machine; the micro-batch probe's
result is cached, so it is taken once before the timed runs, as a user's second study would find it).
With --agreement, also the bf16-vs-fp32 and mixed-vs-fp32 agreement on all 10k test images (slow where
bf16 is emulated).

On Linux the benchmark re-runs itself with glibc's malloc thresholds raised (MALLOC_MMAP_THRESHOLD_,
MALLOC_TRIM_THRESHOLD_): the founding loop's batch-256 activations (33.5 MB) are otherwise mmapped and
page-faulted anew on every allocation, and its pass took 14 s instead of 8.3 s on the AMD EPYC, depending on
the process's history. Raised, the founding loop is at its best and steady; the study is unchanged (its
micro-batches stay small).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from exitwise.api import load_model
from exitwise.data import load_splits
from exitwise.config import AGREEMENT_REQUIRED
from exitwise.device import describe_load, machine, machine_load
from exitwise.runtime import all_exit_logits, prepare
from exitwise.study import StudyConfig, run_study, write_study

SHARED = Path(__file__).resolve().parents[2] / "shared"
MALLOC = {"MALLOC_MMAP_THRESHOLD_": "1000000000000", "MALLOC_TRIM_THRESHOLD_": "100000000000"}


@torch.inference_mode()
def founding_loop_seconds(model, data) -> float:
    model = model.eval().to(memory_format=torch.contiguous_format)
    start = time.perf_counter()
    for images, _ in data.batches(256):
        model(images.contiguous())
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=SHARED / "data/cifar10-jpg.tar.gz")
    p.add_argument("--weights", type=Path, default=SHARED / "seed/cifar10_branchyNet_m.h5")
    p.add_argument("--model", default="seed-branchynet")
    p.add_argument("--repeats", type=int, default=2, help="interleaved runs of each; the best counts")
    p.add_argument("--agreement", action="store_true", help="also bf16/mixed agreement with fp32 on all test images")
    args = p.parse_args()
    if sys.platform == "linux" and any(os.environ.get(k) != v for k, v in MALLOC.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **MALLOC})

    print(f"machine: {machine().describe()}; {describe_load(machine_load())}; glibc malloc thresholds "
          f"{'raised' if sys.platform == 'linux' else 'n/a'}")
    splits = load_splits("cifar10", args.data, progress=False)
    model, info = load_model(args.model, args.weights)
    run_study(model, splits, StudyConfig(progress=False), info)  # untimed: caches the micro-batch probe
    foundings, studies = [], []
    for _ in range(args.repeats):  # interleaved, best of each: a burst of other work decides nothing
        foundings.append(founding_loop_seconds(model, splits.test))
        with tempfile.TemporaryDirectory() as out:
            start = time.perf_counter()
            done = run_study(model, splits, StudyConfig(progress=False), info)
            write_study(done, out)
            studies.append(time.perf_counter() - start)
    results, founding, study = done.results, min(foundings), min(studies)
    print(f"founding loop, one pass over {len(splits.test)} test images (fp32, NCHW, batch 256): {founding:.2f} s "
          f"(runs: {', '.join(f'{t:.2f}' for t in foundings)})")
    print(f"whole study ({len(splits.test)} test + {len(splits.val)} validation images, reports written): {study:.2f} s "
          f"(runs: {', '.join(f'{t:.2f}' for t in studies)})")
    print(f"ratio study / founding pass: {study / founding:.2f}  (target <= 1.5)")
    print(f"timing model: mean |relative error| {results.timing_model.mean_abs_relative_error:.1%} "
          f"over {len(results.timing_model.checks)} real runs")

    check = results.precision_check
    print(f"the study chose precision {results.precision} (probe ms/image: "
          + (", ".join(f"{t['precision']} {t['ms_per_image']:.2f}" for t in check["tried"]) if check else "-")
          + f"), micro-batch {results.micro_batch}, device {results.machine['device']}")
    if not args.agreement:
        return
    exact = all_exit_logits(prepare(model, "fp32"), splits.test).logits.argmax(-1)
    for precision in ("bf16", "mixed"):
        agreement = (all_exit_logits(prepare(model, precision), splits.test).logits.argmax(-1) == exact).mean(1)
        print(f"{precision} vs fp32 prediction agreement per exit on all test images: "
              + ", ".join(f"{a:.2%}" for a in agreement)
              + f"  (>= {AGREEMENT_REQUIRED:.1%} at every exit: {'yes' if agreement.min() >= AGREEMENT_REQUIRED else 'no'})")

if __name__ == "__main__":
    main()
