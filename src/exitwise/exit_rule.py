"""The exit rule and the exit scores it compares, torch-free: shared by the torch runtime, the study and ONNX.

A sample `leaves` at a side exit when its score is at or below that exit's threshold; `thresholds` has one
entry per side exit, where -inf means "never leave here"; the final exit takes the rest.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from .errors import UserError


def as_thresholds(values: Sequence[float | None], num_exits: int) -> np.ndarray:
    """One threshold per side exit as a float array (None -> -inf), checked for length and NaN."""
    if len(values) != num_exits - 1:
        raise UserError(f"expected {num_exits - 1} thresholds (one per side exit), got {len(values)}")
    if not all(v is None or isinstance(v, numbers.Real) and not isinstance(v, bool) for v in values):
        raise UserError(f"thresholds must be numbers (or null: never leave there), got {str(list(values))[:80]}")
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


# Exit scores: numpy twins of exitwise.policies (lower = more confident), float32 throughout.

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


@dataclass(frozen=True)
class NumpyScore:
    """An exit policy's score in numpy (float32), exit by exit as `policies.ExitPolicy.step`: what ONNX Runtime runs.
    Each row is scored alone from its (temperature-scaled) logits; `PatienceScore` carries state between exits."""
    name: str
    score: Callable[[np.ndarray], np.ndarray] | None = None  # (N, C) float32 logits -> (N,) float32 scores
    scaled = True  # the logits come divided by the exit's temperature (where the policy has temperatures)

    def init_state(self, n: int) -> np.ndarray:
        """Per-sample memory carried from exit to exit (one row per sample; none here)."""
        return np.empty((n, 0), dtype=np.int64)

    def step(self, logits: np.ndarray, state: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.score(logits), state


class PatienceScore(NumpyScore):
    """PABEE's patience: -(exits just before, in a row, predicting the same class); as `policies.PatiencePolicy`."""
    scaled = False

    def init_state(self, n: int) -> np.ndarray:
        """Rows of (previous exit's prediction, its run of agreeing exits before it); -1: no exit yet."""
        return np.stack([np.full(n, -1, dtype=np.int64), np.zeros(n, dtype=np.int64)], 1)

    def step(self, logits: np.ndarray, state: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        prediction = logits.argmax(-1)
        run = np.where(prediction == state[:, 0], state[:, 1] + 1, 0)
        return (-run).astype(np.float32), np.stack([prediction, run], 1)


SCORES: dict[str, NumpyScore] = {}  # the policies torch-free code can run, by name; `policies.register_policy` adds


def register_score(score: NumpyScore) -> NumpyScore:
    """Make a numpy score runnable by its policy's name (`policies.register_policy` calls this for its policy's)."""
    if SCORES.get(score.name, score) is not score:
        raise ValueError(f"a numpy score for exit policy {score.name!r} is registered already")
    SCORES[score.name] = score
    return score


ENTROPY = register_score(NumpyScore("entropy", entropy))
MAX_PROB = register_score(NumpyScore("max-prob", one_minus_max_prob))
MARGIN = register_score(NumpyScore("margin", one_minus_margin))
PATIENCE = register_score(PatienceScore("patience"))
