"""ONNX Runtime vs the torch runtime, full network and early exit, batch 256 and batch 1, in one run.

    python benchmarks/onnx_speed.py [--model b-resnet11 ...] [--images 2000] [--batch1-images 300]

For each shipped CIFAR-10 model (shipped weights): thresholds for the model's entropy policy chosen on
validation images as `exitwise calibrate --within-points 0.5` would (the cheapest setting in MACs
within 0.5 points of the final exit's validation accuracy), the model exported with `exitwise export`
(default exporter) into a temporary folder, then on the first --images test images: the full network
(every stage and the final head, no side exits) and real early exit, on torch (the inference copy in the
precision and micro-batch measured fastest on this machine, as the study chooses them) and on ONNX Runtime
(`exitwise.deploy.onnx_runtime`: fp32, its 64-row micro-batches). Each timing is the best of --repeats runs, torch and
ONNX Runtime taking turns. The two runtimes' exits are compared too.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from exitwise.allocator import keep_freed_memory
from exitwise.study import calibration
from exitwise.api import load_model
from exitwise.models.costs import exit_macs
from exitwise.data import load_splits
from exitwise.early_exit import EarlyExitModel
from exitwise.export import export_onnx
from exitwise.device import machine, machine_load
from exitwise.tune import tune
from exitwise.models import shipped_models
from exitwise.deploy.onnx_runtime import OnnxEarlyExit
from exitwise.policies import exit_arrays, get_policy
from exitwise.runtime import all_exit_logits, run_backbone, run_early_exit, warm_up

from timing_common import best_of_interleaved

SHARED = Path(__file__).resolve().parents[2] / "shared"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=SHARED / "data/cifar10-jpg.tar.gz")
    p.add_argument("--model", action="append", dest="models", help="repeatable; default: every shipped CIFAR model")
    p.add_argument("--images", type=int, default=2000, help="test images timed at batch 256")
    p.add_argument("--batch1-images", type=int, default=300, help="test images timed at batch 1")
    p.add_argument("--val-images", type=int, default=2000, help="validation images the thresholds are chosen on")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--exporter", default="dynamo")
    args = p.parse_args()
    keep_freed_memory()  # as the `exitwise` commands run models (exitwise.allocator)
    splits = load_splits("cifar10", args.data, progress=False)
    val = splits.val.subset(torch.arange(min(args.val_images, len(splits.val))))
    test = splits.test.subset(torch.arange(min(args.images, len(splits.test))))
    one = splits.test.subset(torch.arange(min(args.batch1_images, len(splits.test))))
    load = machine_load()
    print(f"machine: {machine().describe()}")
    print(f"onnxruntime {ort.__version__}, providers {ort.get_available_providers()} (CPUExecutionProvider used), "
          f"intra-op threads: default (one per physical core)")
    print(load.describe())
    print(f"{len(test)} test images at batch 256, {len(one)} at batch 1; best of {args.repeats} runs; "
          f"ms per image; ratio = torch ms / ONNX Runtime ms (> 1: ONNX Runtime faster)\n")
    print(f"{'model':18s} {'run':12s} {'batch':>5s} {'torch':>8s} {'onnxrt':>8s} {'ratio':>6s}")
    policy = get_policy("entropy")
    for name in args.models or shipped_models("cifar10"):
        network, _ = load_model(name)
        tuned = tune(network, test)
        model, mb = tuned.network, dict(micro_batch=tuned.micro_batch)
        print(f"{name}: torch in {tuned.precision}, micro-batch {tuned.micro_batch} (measured here)")
        warm_up(model, test, **mb)
        arrays = exit_arrays(all_exit_logits(model, val, **mb).logits, val.labels.numpy(), policy)
        goal = calibration.relative_target(arrays.correct, 0.5)
        found = calibration.empirical_thresholds(arrays.scores, arrays.correct, exit_macs(network), goal)
        thresholds = found.thresholds if found.status == "ok" else found.closest.thresholds
        early_exit = EarlyExitModel.create(network, name, policy, thresholds)
        with tempfile.TemporaryDirectory() as folder:
            export_onnx(early_exit, folder, exporter=args.exporter)
            runner = OnnxEarlyExit.load(folder)
        pixels, pixels1 = test.images.numpy(), one.images.numpy()
        runner.run(pixels[:256])  # warm-up
        t = early_exit.thresholds
        torch_run, onnx_run = run_early_exit(model, test, t, policy, **mb), runner.run(pixels)
        same = (torch_run.exits == onnx_run.exits).mean()
        rows = [("full network", 256, lambda: run_backbone(model, test, 256, **mb), lambda: runner.run_backbone(pixels)),
                ("early exit", 256, lambda: run_early_exit(model, test, t, policy, 256, **mb), lambda: runner.run(pixels)),
                ("full network", 1, lambda: run_backbone(model, one, 1, **mb),
                 lambda: runner.run_backbone(pixels1, batch_size=1)),
                ("early exit", 1, lambda: run_early_exit(model, one, t, policy, 1, **mb),
                 lambda: runner.run(pixels1, batch_size=1))]
        for label, batch, on_torch, on_onnx in rows:
            n = len(test) if batch == 256 else len(one)
            ms_torch, ms_onnx = (1000 * r.seconds / n for r in best_of_interleaved(args.repeats, on_torch, on_onnx))
            print(f"{name:18s} {label:12s} {batch:5d} {ms_torch:8.3f} {ms_onnx:8.3f} {ms_torch / ms_onnx:6.2f}")
        shares = np.bincount(onnx_run.exits, minlength=network.num_exits) / len(test)
        print(f"{'':18s} thresholds {np.round(t, 4).tolist()} (validation target {goal:.4f}); exit shares "
              f"{np.round(shares, 3).tolist()}; same exit in both runtimes: {same:.2%}")
    print(f"\nat the end: {machine_load().describe()}")


if __name__ == "__main__":
    main()
