"""Exit policies: how confident an exit is. A sample leaves at exit k when score <= threshold[k].

Every policy maps logits (..., C) to an uncertainty score (...) where lower means more confident,
so one rule ("leave at the first exit whose score is at or below its threshold") serves them all.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from .errors import UserError


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Shannon entropy of the softmax, in nats: 0 for a one-hot prediction, ln(C) for a uniform one."""
    log_p = torch.log_softmax(logits.float(), dim=-1)
    return (-(log_p.exp() * log_p).sum(-1)).clamp_min(0.0)


@dataclass(frozen=True)
class ExitPolicy:
    name: str
    score: Callable[[torch.Tensor], torch.Tensor]
    max_score: Callable[[int], float]  # the largest score possible with C classes
    unit: str

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        return self.score(logits)


POLICIES: dict[str, ExitPolicy] = {
    "entropy": ExitPolicy("entropy", entropy, lambda c: math.log(c), "nats"),
}


def get_policy(name: str) -> ExitPolicy:
    if name not in POLICIES:
        raise UserError(f"unknown exit policy {name!r}; known: {', '.join(POLICIES)}")
    return POLICIES[name]
