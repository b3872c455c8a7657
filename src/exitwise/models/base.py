"""The multi-exit network interface that every exitwise model implements.

A multi-exit network is an ordered list of stages plus one exit head per stage; the last head is
the final classifier. Two ways to run it:

* `forward(x)` computes every exit's logits in one pass (training and analysis);
* `stages[k]` then `heads[k]`, stage by stage, lets a runtime stop a sample early
  (see `exitwise.runtime`).
"""
from __future__ import annotations

import torch
from torch import nn


class MultiExitNetwork(nn.Module):
    """Stages and heads; exit k reads the output of stage k."""
    name: str | None = None  # the registered name, set by `models.create_model`
    exit_names: list[str] | None = None  # an attached model's: the modules its side exits follow (`attach`)
    head_kinds: list[str | None] | None = None  # an attached model's: the head kind `auto` chose per side exit

    def __init__(self, stages: list[nn.Module], heads: list[nn.Module], num_classes: int,
                 input_shape: tuple[int, int, int]):
        super().__init__()
        if len(stages) != len(heads) or not stages:
            raise ValueError("a multi-exit network needs one head per stage, and at least one stage")
        self.stages = nn.ModuleList(stages)
        self.heads = nn.ModuleList(heads)
        self.num_classes = num_classes
        self.input_shape = input_shape  # (C, H, W) of one input image

    @property
    def num_exits(self) -> int:
        return len(self.stages)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Logits of every exit, in order: a list of `num_exits` tensors of shape (N, num_classes)."""
        logits = []
        for stage, head in zip(self.stages, self.heads):
            x = stage(x)
            logits.append(head(x))
        return logits

    def convert_state_dict(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Map a foreign checkpoint's names onto this module's; the identity unless a model overrides it."""
        return state


def device_of(model: nn.Module) -> torch.device:
    """Where a model's parameters are."""
    return next(model.parameters()).device
