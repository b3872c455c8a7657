"""Early exit's offline gain at the batch sizes a server forms: full network against early exit, per batch size.

    python benchmarks/batch_ratio.py [--model b-resnet11] [--images 2560] [--batch-sizes 16,32,64,256] [--repeats 3]

The model's card setting (what `exitwise serve --model NAME` serves) on --images CIFAR-10 test images (a seeded sample), in the
precision and micro-batch `tune` measures here: `run_backbone` and `EarlyExitModel.run` at each batch size, the two
taking turns in every round; ms per image of the best round and the ratio, with each round's ratio. A server under
load runs its stages on the rows that are waiting (serve_load prints them: about 30 at stage 0 with 64 requests in
flight, fewer at later stages), so this is the gain it can keep, where batch 256 is the offline one.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from exitwise.device import machine, machine_load, resolve_device
from exitwise.runtime import run_backbone

from timing_common import SHARED, card_setting_on_test


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=SHARED / "data/cifar10-jpg.tar.gz")
    p.add_argument("--model", default="b-resnet11")
    p.add_argument("--images", type=int, default=2560)
    p.add_argument("--batch-sizes", default="16,32,64,256")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    test, model, tuned, prepared = card_setting_on_test(args.data, args.model, args.images, resolve_device("cpu"))
    print(f"{args.model} on {machine().describe()}; {machine_load().describe()}; precision {tuned.precision}, "
          f"micro-batch {tuned.micro_batch}; setting {model.policy.name} {[round(float(t), 4) for t in model.thresholds]}; "
          f"{len(test)} images")
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    rounds: dict[int, list[tuple[float, float]]] = {b: [] for b in sizes}
    for _ in range(args.repeats):
        for b in sizes:
            full = run_backbone(tuned.network, test, batch_size=b, micro_batch=tuned.micro_batch).seconds
            early = prepared.run(test, batch_size=b, micro_batch=tuned.micro_batch).seconds
            rounds[b].append((full, early))
    for b, pairs in rounds.items():
        full, early = min(f for f, _ in pairs), min(e for _, e in pairs)
        print(f"batch {b:4d}: full network {1e3 * full / len(test):.3f} ms/image, early exit "
              f"{1e3 * early / len(test):.3f} ms/image, {full / early:.2f}x (rounds "
              f"{', '.join(f'{f / e:.2f}' for f, e in pairs)})")


if __name__ == "__main__":
    main()
