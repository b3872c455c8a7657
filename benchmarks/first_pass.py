"""Is a setting's first early-exit pass slower than its later ones? (Why the study times each real run twice.)

    python benchmarks/first_pass.py [--model b-resnet11] [--images 2000] [--passes 3] [--device auto]

The model's card setting and two more (its thresholds scaled by 0.7 and 1.3), each run --passes times in a row on
--images CIFAR-10 test images (a seeded sample; batch 256, the precision and micro-batch `tune` measures here): every pass's
seconds, and the first pass over the best later one. A new setting meets new survivor counts, so new batch shapes;
a first pass pays for setting up their kernels (on the H200 about 6x a later pass: docs/measured.md).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from exitwise.device import machine, machine_load, resolve_device

from timing_common import SHARED, card_setting_on_test


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=SHARED / "data/cifar10-jpg.tar.gz")
    p.add_argument("--model", default="b-resnet11")
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--passes", type=int, default=3)
    p.add_argument("--device", default="auto")
    args = p.parse_args()
    device = resolve_device(args.device)
    test, model, tuned, prepared = card_setting_on_test(args.data, args.model, args.images, device)
    print(f"{args.model} on {machine(device).describe()}; {machine_load().describe()}; precision "
          f"{tuned.precision}, micro-batch {tuned.micro_batch}; {len(test)} images, batch 256")
    for scale in (1.0, 0.7, 1.3):
        thresholds = np.asarray(model.thresholds) * scale
        setting = prepared.with_setting(model.policy.name, thresholds)
        seconds = [setting.run(test, batch_size=256, micro_batch=tuned.micro_batch).seconds for _ in range(args.passes)]
        print(f"{model.policy.name} {[round(float(t), 3) for t in thresholds]}: passes "
              f"{', '.join(f'{s:.3f}' for s in seconds)} s; first / best later {seconds[0] / min(seconds[1:]):.2f}x")


if __name__ == "__main__":
    main()
