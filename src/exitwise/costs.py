"""Compute cost of each exit in multiply-accumulates (MACs), counted by PyTorch's FlopCounterMode.

Counts the convolutions and matrix products (the operators that dominate); normalization,
activations and pooling are not counted.
"""
from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from .models.base import MultiExitNetwork


def _macs(fn, x: torch.Tensor) -> tuple[int, torch.Tensor]:
    counter = FlopCounterMode(display=False)
    with counter:
        y = fn(x)
    return counter.get_total_flops() // 2, y


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
