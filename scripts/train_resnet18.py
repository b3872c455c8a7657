"""Train the plain ResNet-18 of resnet18_cifar.py on CIFAR-10 without exits: "the user's model" of the benchmark.

    python scripts/train_resnet18.py --data ../shared/data/cifar10-jpg.tar.gz --out runs/resnet18 [--epochs 30]

exitwise's training loop (checkpoints, --resume, torchrun DDP, card) on the model as a one-exit network; writes
`resnet18.safetensors`, the plain model's state_dict, beside the run. Hours on a 2-core CPU (0.56 GMACs/image).
"""
import argparse
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from exitwise.data import load_splits
from exitwise.errors import UserError
from exitwise.models.base import MultiExitNetwork
from exitwise.train import TrainConfig, train

sys.path.insert(0, str(Path(__file__).resolve().parent))
from resnet18_cifar import build  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--precision", default="auto", help="auto (the faster here, timed), fp32 or bf16")
    p.add_argument("--images", type=int, help="a smoke run: N seeded train, validation and test images only")
    p.add_argument("--batch-size", type=int, default=TrainConfig.batch_size,
                   help=f"(default {TrainConfig.batch_size}; a smoke run with --images N needs N at least this)")
    p.add_argument("--resume", type=Path)
    args = p.parse_args()
    try:
        card = _train(args)
    except UserError as e:  # a mistake in the command (the data, --images, --resume): one line, not a traceback
        sys.exit(f"error: {e}")
    print(f"test accuracy {card.test_accuracy[0]:.2%}; weights: {args.out / 'resnet18.safetensors'}")


def _train(args: argparse.Namespace):
    splits = load_splits("cifar10", args.data)
    if args.images:
        splits = splits.sample(args.images)
    model = build()
    network = MultiExitNetwork([model], [nn.Identity()], num_classes=10, input_shape=(3, 32, 32))
    config = TrainConfig(epochs=args.epochs, lr=args.lr, precision=args.precision, cutout=8,
                         batch_size=args.batch_size)
    card = train(network, splits, config, args.out, resume=args.resume, model_name="resnet18-cifar-plain")
    state = {k.removeprefix("stages.0."): v.detach().clone(memory_format=torch.contiguous_format)
             for k, v in network.state_dict().items()}
    save_file(state, str(args.out / "resnet18.safetensors"))
    return card


if __name__ == "__main__":
    main()
