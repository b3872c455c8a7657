"""Which exit head pays? Each (C, H, W) head kind on the same frozen backbone, compared in one run.

    python benchmarks/byom_heads.py --weights runs/resnet18/resnet18.safetensors [--epochs 2 --train-images 20000]

For each kind (conv-pool, conv, pool, gap; see exitwise.models.heads) `exitwise attach` puts exits after layer1,
layer2 and layer3 of the plain ResNet-18 (scripts/resnet18_cifar.py) and trains them with the backbone frozen, on the
same seeded training images for the same epochs; then the whole study runs on the model folder. Printed per kind: each
head's MACs, each exit's test accuracy, and the study's fastest validation-chosen setting within 0.5 points of the
final exit: its test accuracy, MACs ratio and measured wall-clock speed-up at batch 256 on the study's timing
images. The kind with the best speed-up at equal accuracy pays.
"""
from __future__ import annotations

import tempfile

from exitwise.api import attach_model, load_model
from exitwise.config import AttachConfig
from exitwise.data import load_splits
from exitwise.device import machine, machine_load
from exitwise.models import HeadReport
from exitwise.models.heads import MAP_HEAD_KINDS
from exitwise.study import StudyConfig, run_study

from byom_common import RESNET18, resnet18_parser, seeded_train_subset


def main() -> None:
    p = resnet18_parser(__doc__, exits="layer1,layer2,layer3", epochs=2)
    p.add_argument("--train-images", type=int, default=20000, help="seeded training images the heads learn from")
    p.add_argument("--kinds", default=",".join(k for k in MAP_HEAD_KINDS if k != "auto"))
    p.add_argument("--images", type=int, help="a smoke run: N seeded validation and test images only")
    args = p.parse_args()
    splits = load_splits("cifar10", args.data, progress=False)
    if args.images:
        splits = splits.sample(args.images)
    train_splits = seeded_train_subset(splits, args.train_images)
    print(f"machine: {machine().describe()}; {machine_load().describe()}")
    print(f"heads trained on {len(train_splits.train)} images for {args.epochs} epochs; study on {len(splits.val)} "
          f"validation and {len(splits.test)} test images")
    for kind in args.kinds.split(","):
        with tempfile.TemporaryDirectory() as out:
            spec = AttachConfig(model_file=RESNET18, weights=args.weights, exits=args.exits.split(","), head=kind)
            card = attach_model(spec, out, splits=train_splits, epochs=args.epochs, progress=False)
            network, info = load_model(out)
            results = run_study(network, splits, StudyConfig(progress=False), info).results
        fastest = results.best.fastest_within_points
        print(f"\n{kind}: trained in {card.train_seconds:.0f} s; head MACs "
              + head_costs(card.heads))
        print("  test accuracy per exit: " + ", ".join(f"{e.accuracy:.2%}" for e in results.exits))
        print(f"  fastest within {results.best.within_points} points (validation): test accuracy "
              f"{fastest.test.accuracy:.2%} (full {results.full_network.accuracy:.2%}), MACs ratio "
              f"{results.full_network.mean_macs / fastest.test.mean_macs:.2f}x, measured speed-up "
              f"{fastest.speedup:.2f}x ({results.precision}, micro-batch {results.micro_batch}); exit shares "
              + ", ".join(f"{s:.1%}" for s in fastest.test.exit_shares))


def head_costs(heads: list[HeadReport]) -> str:
    """Each side head's MACs and its share of its stage's, as printed."""
    return ", ".join(f"{h.head_macs:,} ({h.fraction:.1%})" for h in heads)


if __name__ == "__main__":
    main()
