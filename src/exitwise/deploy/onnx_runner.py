"""`OnnxRunner`: an ONNX export (`exitwise export`) as a `Runner`, on the sessions, policy and thresholds of
`OnnxEarlyExit`, so a served sample leaves where `OnnxEarlyExit.run` lets it leave. Never imports torch."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from ..config import threads_per_worker
from ..exit_rule import leaves
from .onnx_runtime import OnnxEarlyExit, as_input
from .runner import StepOut, model_name


class OnnxRunner:
    platform = "onnxruntime"

    def __init__(self, model: OnnxEarlyExit, early_exit: bool = True, micro_batch: int | None = None):
        self.model, self.early_exit = model, early_exit
        self.micro_batch = micro_batch or model.micro_batch  # default: the one measured at export (the manifest's)
        self.num_exits = model.num_exits
        self.input_shape = tuple(model.input_shape)
        self.class_names = tuple(model.class_names) if model.class_names else None
        self.name = model_name(model.manifest.model)
        self.thresholds = model.thresholds.astype(np.float32)  # compared in float32, as `OnnxEarlyExit.run` does

    @classmethod
    def load(cls, folder: str | Path, early_exit: bool = True, threads: int | None = None,
             workers: int = 1) -> OnnxRunner:
        """The export's sessions with `threads` each, or each worker's share of the CPUs this process may run on
        (ONNX Runtime's own default counts the machine's cores, also where the process is pinned to fewer)."""
        if threads is None:
            threads = threads_per_worker(len(os.sched_getaffinity(0)), workers)
        return cls(OnnxEarlyExit.load(folder, threads=threads, spin=False), early_exit)

    def to_input(self, images: np.ndarray) -> np.ndarray:
        return as_input(images)

    def init_state(self, n: int) -> np.ndarray:
        return self.model.policy.init_state(n)

    def step(self, k: int, features: np.ndarray, state: np.ndarray) -> StepOut:
        last = k == self.num_exits - 1
        head = last or self.early_exit
        parts = [self._stage(k, features[i:i + self.micro_batch], head)
                 for i in range(0, max(len(features), 1), self.micro_batch)]
        x = parts[0][0] if len(parts) == 1 else np.concatenate([p[0] for p in parts])
        if not head:
            return StepOut(x, None, None, None, state)
        logits = parts[0][1] if len(parts) == 1 else np.concatenate([p[1] for p in parts])
        if last:
            leave = np.ones(len(x), dtype=bool)
        else:
            scores, state = self.model.policy.step(k, logits, state)
            leave = leaves(scores, self.thresholds[k])
        return StepOut(x, leave, *self.model.class_and_probability(k, logits), state)

    def stage(self, k: int, features: np.ndarray) -> np.ndarray:
        return self.model.stages[k].run(None, {"x": features})[0]

    def answer(self, k: int, array: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.model.class_and_probability(k, self.model.heads[k].run(None, {"x": self.from_numpy(array)})[0])

    def _stage(self, k: int, x: np.ndarray, head: bool) -> tuple[np.ndarray, np.ndarray | None]:
        return self.model.run_stage(k, x) if head else (self.stage(k, x), None)

    def take(self, features: np.ndarray, rows: np.ndarray) -> np.ndarray:
        return features[rows]

    def concat(self, parts: Sequence[np.ndarray]) -> np.ndarray:
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def to_numpy(self, features: np.ndarray) -> np.ndarray:
        return features

    def from_numpy(self, array: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(array, dtype=np.float32)
