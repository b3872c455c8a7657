"""The exit rule and the exit scores it compares, torch-free: shared by the torch runtime, the study and ONNX.

A sample `leaves` at a side exit when its score is at or below that exit's threshold; `thresholds` has one
entry per side exit, where -inf means "never leave here"; the final exit takes the rest.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from .errors import UserError


def as_thresholds(values: Sequence[float | None], num_exits: int) -> np.ndarray:
    """One threshold per side exit as a float array (None -> -inf), checked for length and NaN."""
    if len(values) != num_exits - 1:
        raise UserError(f"expected {num_exits - 1} thresholds (one per side exit), got {len(values)}")
    out = np.array([-np.inf if v is None else v for v in values], dtype=np.float64)
    if np.isnan(out).any():
        raise UserError("thresholds must be numbers, not NaN")
    return out


def thresholds_to_json(thresholds: np.ndarray) -> list[float | None]:
    """-inf (never leave) becomes None so the JSON stays standard."""
    return [None if np.isneginf(t) else float(t) for t in thresholds]


def leaves(scores, thresholds):
    """The exit rule, the one place it is written: a sample leaves where its score is at or below the threshold.
    numpy arrays or torch tensors alike (analysis, calibration and the runtime all call this); a NaN score
    never leaves."""
    return scores <= thresholds


# Exit scores: numpy versions of exitwise.policies (lower = more confident), float32 throughout.

def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def entropy(logits: np.ndarray) -> np.ndarray:
    """Entropy of the softmax in nats, from the log-softmax (as `policies.entropy`)."""
    log_p = _log_softmax(logits)
    return np.maximum(-(np.exp(log_p) * log_p).sum(-1), np.float32(0))


def _one_minus_top(p: np.ndarray) -> np.ndarray:
    """1 - the largest probability, summed from the others so a confident score keeps its digits."""
    others = p.copy()
    others[np.arange(len(p)), p.argmax(-1)] = 0
    return others.sum(-1)


def one_minus_max_prob(logits: np.ndarray) -> np.ndarray:
    return _one_minus_top(softmax(logits))


def one_minus_margin(logits: np.ndarray) -> np.ndarray:
    p = softmax(logits)
    return _one_minus_top(p) + np.partition(p, -2, axis=-1)[:, -2]


SCORES: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "entropy": entropy, "max-prob": one_minus_max_prob, "margin": one_minus_margin}
