"""The founding system's BranchyNet for CIFAR-10 (5 side exits + the final classifier).

Layer for layer as in `shared/seed/ARCHITECTURE.md`: note conv -> ReLU -> batch norm inside each
stage, and no input normalization (images in [0, 1]). The founding checkpoint names its layers
flat (`conv1`, `bn1`, `branch1.conv`, ...); `convert_state_dict` maps those onto the stage/head
layout, so both that file and exitwise's own checkpoints load.
"""
from __future__ import annotations

import re
from collections import OrderedDict

import torch
from torch import nn

from .base import MultiExitNetwork
from .registry import register_model

# stage index of each trunk layer in the founding checkpoint
_SEED_STAGE_OF = {"conv1": 0, "bn1": 0, "conv2": 1, "bn2": 1, "conv3": 2, "bn3": 2, "conv4": 3,
                  "bn4": 3, "conv5": 4, "bn5": 4, "conv6": 5, "bn6": 5, "fc1": 5, "fc2": 5,
                  "fc3": 5, "fc4": 5, "bn7": 5, "fc5": 5}


def _conv_block(name: int, c_in: int, c_out: int, pool: bool, dropout: float) -> list[tuple[str, nn.Module]]:
    layers = [(f"conv{name}", nn.Conv2d(c_in, c_out, 3, padding=1)), (f"relu{name}", nn.ReLU()),
              (f"bn{name}", nn.BatchNorm2d(c_out))]
    if pool:
        layers += [(f"pool{name}", nn.MaxPool2d(2)), (f"drop{name}", nn.Dropout(dropout))]
    return layers


def _branch(c_in: int, spatial: int, num_classes: int) -> nn.Sequential:
    out = (spatial - 3) // 2 + 1
    return nn.Sequential(OrderedDict(conv=nn.Conv2d(c_in, 16, 3, stride=2), relu=nn.ReLU(),
                                     bn=nn.BatchNorm2d(16), flatten=nn.Flatten(),
                                     fc=nn.Linear(16 * out * out, num_classes)))


@register_model("seed-branchynet")
class SeedBranchyNet(MultiExitNetwork):
    def __init__(self, num_classes: int = 10):
        stages = [
            nn.Sequential(OrderedDict(_conv_block(1, 3, 32, False, 0))),
            nn.Sequential(OrderedDict(_conv_block(2, 32, 32, True, 0.2))),
            nn.Sequential(OrderedDict(_conv_block(3, 32, 64, False, 0))),
            nn.Sequential(OrderedDict(_conv_block(4, 64, 64, True, 0.3))),
            nn.Sequential(OrderedDict(_conv_block(5, 64, 128, False, 0))),
            nn.Sequential(OrderedDict(_conv_block(6, 128, 128, True, 0.4) + [
                ("flatten", nn.Flatten()),
                ("fc1", nn.Linear(2048, 128)), ("relu_fc1", nn.ReLU()),
                ("fc2", nn.Linear(128, 128)), ("relu_fc2", nn.ReLU()),
                ("fc3", nn.Linear(128, 128)), ("relu_fc3", nn.ReLU()),
                ("fc4", nn.Linear(128, 128)), ("relu_fc4", nn.ReLU()),
                ("bn7", nn.BatchNorm1d(128)), ("drop7", nn.Dropout(0.5)),
                ("fc5", nn.Linear(128, num_classes))])),
        ]
        heads = [_branch(32, 32, num_classes), _branch(32, 16, num_classes),
                 _branch(64, 16, num_classes), _branch(64, 8, num_classes),
                 _branch(128, 8, num_classes), nn.Identity()]
        super().__init__(stages, heads, num_classes, input_shape=(3, 32, 32))

    def convert_state_dict(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Rename the founding checkpoint's flat names (`conv1.weight`, `branch2.fc.bias`, ...)."""
        if not any(k.startswith(("conv1.", "branch1.")) for k in state):
            return state
        converted = {}
        for key, value in state.items():
            layer, _, rest = key.partition(".")
            branch = re.fullmatch(r"branch(\d+)", layer)
            if branch and 1 <= int(branch.group(1)) <= 5:
                converted[f"heads.{int(branch.group(1)) - 1}.{rest}"] = value
            elif layer in _SEED_STAGE_OF:
                converted[f"stages.{_SEED_STAGE_OF[layer]}.{key}"] = value
            else:
                converted[key] = value  # unknown: reported as unexpected by the loader
        return converted
