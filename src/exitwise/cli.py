"""Command line: a thin layer over the Python API. User mistakes print one line and exit 2."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .errors import UserError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2, like every other user mistake
        raise UserError(f"{self.prog}: {message}")


def _float_list(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", default="cifar10", help="cifar10 or digits (digits ships with scikit-learn)")
    p.add_argument("--data-dir", type=Path, help="cifar-10-batches-py/, an image-folder tree train/<class>/*, "
                                                 "test/<class>/*, or a .tar.gz of either")
    p.add_argument("--download", action="store_true", help="fetch the official CIFAR-10 archive into --data-dir")
    p.add_argument("--val-size", type=int, help="images held out from train for validation (cifar10: 5000)")
    p.add_argument("--split-seed", type=int, default=0, help="seed of the train/validation split")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="exitwise", description="Early-exit inference with multi-exit networks.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    study = sub.add_parser("study", help="the early-exit study: per-exit accuracy, cutoff sweep, calibration, "
                                         "timing; writes results.json, plots and an HTML report")
    _add_data_args(study)
    study.add_argument("--model", default="seed-branchynet", help="a registered model (see `exitwise models`)")
    study.add_argument("--weights", type=Path, help="checkpoint (.safetensors or a PyTorch state_dict); "
                                                    "default: the weights shipped for --model")
    study.add_argument("--out", type=Path, required=True, help="output directory")
    study.add_argument("--cutoff", type=float, default=0.6, help="the fixed entropy cutoff, in nats")
    study.add_argument("--desired-accuracies", type=_float_list, default=None,
                       help="comma-separated targets for calibration (default 0.60,0.65,...,0.90)")
    study.add_argument("--method", action="append", dest="methods",
                       help="calibration method: per-exit (default) and/or seed-percentile; repeatable")
    study.add_argument("--batch-size", type=int, default=256)
    study.add_argument("--precision", default="bf16", help="bf16 (autocast, checked against fp32) or fp32")

    train = sub.add_parser("train", help="joint multi-exit training (BranchyNet); checkpoints every epoch, "
                                         "--resume continues; runs under torchrun as DDP")
    _add_data_args(train)
    train.add_argument("--model", required=True, help="a registered model (see `exitwise models`)")
    train.add_argument("--out", type=Path, required=True, help="output directory: checkpoint.pt, "
                                                               "model.safetensors, model.json")
    train.add_argument("--resume", type=Path, help="continue from this checkpoint.pt exactly")
    train.add_argument("--epochs", type=int)
    train.add_argument("--batch-size", type=int, help="global batch size (split across torchrun processes)")
    train.add_argument("--lr", type=float, help="peak learning rate")
    train.add_argument("--weight-decay", type=float)
    train.add_argument("--label-smoothing", type=float)
    train.add_argument("--exit-weights", type=_float_list, help="loss weight per exit, comma-separated")
    train.add_argument("--schedule", help="onecycle or cosine")
    train.add_argument("--precision", help="bf16 (autocast) or fp32")
    train.add_argument("--seed", type=int)

    sub.add_parser("models", help="list the registered models and whether weights ship for them")
    return parser


def cmd_study(args: argparse.Namespace) -> None:
    from .api import study
    results = study(dataset=args.dataset, data_dir=args.data_dir, download=args.download, model=args.model,
                    weights=args.weights, out=args.out, cutoff=args.cutoff,
                    desired_accuracies=args.desired_accuracies, methods=args.methods,
                    batch_size=args.batch_size, precision=args.precision, val_size=args.val_size,
                    split_seed=args.split_seed, progress=not args.no_progress)
    from .report import format_summary
    print(format_summary(results))
    print(f"\nreport: {(args.out / 'report.html').resolve()}")


def cmd_train(args: argparse.Namespace) -> None:
    from .api import train
    recipe = {k: getattr(args, k) for k in ("epochs", "batch_size", "lr", "weight_decay", "label_smoothing",
                                            "exit_weights", "schedule", "precision", "seed")
              if getattr(args, k) is not None}
    card = train(dataset=args.dataset, data_dir=args.data_dir, download=args.download, model=args.model,
                 out=args.out, resume=args.resume, val_size=args.val_size, split_seed=args.split_seed,
                 progress=not args.no_progress, **recipe)
    if card is not None:
        accuracy = ", ".join(f"{a:.2%}" for a in card["test_accuracy"] or [])
        print(f"trained {card['model']} in {card['train_seconds']:.0f} s; test accuracy per exit: {accuracy}")
        print(f"weights: {(args.out / 'model.safetensors').resolve()}")


def cmd_models(args: argparse.Namespace) -> None:
    from .models import MODELS, shipped_weights
    for name in sorted(MODELS):
        weights = shipped_weights(name)
        print(f"{name:20s} {'weights shipped' if weights else 'no shipped weights (pass --weights)'}")


COMMANDS = {"study": cmd_study, "train": cmd_train, "models": cmd_models}


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        COMMANDS[args.command](args)
    except UserError as e:
        print(f"exitwise: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("exitwise: interrupted", file=sys.stderr)
        return 130
    return 0
