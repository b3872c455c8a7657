"""Exit policies: how confident an exit is. A sample leaves at exit k when score <= threshold[k].

Every policy maps logits to an uncertainty score where lower means more confident, so one rule
("leave at the first side exit whose score is at or below its threshold") serves them all, and all
the threshold machinery (`exitwise.exit_rule`, `exitwise.study.calibration`) is shared.

| policy   | score                                    | threshold t means                               |
| -------- | ---------------------------------------- | ----------------------------------------------- |
| entropy  | entropy of the softmax, in nats          | leave when entropy <= t                         |
| max-prob | 1 - max softmax probability              | leave when max prob >= 1 - t (0.1: p >= 0.9)    |
| margin   | 1 - (p1 - p2), the top two probabilities | leave when p1 - p2 >= 1 - t (0.2: gap >= 0.8)   |
| patience | -(earlier exits in a row agreeing)        | -p: leave once p + 1 exits in a row agree (PABEE patience p) |

One interface serves analysis and the runtime: `scores(logits)` scores a whole (K, N, C) stack of
every exit's logits, and is defined by `init_state(n)` then `step(k, logits_k, state)` exit by exit,
which is exactly what the runtime calls, so the two cannot disagree. (A policy scoring each row alone
runs its `step` over all exits in one call: the same tensor ops, bit for bit, but not K small ones,
which are slow when torch's threads share a busy CPU.) The state is a tensor with one row per sample,
so the runtime keeps it in step with compaction by indexing it like the batch.

A new policy is one `register_policy` call. Its `numpy` twin (an `exit_rule.NumpyScore`) is what the ONNX runner
runs without torch; a policy without one works everywhere but there, and `exitwise export` refuses it up front.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch

from .errors import UserError
from .exit_rule import ENTROPY, MARGIN, MAX_PROB, PATIENCE, NumpyScore, register_score


def check_finite_logits(logits: np.ndarray | torch.Tensor) -> None:
    x = torch.as_tensor(logits)
    x = x.float() if x.dtype == torch.bfloat16 else x  # numpy has no bfloat16; widening keeps finiteness
    if not np.isfinite(x.numpy(force=True)).all():  # numpy: one core, where torch's threads wait for a busy CPU
        raise UserError("logits hold NaN or infinite values (a broken model or weights file?)")


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Shannon entropy of the softmax, in nats: 0 for a one-hot prediction, ln(C) for a uniform one."""
    log_p = torch.log_softmax(logits.float(), dim=-1)
    return (-(log_p.exp() * log_p).sum(-1)).clamp_min(0.0)


def _one_minus_top(p: torch.Tensor) -> torch.Tensor:
    """1 - the largest probability, summed from the others so a confident score keeps its digits."""
    return p.scatter(-1, p.argmax(-1, keepdim=True), 0.0).sum(-1)


def one_minus_max_prob(logits: torch.Tensor) -> torch.Tensor:
    """1 - max softmax probability."""
    return _one_minus_top(torch.softmax(logits.float(), dim=-1))


def one_minus_margin(logits: torch.Tensor) -> torch.Tensor:
    """1 - (p1 - p2) for the two largest softmax probabilities: (1 - p1) + p2."""
    p = torch.softmax(logits.float(), dim=-1)
    return _one_minus_top(p) + p.topk(2, dim=-1).values[..., 1]


@dataclass(frozen=True)
class ExitPolicy:
    """A per-exit score of the logits alone; optionally with one softmax temperature per exit."""
    name: str
    score: Callable[[torch.Tensor], torch.Tensor] | None  # (N, C) logits -> (N,) scores
    max_score: Callable[[int], float]  # the largest score possible with C classes, in exact arithmetic (a uniform
    # softmax's float32 score can come out a few ulps above it, and such a sample stays at this threshold)
    unit: str
    meaning: str  # what a threshold t means, for the user
    temperatures: tuple[float, ...] | None = None  # exit k's logits are divided by temperatures[k]
    numpy: NumpyScore | None = None  # the same score in numpy, for the ONNX runner; None: not exportable

    def __post_init__(self) -> None:
        if self.numpy is not None and self.numpy.name != self.name:
            raise ValueError(f"policy {self.name!r} has the numpy score of {self.numpy.name!r}")

    def with_temperatures(self, temperatures: Sequence[float]) -> ExitPolicy:
        """The same policy on temperature-scaled logits (see `calibration.fit_temperatures`)."""
        try:
            t = np.asarray(temperatures, dtype=np.float64)
        except (TypeError, ValueError):
            raise UserError(f"temperatures must be positive numbers, got {list(temperatures)}") from None
        if not (np.isfinite(t).all() and (t > 0).all()):
            raise UserError(f"temperatures must be positive numbers, got {t.tolist()}")
        return dataclasses.replace(self, temperatures=tuple(t.tolist()))

    def init_state(self, n: int) -> torch.Tensor:
        """Per-sample memory carried from exit to exit (one row per sample; none for this policy)."""
        return torch.empty(n, 0)

    def step(self, k: int, logits: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores at exit k of the samples still running, from their (N, C) logits; and the new state."""
        logits = logits.float()
        if self.temperatures is not None:
            logits = logits / self.temperatures[k]
        return self.score(logits), state

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        """(K, N) scores of every exit from the (K, N, C) logits of every exit; refuses NaN or inf."""
        if logits.dim() != 3:
            raise ValueError(f"expected (exits, samples, classes) logits, got shape {tuple(logits.shape)}")
        check_finite_logits(logits)
        if self.temperatures is not None and len(self.temperatures) != logits.shape[0]:
            raise UserError(f"{len(self.temperatures)} temperatures for {logits.shape[0]} exits")
        return self._all_exits(logits)

    def _all_exits(self, logits: torch.Tensor) -> torch.Tensor:
        """`step` at every exit in one call: each row is scored alone, so batching exits changes no bit."""
        logits = logits.float()
        if self.temperatures is not None:  # float32 division by each float32-rounded temperature, as in `step`
            logits = logits / torch.tensor(self.temperatures, dtype=torch.float32)[:, None, None]
        return self.score(logits)


class PatiencePolicy(ExitPolicy):
    """PABEE's rule: leave once the prediction has stayed the same for `patience` more exits.

    Score at exit k = -(number of exits just before k, in a row, predicting the same class as exit k):
    0 at the first exit or after a change of mind. Threshold -p lets a sample out once p + 1
    consecutive exits agree; 0 lets everyone out at the first exit. Temperatures change nothing here.
    """

    def init_state(self, n: int) -> torch.Tensor:
        """Rows of (previous exit's prediction, its run of agreeing exits before it); -1: no exit yet."""
        return torch.stack([torch.full((n,), -1, dtype=torch.int64), torch.zeros(n, dtype=torch.int64)], 1)

    def step(self, k: int, logits: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._advance(logits.argmax(-1), state)

    @staticmethod
    def _advance(prediction: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`step` from exit k's (N,) predictions."""
        run = torch.where(prediction == state[:, 0], state[:, 1] + 1, torch.zeros_like(prediction))
        return -run.float(), torch.stack([prediction, run], 1)

    def _all_exits(self, logits: torch.Tensor) -> torch.Tensor:
        """`step` exit by exit (a score depends on the exits before), with every exit's predictions in one call."""
        state = self.init_state(logits.shape[1])
        out = []
        for prediction in logits.argmax(-1):
            s, state = self._advance(prediction, state)
            out.append(s)
        return torch.stack(out)


POLICIES: dict[str, ExitPolicy] = {}


def register_policy(policy: ExitPolicy) -> ExitPolicy:
    """Make an exit policy available by its name to the study, `exitwise calibrate`, saved models and (with its
    `numpy` twin) the ONNX runner: the one registration a new policy needs."""
    if not isinstance(policy, ExitPolicy):
        raise TypeError(f"register_policy takes an ExitPolicy (name, score, max_score, unit, meaning), got "
                        f"{type(policy).__name__}")
    if policy.name in POLICIES:
        raise ValueError(f"exit policy {policy.name!r} is registered already")
    if policy.numpy is not None:
        register_score(policy.numpy)
    POLICIES[policy.name] = policy
    return policy


register_policy(ExitPolicy("entropy", entropy, lambda c: math.log(c), "nats", "leave when the entropy is <= t nats",
                           numpy=ENTROPY))
register_policy(ExitPolicy("max-prob", one_minus_max_prob, lambda c: 1.0 - 1.0 / c, "1 - max probability",
                           "leave when the top class probability is >= 1 - t", numpy=MAX_PROB))
register_policy(ExitPolicy("margin", one_minus_margin, lambda c: 1.0, "1 - top-two margin",
                           "leave when the top two probabilities differ by >= 1 - t", numpy=MARGIN))
register_policy(PatiencePolicy("patience", None, lambda c: 0.0, "-(agreeing exits before)",
                               "t = -p: leave once p + 1 consecutive exits predict the same class", numpy=PATIENCE))


def get_policy(name: str) -> ExitPolicy:
    if name not in POLICIES:
        raise UserError(f"unknown exit policy {name!r}; known: {', '.join(POLICIES)}")
    return POLICIES[name]


@dataclass(frozen=True)
class ExitArrays:
    """One split's scores under one policy and each exit's correctness, (K, N) each, with the logits they came from."""
    scores: np.ndarray
    correct: np.ndarray
    logits: np.ndarray | None = field(default=None, repr=False)


def exit_arrays(logits: np.ndarray, labels: np.ndarray, policy: str | ExitPolicy) -> ExitArrays:
    """Scores (float64) and correctness of (K, N, C) logits under `policy`."""
    policy = get_policy(policy) if isinstance(policy, str) else policy
    scores = policy.scores(torch.from_numpy(logits)).numpy().astype(np.float64)
    return ExitArrays(scores, logits.argmax(-1) == np.asarray(labels)[None, :], logits)
