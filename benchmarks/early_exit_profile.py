"""Where early exit's time goes, by hand: `python benchmarks/early_exit_profile.py [--device cuda] [--batch-size 256]`.

b-resnet11 in fp32 at the margin setting 0.608 on the CIFAR-10 test images: four early-exit passes and three
full-network passes, each timed (the first pass shows one-time set-up: on a GPU, cuDNN's per-shape kernel choice
for every new count of survivors), then one early-exit pass under torch.profiler, its ops by host time.
"""
import argparse
import time
from pathlib import Path

import torch

from exitwise.allocator import keep_freed_memory
from exitwise import runtime
from exitwise.api import load_model
from exitwise.data import load_splits
from exitwise.device import machine, resolve_device
from exitwise.policies import get_policy

SHARED = Path(__file__).resolve().parents[2] / "shared"


def seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=SHARED / "data/cifar10-jpg.tar.gz")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=256, help="also the micro-batch")
    args = p.parse_args()
    keep_freed_memory()  # as the `exitwise` commands run models (exitwise.allocator)
    device = resolve_device(args.device)
    test = load_splits("cifar10", args.data, progress=False).test
    net = runtime.prepare(load_model("b-resnet11")[0], "fp32", device)
    policy, thresholds = get_policy("margin"), [0.608] * 3
    size = dict(batch_size=args.batch_size, micro_batch=args.batch_size)
    print(f"machine: {machine(device).describe()}; {len(test)} images, batch {args.batch_size}")
    early = [seconds(lambda: runtime.run_early_exit(net, test, thresholds, policy, **size)) for _ in range(4)]
    full = [seconds(lambda: runtime.run_backbone(net, test, **size)) for _ in range(3)]
    print("early exit passes (s):", ", ".join(f"{t:.3f}" for t in early))
    print("full network passes (s):", ", ".join(f"{t:.3f}" for t in full))
    print(f"early exit / full network, best pass each: {min(early) / min(full):.2f}")
    activities = [torch.profiler.ProfilerActivity.CPU] + (
        [torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch.profiler.profile(activities=activities) as prof:
        runtime.run_early_exit(net, test, thresholds, policy, **size)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


if __name__ == "__main__":
    main()
