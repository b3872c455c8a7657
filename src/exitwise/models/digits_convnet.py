"""A three-exit convnet for 8x8 grayscale digits: the network behind `make demo`."""
from __future__ import annotations

from torch import nn

from .base import MultiExitNetwork
from .registry import register_model


def _conv(c_in: int, c_out: int, pool: bool) -> nn.Sequential:
    layers = [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]
    return nn.Sequential(*layers, nn.MaxPool2d(2)) if pool else nn.Sequential(*layers)


def _head(features: int, num_classes: int) -> nn.Sequential:
    """Flatten + linear: on 8x8 digits where a stroke is matters, so no global pooling."""
    return nn.Sequential(nn.Flatten(), nn.Linear(features, num_classes))


@register_model("digits-convnet")
class DigitsConvNet(MultiExitNetwork):
    def __init__(self, num_classes: int = 10):
        stages = [_conv(1, 16, False), _conv(16, 32, True), _conv(32, 64, True)]
        heads = [_head(16 * 8 * 8, num_classes), _head(32 * 4 * 4, num_classes), _head(64 * 2 * 2, num_classes)]
        super().__init__(stages, heads, num_classes, input_shape=(1, 8, 8))
