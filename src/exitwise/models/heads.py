"""Exit heads built from the shape of the features at a cut, within a MACs budget.

A head factory is called as `factory(feature_shape, num_classes, budget_macs)`, `feature_shape` being one
sample's features (no batch dimension) and `budget_macs` what the head may cost (a fraction of the stage it
follows); it returns an nn.Module mapping (N, *feature_shape) to (N, num_classes) logits.

The default:
* (C, H, W) maps: the richest of three heads that fits the budget: a stride-2 3x3 conv to up to C channels,
  batch norm, ReLU, global max pool and a linear layer (the side head of exitwise's own b-resnet11); Shallow-Deep
  Networks' feature reduction (a learned mix of max and average pooling down to 4x4, then a linear layer); a
  global average pool and a linear layer (the cheapest).
* (T, D) tokens: layer norm, the mean over tokens (or the first, CLS, token), a linear layer.
* (D,) vectors: a linear layer.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from torch import nn

from ..errors import UserError

HeadFactory = Callable[[tuple[int, ...], int, float], nn.Module]
MIN_CONV_WIDTH = 16  # narrower than this, a conv head learns less than the pooled linear one


class MixedPool(nn.Module):
    """Shallow-Deep Networks' feature reduction: a * max pool + (1 - a) * average pool, a learned (sigmoid)."""

    def __init__(self, size: int):
        super().__init__()
        self.max, self.avg = nn.AdaptiveMaxPool2d(size), nn.AdaptiveAvgPool2d(size)
        self.alpha = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.sigmoid(self.alpha)
        return a * self.max(x) + (1 - a) * self.avg(x)


class TokenHead(nn.Module):
    """Layer norm, then the mean over tokens ("mean") or the first token ("cls"), then a linear layer."""

    def __init__(self, dim: int, num_classes: int, pool: str = "mean"):
        super().__init__()
        if pool not in ("mean", "cls"):
            raise UserError(f"token pooling must be mean or cls, got {pool!r}")
        self.pool = pool
        self.norm, self.fc = nn.LayerNorm(dim), nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        return self.fc(x.mean(1) if self.pool == "mean" else x[:, 0])


def conv_head(channels: int, width: int, num_classes: int) -> nn.Sequential:
    """Stride-2 3x3 conv to `width` channels, batch norm, ReLU, global max pool, linear."""
    return nn.Sequential(nn.Conv2d(channels, width, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(width),
                         nn.ReLU(inplace=True), nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(width, num_classes))


def map_head(shape: Sequence[int], num_classes: int, budget_macs: float) -> nn.Module:
    """The richest (C, H, W) head within `budget_macs`; the cheapest one when none fits."""
    c, h, w = shape
    per_width = math.ceil(h / 2) * math.ceil(w / 2) * c * 9 + num_classes  # conv + linear MACs per output channel
    width = min(c, int(budget_macs // per_width))
    if width >= min(MIN_CONV_WIDTH, c):
        return conv_head(c, width, num_classes)
    size = min(4, h, w)
    if c * size * size * num_classes <= budget_macs and size > 1:
        return nn.Sequential(MixedPool(size), nn.Flatten(), nn.Linear(c * size * size, num_classes))
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, num_classes))


def default_head_factory(shape: tuple[int, ...], num_classes: int, budget_macs: float,
                         token_pool: str = "mean") -> nn.Module:
    """A head for features of `shape` (one sample's), by their rank: maps, tokens or vectors."""
    if len(shape) == 3:
        return map_head(shape, num_classes, budget_macs)
    if len(shape) == 2:
        return TokenHead(shape[1], num_classes, token_pool)
    if len(shape) == 1:
        return nn.Linear(shape[0], num_classes)
    raise UserError(f"no default exit head for features of shape {tuple(shape)} per sample: pass a head_factory")


def token_head_factory(pool: str) -> HeadFactory:
    """The default factory with token features pooled by `pool` ("mean" or "cls")."""
    return lambda shape, num_classes, budget: default_head_factory(shape, num_classes, budget, pool)
