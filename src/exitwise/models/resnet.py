"""B-ResNet: a residual multi-exit network for CIFAR-10 (BranchyNet's B-ResNet family).

A ResNet-9-style trunk (Page, "How to train your ResNet"; airbench): a stem conv, then three groups,
each a conv that widens and max-pools, followed by a basic residual block. Wide and shallow learns in
few epochs; pooling before batch norm keeps the downsampling convs cheap.

Exits: after group 1 (16x16), after group 2's widening conv and after group 2's block (8x8), and the
final classifier after group 3. Side heads are cheap (one stride-2 conv, global max pool, linear),
so a sample that leaves early pays a fraction of the trunk. Built for early exit on a CPU: narrow
where the image is large, wide where it is small (see `BResNet`), so the first exit comes after about
a fifth of the MACs and the capacity that hard samples need sits where convolutions run fastest.
Input normalization sits in the first stage, so the network takes [0, 1] images like every other
exitwise model.
"""
from __future__ import annotations

import torch
from torch import nn

from .base import MultiExitNetwork
from .heads import conv_head  # a cheap exit: stride-2 3x3 conv, global max pool, linear
from .registry import register_model

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


class Normalize(nn.Module):
    """Per-channel (x - mean) / std, as buffers so the weights file carries them."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def conv_bn(c_in: int, c_out: int, pool: bool = False) -> nn.Sequential:
    """3x3 conv (then 2x2 max pool), batch norm, ReLU."""
    layers = [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)] + ([nn.MaxPool2d(2)] if pool else [])
    return nn.Sequential(*layers, nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class BasicBlock(nn.Module):
    """x + conv_bn(conv_bn(x)): the residual block of ResNet-9."""

    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(conv_bn(channels, channels), conv_bn(channels, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


def final_head(c_in: int, num_classes: int) -> nn.Sequential:
    return nn.Sequential(nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(c_in, num_classes))


@register_model("b-resnet11")
class BResNet(MultiExitNetwork):
    """Stem width then three group widths, and the side heads' widths; four exits (see the module docstring).

    The default is narrow where the image is large and wide where it is small: (32, 64) at 32x32 and
    16x16 as in a half-width ResNet-9, (192, 384) at 8x8 and 4x4, where this CPU's bf16 convolutions
    do up to twice the MACs per second. 5.2 M parameters, 194 M MACs for the full network, 43 M to the
    first exit. `b-resnet11-wide` widens the two last groups to (256, 512): more capacity for the hard
    samples, the first exit unchanged; 8.6 M parameters, 303 M MACs. `b-resnet11-large` has ResNet-9's
    widths (64, 128, 256, 512) throughout: the first exit at 3.7x the MACs; 9.1 M parameters, 455 M MACs.
    """

    def __init__(self, widths: tuple[int, int, int, int] = (32, 64, 192, 384),
                 head_widths: tuple[int, int, int] = (128, 256, 256), num_classes: int = 10):
        w0, w1, w2, w3 = widths
        h0, h1, h2 = head_widths
        stages = [
            nn.Sequential(Normalize(CIFAR10_MEAN, CIFAR10_STD), conv_bn(3, w0), conv_bn(w0, w1, pool=True),
                          BasicBlock(w1)),
            conv_bn(w1, w2, pool=True),
            BasicBlock(w2),
            nn.Sequential(conv_bn(w2, w3, pool=True), BasicBlock(w3)),
        ]
        heads = [conv_head(w1, h0, num_classes), conv_head(w2, h1, num_classes), conv_head(w2, h2, num_classes),
                 final_head(w3, num_classes)]
        super().__init__(stages, heads, num_classes, input_shape=(3, 32, 32))


@register_model("b-resnet11-wide")
def b_resnet11_wide() -> BResNet:
    return BResNet(widths=(32, 64, 256, 512))


@register_model("b-resnet11-large")
def b_resnet11_large() -> BResNet:
    return BResNet(widths=(64, 128, 256, 512))
