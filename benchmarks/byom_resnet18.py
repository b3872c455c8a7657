"""Bring your own model: exits on a plain CIFAR ResNet-18 trained without them (scripts/train_resnet18.py).

    python benchmarks/byom_resnet18.py --weights runs/resnet18/resnet18.safetensors --out runs/r18-exits

Attaches exits after layer1, layer2 and layer3 with the backbone frozen, trains the heads (their training time is
printed), checks the final exit is the model's own accuracy, then runs benchmarks/early_exit_speed.py on the model
folder: the fastest validation-chosen setting within 0.5 points, wall-clock ratios at batch 256 and 1 and the MACs
ratio, in one run. Target: 1.8x at both batch sizes.
"""
import argparse
import subprocess
import sys
from pathlib import Path

from exitwise.api import attach_model

HERE = Path(__file__).resolve().parent
SHARED = HERE.parents[1] / "shared"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=SHARED / "data/cifar10-jpg.tar.gz")
    p.add_argument("--weights", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--exits", default="layer1,layer2,layer3")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    card = attach_model(model_file=f"{HERE.parent / 'scripts/resnet18_cifar.py'}:build", weights=args.weights,
                        exits=args.exits.split(","), dataset="cifar10", data_dir=args.data, out=args.out,
                        epochs=args.epochs)
    print(f"head training: {card['train_seconds']:.0f} s for {args.epochs} epochs; test accuracy per exit "
          + ", ".join(f"{a:.2%}" for a in card["test_accuracy"]))
    for h in card["heads"]:
        print(f"  head after {h['exit']}: {h['head_macs']:,} MACs ({h['fraction']:.1%} of its stage)")
    subprocess.run([sys.executable, str(HERE / "early_exit_speed.py"), "--data", str(args.data), "--model",
                    str(args.out), "--repeats", str(args.repeats)], check=True)


if __name__ == "__main__":
    main()
