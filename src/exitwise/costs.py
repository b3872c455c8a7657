"""Compute cost of each exit in multiply-accumulates (MACs) per sample.

Counts the convolution and linear layers (the operators that dominate a CNN), from each layer's
output shape in one forward pass of a single zero image; normalization, activations, pooling and
functional matrix products (an attention's q·k, say) are not counted. Forward hooks rather than
`torch.utils.flop_counter.FlopCounterMode`: the same numbers for these layers, without the ~1 s that
the counter's first use costs (a tenth of a whole study).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .models.base import MultiExitNetwork


def _layer_macs(layer: nn.Module, output: torch.Tensor) -> int:
    """MACs for the first sample of a batch through a conv or linear layer."""
    if isinstance(layer, nn.modules.conv._ConvNd):
        return output[0].numel() * (layer.in_channels // layer.groups) * math.prod(layer.kernel_size)
    return output[0].numel() * layer.in_features


def _macs(module: nn.Module, x: torch.Tensor) -> tuple[int, torch.Tensor]:
    total = 0

    def count(layer: nn.Module, _inputs, output: torch.Tensor) -> None:
        nonlocal total
        total += _layer_macs(layer, output)

    layers = [m for m in module.modules() if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))]
    hooks = [layer.register_forward_hook(count) for layer in layers]
    try:
        y = module(x)
    finally:
        for hook in hooks:
            hook.remove()
    return total, y


@torch.inference_mode()
def stage_and_head_macs(model: MultiExitNetwork) -> tuple[list[int], list[int]]:
    """MACs for one sample of each stage and of each head."""
    was_training = model.training
    model.eval()
    x = torch.zeros(1, *model.input_shape)
    stages, heads = [], []
    for stage, head in zip(model.stages, model.heads):
        m, x = _macs(stage, x)
        h, _ = _macs(head, x)
        stages.append(m)
        heads.append(h)
    model.train(was_training)
    return stages, heads


def exit_macs(model: MultiExitNetwork) -> list[int]:
    """MACs a sample pays when it leaves at exit k: stages 0..k and heads 0..k."""
    stages, heads = stage_and_head_macs(model)
    total, out = 0, []
    for s, h in zip(stages, heads):
        total += s + h
        out.append(total)
    return out


def backbone_macs(model: MultiExitNetwork) -> int:
    """MACs of the network without its side exits (every stage and the final head only)."""
    stages, heads = stage_and_head_macs(model)
    return sum(stages) + heads[-1]
