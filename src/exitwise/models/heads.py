"""Exit heads built from the shape of the features at a cut, within a MACs budget.

A head factory is called as `factory(feature_shape, num_classes, budget_macs)`, `feature_shape` being one
sample's features (no batch dimension) and `budget_macs` what the head may cost (a fraction of the stage it
follows); it returns an nn.Module mapping (N, *feature_shape) to (N, num_classes) logits.

The default:
* (C, H, W) maps: the richest head that fits the budget (or the kind asked for, `map_head`): "conv-pool", a
  stride-2 3x3 conv to up to C channels, batch norm, ReLU, then Shallow-Deep Networks' feature reduction (a learned
  mix of max and average pooling down to 4x4) and a linear layer; "conv", the same conv with a global max pool (the
  side head of exitwise's own b-resnet11); "pool", SDN's feature reduction and a linear layer; "gap", a global
  average pool and a linear layer (the cheapest). On a frozen ResNet-18 conv-pool learned best at equal MACs
  (docs/bring-your-own-model.md), so `auto` tries it first.
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
MAP_HEAD_KINDS = ("auto", "conv-pool", "conv", "pool", "gap")
TOKEN_POOLS = ("mean", "cls")
MIN_CONV_WIDTH = 16  # narrower than this, a conv head learns less than the pooled linear one


def check_head_options(token_pool: str = "mean", map_kind: str | Sequence[str] = "auto") -> None:
    """The one check of the default factory's options (a head kind, or one per exit): a clear error for an unknown one."""
    for kind in [map_kind] if isinstance(map_kind, str) else map_kind:
        if kind not in MAP_HEAD_KINDS:
            raise UserError(f"unknown head kind {kind!r}: choose one of {', '.join(MAP_HEAD_KINDS)}")
    if token_pool not in TOKEN_POOLS:
        raise UserError(f"token pooling must be {' or '.join(TOKEN_POOLS)}, got {token_pool!r}")


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
        check_head_options(token_pool=pool)
        self.pool = pool
        self.norm, self.fc = nn.LayerNorm(dim), nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        return self.fc(x.mean(1) if self.pool == "mean" else x[:, 0])


def conv_head(channels: int, width: int, num_classes: int, pool: int = 1) -> nn.Sequential:
    """Stride-2 3x3 conv to `width` channels, batch norm, ReLU, then a global max pool (`pool` 1) or SDN's mixed
    pool to `pool` x `pool`, linear."""
    reduce = nn.AdaptiveMaxPool2d(1) if pool == 1 else MixedPool(pool)
    return nn.Sequential(nn.Conv2d(channels, width, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(width),
                         nn.ReLU(inplace=True), reduce, nn.Flatten(), nn.Linear(width * pool * pool, num_classes))


def _pooled_size(h: int, w: int) -> int:
    """The side of SDN's pooled map: 4, or less for smaller maps."""
    return min(4, h, w)


def conv_width(shape: Sequence[int], num_classes: int, budget_macs: float, pool: int = 1) -> int:
    """The widest `conv_head` (pooled to `pool` x `pool`) within `budget_macs` (at most C channels)."""
    c, h, w = shape
    per_width = math.ceil(h / 2) * math.ceil(w / 2) * c * 9 + pool * pool * num_classes  # conv + linear MACs
    return min(c, int(budget_macs // per_width))


def _conv_pool_side(shape: Sequence[int], kind: str) -> int:
    """The side of a conv head's pooled map: SDN's 4x4 (less for small maps) after the stride-2 conv for "conv-pool",
    1 (a global max pool) for "conv"."""
    _, h, w = shape
    return _pooled_size(math.ceil(h / 2), math.ceil(w / 2)) if kind == "conv-pool" else 1


def map_head_kind(shape: Sequence[int], num_classes: int, budget_macs: float, kind: str = "auto") -> str:
    """`kind`, or for "auto" the richest kind within `budget_macs`: conv-pool, conv, pool, gap (the cheapest when
    none fits). A conv head is at least MIN_CONV_WIDTH channels wide (C if fewer)."""
    check_head_options(map_kind=kind)
    if kind != "auto":
        return kind
    c, h, w = shape
    for conv_kind in ("conv-pool", "conv"):
        if conv_width(shape, num_classes, budget_macs, _conv_pool_side(shape, conv_kind)) >= min(MIN_CONV_WIDTH, c):
            return conv_kind
    pooled = _pooled_size(h, w)
    return "pool" if pooled > 1 and c * pooled * pooled * num_classes <= budget_macs else "gap"


def map_head(shape: Sequence[int], num_classes: int, budget_macs: float, kind: str = "auto") -> nn.Module:
    """A (C, H, W) head of `kind` (`map_head_kind` resolves "auto"); a conv head as wide as the budget allows, at
    least MIN_CONV_WIDTH channels."""
    kind = map_head_kind(shape, num_classes, budget_macs, kind)
    c, h, w = shape
    if kind in ("conv-pool", "conv"):
        pool = _conv_pool_side(shape, kind)
        width = max(min(MIN_CONV_WIDTH, c), conv_width(shape, num_classes, budget_macs, pool))
        return conv_head(c, width, num_classes, pool)
    if kind == "pool":
        size = _pooled_size(h, w)
        return nn.Sequential(MixedPool(size), nn.Flatten(), nn.Linear(c * size * size, num_classes))
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, num_classes))


def default_head_factory(shape: tuple[int, ...], num_classes: int, budget_macs: float,
                         token_pool: str = "mean", map_kind: str = "auto") -> nn.Module:
    """A head for features of `shape` (one sample's), by their rank: maps (a `map_head` of `map_kind`), tokens or
    vectors."""
    if len(shape) == 3:
        return map_head(shape, num_classes, budget_macs, map_kind)
    if len(shape) == 2:
        return TokenHead(shape[1], num_classes, token_pool)
    if len(shape) == 1:
        return nn.Linear(shape[0], num_classes)
    raise UserError(f"no default exit head for features of shape {tuple(shape)} per sample: pass a head_factory")

