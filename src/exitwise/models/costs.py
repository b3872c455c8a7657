"""Compute cost of each exit in multiply-accumulates (MACs) per sample.

Counts the convolution and linear layers (the operators that dominate a CNN), from each layer's
output shape in one forward pass of a single zero image; normalization, activations, pooling and
functional matrix products (an attention's q·k, say) are not counted. A module with none of these layers (a
stage of a model captured by torch.export is a graph of functional ops) is counted by PyTorch's FlopCounterMode,
which counts its matrix products too. Forward hooks rather than
`torch.utils.flop_counter.FlopCounterMode`: the same numbers for these layers, without the ~1 s that
the counter's first use costs (a tenth of a whole study).
"""
from __future__ import annotations

import itertools
import math
from typing import Sequence

import torch
from torch import nn

from .base import MultiExitNetwork, device_of
from .card import HeadReport


COUNTED = (nn.modules.conv._ConvNd, nn.Linear, nn.TransformerEncoderLayer)


def _layer_macs(layer: nn.Module, output: torch.Tensor) -> int:
    """MACs for the first sample of a batch through a conv, linear or transformer encoder layer."""
    if isinstance(layer, nn.modules.conv._ConvNd):
        return output[0].numel() * (layer.in_channels // layer.groups) * math.prod(layer.kernel_size)
    if isinstance(layer, nn.TransformerEncoderLayer):  # its fast path calls no submodule: count it whole
        tokens, dim = output.shape[1] if layer.self_attn.batch_first else output.shape[0], output.shape[-1]
        return 4 * tokens * dim * dim + 2 * tokens * tokens * dim + 2 * tokens * dim * layer.linear1.out_features
    return output[0].numel() * layer.in_features


def _counted_layers(module: nn.Module) -> list[nn.Module]:
    """The layers whose MACs are counted: convs, linears and whole encoder layers (not the layers inside those)."""
    inside = {id(m) for layer in module.modules() if isinstance(layer, nn.TransformerEncoderLayer)
              for m in layer.modules() if m is not layer}
    return [m for m in module.modules() if isinstance(m, COUNTED) and id(m) not in inside]


def _macs(module: nn.Module, x: torch.Tensor) -> tuple[int, torch.Tensor]:
    total = 0

    def count(layer: nn.Module, _inputs, output: torch.Tensor) -> None:
        nonlocal total
        total += _layer_macs(layer, output)

    layers = _counted_layers(module)
    if not layers:  # a graph of functional ops (a stage from torch.export): PyTorch's counter sees them
        from torch.utils.flop_counter import FlopCounterMode
        with FlopCounterMode(display=False) as counter:
            y = module(x)
        return counter.get_total_flops() // 2 // len(x), y
    hooks = [layer.register_forward_hook(count) for layer in layers]
    try:
        y = module(x)
    finally:
        for hook in hooks:
            hook.remove()
    return total, y


@torch.inference_mode()
def module_macs(module: nn.Module, input_shape: tuple[int, ...]) -> int:
    """MACs of one sample through `module` (eval mode for the count), input of shape (1, ...)."""
    was_training = module.training
    macs, _ = _macs(module.eval(), torch.zeros(input_shape))
    module.train(was_training)
    return macs


@torch.inference_mode()
def stage_and_head_macs(model: MultiExitNetwork) -> tuple[list[int], list[int]]:
    """MACs for one sample of each stage and of each head."""
    was_training = model.training
    model.eval()
    x = torch.zeros(1, *model.input_shape, device=device_of(model))
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
    return exit_macs_of(*stage_and_head_macs(model))


def exit_macs_of(stages: Sequence[int], heads: Sequence[int]) -> list[int]:
    """`exit_macs` from each stage's and each head's MACs."""
    return list(itertools.accumulate(s + h for s, h in zip(stages, heads)))


def backbone_macs(model: MultiExitNetwork) -> int:
    """MACs of the network without its side exits (every stage and the final head only)."""
    stages, heads = stage_and_head_macs(model)
    return sum(stages) + heads[-1]


def head_report(model: MultiExitNetwork, names: list[str] | None = None,
                max_fraction: float | None = None) -> list[HeadReport]:
    """Each side head's MACs and its share of the stage it follows (and its kind, for an attached model's default
    heads); warns of heads over `max_fraction` of it."""
    import warnings
    stages, heads = stage_and_head_macs(model)
    kinds = model.head_kinds or [None] * len(heads)
    report = []
    for k, (s, h) in enumerate(zip(stages[:-1], heads[:-1])):
        name = names[k] if names else f"exit {k + 1}"
        share = h / s if s else math.inf
        report.append(HeadReport(name, h, s, share, kinds[k] or None))
        if max_fraction is not None and share > max_fraction:
            warnings.warn(f"the head after {name!r} costs {h:,} MACs, {share:.0%} of its stage's {s:,} "
                          f"(more than {max_fraction:.0%})", stacklevel=3)
    return report
