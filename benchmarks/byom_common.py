"""What the bring-your-own-model benchmarks share: the CIFAR-10 archive in ../shared, the plain ResNet-18 of
scripts/resnet18_cifar.py ("the user's model"), their common options and the seeded training subset."""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import torch

from exitwise.data import Splits

HERE = Path(__file__).resolve().parent
CIFAR10 = HERE.parents[1] / "shared" / "data/cifar10-jpg.tar.gz"
RESNET18 = f"{HERE.parent / 'scripts/resnet18_cifar.py'}:build"  # model file for `exitwise attach`


def resnet18_parser(doc: str, exits: str, epochs: int) -> argparse.ArgumentParser:
    """A benchmark's parser with the options every one of them takes: data, the ResNet-18's weights, exits, epochs."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=CIFAR10)
    p.add_argument("--weights", type=Path, required=True)
    p.add_argument("--exits", default=exits)
    p.add_argument("--epochs", type=int, default=epochs)
    return p


def seeded_train_subset(splits: Splits, images: int) -> Splits:
    """`splits` with the same `images` training images on every run (seed 0); validation and test untouched."""
    chosen = torch.randperm(len(splits.train), generator=torch.Generator().manual_seed(0))[:images]
    return dataclasses.replace(splits, train=splits.train.subset(chosen))
