"""Whole study, run as users run it, vs one evaluation pass of the founding system's loop, measured in one run.

    python benchmarks/study_speed.py [--data ../shared/data/cifar10-jpg.tar.gz] [--weights ../shared/seed/cifar10_branchyNet_m.h5]
    python benchmarks/study_speed.py --dataset digits --model digits-convnet --weights '' --repeats 1   # smoke run

The founding loop: batch 256, fp32, default (NCHW) layout, the whole batch through every stage
and head, in this process. The study: the command `python -m exitwise study ...` as a user types it, in a
subprocess with this environment minus any glibc malloc settings (MALLOC_*_, GLIBC_TUNABLES), timed from start to
exit (interpreter start, imports, data, every table, plot and report); its defaults (precision and micro-batch
measured on this machine; the micro-batch probe's result is cached, so one untimed run comes first, as a user's
second study would find it). With --agreement, also the bf16-vs-fp32 and mixed-vs-fp32 agreement on all test
images (slow where bf16 is emulated).

glibc's malloc thresholds: the founding loop's batch-256 activations (33.5 MB) are otherwise mmapped and
page-faulted anew on every allocation (its pass took 14 s instead of 8.3 s on the AMD EPYC, depending on the
process's history). The exitwise commands that run models raise them themselves (`exitwise.allocator`); this
process raises them the same way before its founding loop, so the founding loop is at its best and steady.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from exitwise.allocator import USER_SETTINGS, keep_freed_memory
from exitwise.api import load_model
from exitwise.data import load_splits
from exitwise.config import AGREEMENT_REQUIRED
from exitwise.device import machine, machine_load
from exitwise.runtime import all_exit_logits, prepare

SHARED = Path(__file__).resolve().parents[2] / "shared"


@torch.inference_mode()
def founding_loop_seconds(model, data) -> float:
    model = model.eval().to(memory_format=torch.contiguous_format)
    start = time.perf_counter()
    for images, _ in data.batches(256):
        model(images.contiguous())
    return time.perf_counter() - start


def study_command(args: argparse.Namespace, out: str) -> list[str]:
    """`exitwise study` as a user types it (python -m exitwise: the same entry point as the `exitwise` script)."""
    return [sys.executable, "-m", "exitwise", "study", "--dataset", args.dataset, "--model", args.model,
            *(["--data-dir", str(args.data)] if args.data else []),
            *(["--weights", str(args.weights)] if args.weights else []), "--out", out, "--no-progress"]


def study_seconds(args: argparse.Namespace, env: dict) -> tuple[float, dict]:
    """Wall time of one `exitwise study` command, and the results.json it wrote."""
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        subprocess.run(study_command(args, out), env=env, check=True, stdout=subprocess.DEVNULL, timeout=3600)
        seconds = time.perf_counter() - start
        return seconds, json.loads((Path(out) / "results.json").read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="cifar10")
    p.add_argument("--data", type=Path, default=SHARED / "data/cifar10-jpg.tar.gz", help="'' for none (digits)")
    p.add_argument("--weights", type=Path, default=SHARED / "seed/cifar10_branchyNet_m.h5", help="'': shipped")
    p.add_argument("--model", default="seed-branchynet")
    p.add_argument("--repeats", type=int, default=2, help="interleaved runs of each; the best counts")
    p.add_argument("--agreement", action="store_true", help="also bf16/mixed agreement with fp32 on all test images")
    args = p.parse_args()
    args.data = args.data if str(args.data) not in ("", ".") else None
    args.weights = args.weights if str(args.weights) not in ("", ".") else None
    env = {k: v for k, v in os.environ.items() if k not in USER_SETTINGS}  # the user's environment, no malloc help
    raised = keep_freed_memory()

    print(f"machine: {machine().describe()}; {machine_load().describe()}; glibc malloc thresholds raised "
          f"for the founding loop: {'yes' if raised else 'no (not glibc)'}; the study: `{' '.join(study_command(args, 'OUT'))}`")
    splits = load_splits(args.dataset, args.data, progress=False)
    model, info = load_model(args.model, args.weights)
    study_seconds(args, env)  # untimed: caches the micro-batch probe and the decoded data, as a second study finds them
    foundings, studies = [], []
    for _ in range(args.repeats):  # interleaved, best of each: a burst of other work decides nothing
        foundings.append(founding_loop_seconds(model, splits.test))
        seconds, results = study_seconds(args, env)
        studies.append(seconds)
    founding, study = min(foundings), min(studies)
    print(f"founding loop, one pass over {len(splits.test)} test images (fp32, NCHW, batch 256): {founding:.2f} s "
          f"(runs: {', '.join(f'{t:.2f}' for t in foundings)})")
    print(f"whole study as a command ({len(splits.test)} test + {len(splits.val)} validation images, reports "
          f"written, from start to exit): {study:.2f} s (runs: {', '.join(f'{t:.2f}' for t in studies)})")
    print(f"ratio study / founding pass: {study / founding:.2f}  (target <= 1.5)")
    checks = results["timing_model"]["checks"]
    print(f"timing model: mean |relative error| {results['timing_model']['mean_abs_relative_error']:.1%} "
          f"over {len(checks)} real runs")

    check = results["precision_check"]
    print(f"the study chose precision {results['precision']} (probe ms/image: "
          + (", ".join(f"{t['precision']} {t['ms_per_image']:.2f}" for t in check["tried"]) if check else "-")
          + f"), micro-batch {results['micro_batch']}, device {results['machine']['device']}")
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
