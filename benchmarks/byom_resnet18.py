"""Bring your own model: exits on a plain CIFAR ResNet-18 trained without them (scripts/train_resnet18.py).

    python benchmarks/byom_resnet18.py --weights runs/resnet18/resnet18.safetensors --out runs/r18-exits

Attaches exits with the backbone frozen (by default after layer1, layer2.0, layer2, layer3.0 and layer3, trained
15 epochs with half of each side head's loss from the final exit's predictions: the setting of the measured runs in
docs/measured.md), trains the heads (their training time is printed), checks the final exit is the model's own
accuracy, then runs benchmarks/early_exit_speed.py on the model folder: the fastest validation-chosen setting within
0.5 points, wall-clock ratios at batch 256 and 1 and the MACs ratio, in one run. Target: 1.8x at both batch sizes.
"""
import json
import subprocess
import sys
from pathlib import Path

from exitwise.api import attach_model
from exitwise.config import AttachConfig
from exitwise.data import load_splits
from exitwise.models import HeadReport, ModelCard

from byom_common import HERE, RESNET18, resnet18_parser


def main() -> None:
    p = resnet18_parser(__doc__, exits="layer1,layer2.0,layer2,layer3.0,layer3", epochs=15)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--head", default="auto", help="auto, conv-pool, conv, pool or gap, or one per exit "
                                                  "(comma-separated; see benchmarks/byom_heads.py)")
    p.add_argument("--distill", type=float, default=0.5, help="side heads learn from the final exit this much")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch1-images", type=int, default=10000, help="test images timed at batch 1")
    p.add_argument("--images", type=int, help="a smoke run: N seeded train, validation and test images only")
    args = p.parse_args()
    splits = load_splits("cifar10", args.data)
    if args.images:
        splits = splits.sample(args.images)
    spec = AttachConfig(model_file=RESNET18, weights=args.weights, exits=args.exits.split(","),
                        head=args.head.split(","))
    card = attach_model(spec, args.out, splits=splits, epochs=args.epochs, distill=args.distill)
    final = card.test_accuracy[-1]
    print(f"final exit {final:.2%} on test; the model's own card (its training run's test split): "
          f"{load_card(args.weights)}")
    print(f"head training: {card.train_seconds:.0f} s for {args.epochs} epochs; test accuracy per exit "
          + ", ".join(f"{a:.2%}" for a in card.test_accuracy))
    for h in card.heads:
        print(head_line(h))
    subprocess.run([sys.executable, str(HERE / "early_exit_speed.py"), "--data", str(args.data), "--model",
                    str(args.out), "--repeats", str(args.repeats),
                    "--batch1-images", str(args.batch1_images)]
                   + (["--images", str(args.images)] if args.images else []),
                   check=True)


def head_line(h: HeadReport) -> str:
    """A side head's MACs beside its stage's, as printed."""
    return f"  head after {h.exit} ({h.kind}): {h.head_macs:,} MACs ({h.fraction:.1%} of its stage)"


def load_card(weights: Path) -> str:
    """The user's model's own test accuracy, from the card train_resnet18.py wrote beside its weights."""
    path = weights.parent / "model.json"
    if not path.is_file():
        return "no card beside the weights"
    return f"{ModelCard.from_json(json.loads(path.read_text())).test_accuracy[0]:.2%}"


if __name__ == "__main__":
    main()
