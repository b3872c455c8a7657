"""Early exit on ONNX Runtime, without torch: runs an `exitwise export` folder as `runtime.run_early_exit` runs the model.

An export is one ONNX graph per stage and per head and a `manifest.json` (`deploy.manifest`). Here
each graph is an ONNX Runtime session; a batch enters in micro-batches, the samples that stay after
an exit are compacted and wait at the next stage until a micro-batch has gathered (or the batch is
done), exactly the schedule of the torch runtime, and the exit scores are the numpy twins of
`exitwise.policies`, in float32 as there. Needs `pip install 'exitwise[onnx]'`; never imports torch.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ..config import DEFAULT_MICRO_BATCH
from ..errors import UserError
from ..exit_rule import SCORES, as_thresholds, leaves, softmax
from ..progress import progress_bar
from .manifest import Graph, Manifest, read_manifest
from .runner import check_images


@dataclass(frozen=True)
class Policy:
    """An exit policy by name (one of `exit_rule.SCORES`), with optional per-exit temperatures."""
    name: str
    temperatures: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if self.name not in SCORES:
            raise UserError(f"unknown exit policy {self.name!r} in the export")

    def init_state(self, n: int) -> np.ndarray:
        return SCORES[self.name].init_state(n)

    def scale(self, k: int, logits: np.ndarray) -> np.ndarray:
        """Exit k's float32 logits divided by its temperature (if any)."""
        logits = logits.astype(np.float32, copy=False)
        return logits if self.temperatures is None else logits / np.float32(self.temperatures[k])

    def step(self, k: int, logits: np.ndarray, state: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(N,) float32 scores at exit k and the new state, as `ExitPolicy.step`."""
        score = SCORES[self.name]
        return score.step(self.scale(k, logits) if score.scaled else logits, state)


@dataclass(frozen=True)
class Prediction:
    """Per image: the exit it left at, the class predicted there and that class's softmax probability."""
    exits: np.ndarray          # (N,) int64
    predictions: np.ndarray    # (N,) int64, argmax of the exit's logits
    probabilities: np.ndarray  # (N,) float32, softmax (temperature-scaled, if the policy has temperatures)
    seconds: float             # wall time of the whole loop


def as_input(batch: np.ndarray) -> np.ndarray:
    """What the graphs take: float32 NCHW in [0, 1]. uint8 (N, H, W, C) pixels are divided by 255 (as
    `ImageSet.batches` does); float32 (N, C, H, W) is passed as it is."""
    if batch.dtype == np.uint8 and batch.ndim == 4:
        return np.ascontiguousarray(batch.transpose(0, 3, 1, 2)).astype(np.float32) / np.float32(255)
    if batch.dtype == np.float32 and batch.ndim == 4:
        return batch
    raise UserError(f"images must be uint8 (N, H, W, C) or float32 (N, C, H, W), got {batch.dtype} {batch.shape}")


class OnnxEarlyExit:
    """A loaded export: one ONNX Runtime session per stage and head, the policy and the thresholds."""

    def __init__(self, folder: Path, manifest: Manifest, stages: list, heads: list):
        self.folder, self.manifest, self.stages, self.heads = folder, manifest, stages, heads
        self.policy = Policy(manifest.policy, manifest.temperatures or None)
        self.thresholds = np.array(manifest.thresholds, dtype=np.float64)
        self.input_shape = tuple(manifest.input.shape[1:])
        self.class_names = manifest.class_names

    @property
    def num_exits(self) -> int:
        return len(self.stages)

    @classmethod
    def load(cls, folder: str | Path, threads: int | None = None, spin: bool = True) -> OnnxEarlyExit:
        """Open an export, checking the manifest's own digest and every graph's SHA-256 first. `spin=False`: ONNX
        Runtime's threads sleep between calls instead of spinning, which a server wants (its event loop and HTTP
        work share the cores; spinning threads take their CPU, and a CPU quota's)."""
        folder = Path(folder)
        manifest = read_manifest(folder)
        try:
            import onnxruntime as ort
        except ImportError:
            raise UserError("running an ONNX export needs onnxruntime: pip install 'exitwise[onnx]'") from None
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        if not spin:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")

        def session(graph: Graph):
            return ort.InferenceSession(str(folder / graph.file), options, providers=["CPUExecutionProvider"])

        return cls(folder, manifest, [session(g) for g in manifest.stages], [session(g) for g in manifest.heads])

    def run_stage(self, k: int, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Stage k then its head: (features, float32 logits), as `runtime.run_stage`."""
        x = self.stages[k].run(None, {"x": x})[0]
        return x, self.heads[k].run(None, {"x": x})[0]

    def class_and_probability(self, k: int, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Exit k's class for each row of its logits, and that class's softmax probability at the policy's
        temperature (float32)."""
        predictions = logits.argmax(-1)
        p = softmax(self.policy.scale(k, logits))
        return predictions, p[np.arange(len(p)), predictions].astype(np.float32)

    @property
    def micro_batch(self) -> int:
        """The micro-batch the export recorded (measured where it was made), else the default."""
        return self.manifest.micro_batch or DEFAULT_MICRO_BATCH

    def _checked_micro_batch(self, images: np.ndarray, batch_size: int, micro_batch: int | None) -> int:
        """The micro-batch to run `images` in, after refusing images it cannot take (`runner.check_images`) and
        batch sizes below 1: once per call, not per batch."""
        check_images(images, self.input_shape, floats=True)
        micro_batch = self.micro_batch if micro_batch is None else micro_batch
        if batch_size < 1 or micro_batch < 1:
            raise UserError(f"batch size and micro-batch must be at least 1, got {batch_size} and {micro_batch}")
        return micro_batch

    def run(self, images: np.ndarray, *, thresholds: Sequence[float] | None = None, batch_size: int = 256,
            micro_batch: int | None = None, progress: bool = False) -> Prediction:
        """Real early exit over `images` (uint8 (N, H, W, C) or float32 (N, C, H, W) in [0, 1], of the export's size:
        `runner.check_images`), with the export's thresholds unless given (None: never leave at that exit).

        The schedule of `runtime.run_early_exit`: each batch of `batch_size` enters in `micro_batch`-row
        pieces; the samples that stay wait at the next stage until `micro_batch` rows have gathered, and
        every sample of a batch has left before the next batch starts (`micro_batch` default: the manifest's).
        A sample leaves at the first side exit whose score is <= its threshold (float32, as in torch); -inf never
        lets one leave."""
        micro_batch = self._checked_micro_batch(images, batch_size, micro_batch)
        num_exits, n = self.num_exits, len(images)
        thr = (self.thresholds if thresholds is None else as_thresholds(list(thresholds), num_exits)).astype(np.float32)
        exits = np.empty(n, dtype=np.int64)
        predictions = np.empty(n, dtype=np.int64)
        probabilities = np.empty(n, dtype=np.float32)
        waiting: list[list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = [[] for _ in range(num_exits)]

        def advance(k: int, x: np.ndarray, index: np.ndarray, state: np.ndarray) -> None:
            x, logits = self.run_stage(k, x)
            if k < num_exits - 1:
                scores, state = self.policy.step(k, logits, state)
                leave = leaves(scores, thr[k])
            else:
                leave = np.ones(len(index), dtype=bool)
            out = index[leave]
            exits[out] = k
            predictions[out], probabilities[out] = self.class_and_probability(k, logits[leave])
            if not leave.all():
                stay = ~leave
                waiting[k + 1].append((x[stay], index[stay], state[stay]))

        def run_waiting(k: int, at_least: int) -> None:
            if sum(len(w[1]) for w in waiting[k]) >= at_least:
                parts, waiting[k] = waiting[k], []
                advance(k, *(np.concatenate(p) if len(parts) > 1 else p[0] for p in zip(*parts)))

        start = time.perf_counter()
        total = (n + batch_size - 1) // batch_size
        for b in progress_bar(range(0, n, batch_size), total=total, desc="early exit", enabled=progress,
                              leave=False, unit="batch"):
            for i in range(b, min(b + batch_size, n), micro_batch):
                rows = as_input(images[i:min(i + micro_batch, b + batch_size, n)])
                advance(0, rows, np.arange(i, i + len(rows)), self.policy.init_state(len(rows)))
                for k in range(1, num_exits):
                    run_waiting(k, micro_batch)
            for k in range(1, num_exits):  # the batch is done: the rest go on as they are
                run_waiting(k, 1)
        return Prediction(exits, predictions, probabilities, time.perf_counter() - start)

    def run_backbone(self, images: np.ndarray, *, batch_size: int = 256, micro_batch: int | None = None) -> Prediction:
        """Every stage and the final head only (no side exits): the baseline, as `runtime.run_backbone`."""
        micro_batch = self._checked_micro_batch(images, batch_size, micro_batch)
        n, last = len(images), self.num_exits - 1
        predictions, probabilities = np.empty(n, dtype=np.int64), np.empty(n, dtype=np.float32)
        start = time.perf_counter()
        for b in range(0, n, batch_size):
            for i in range(b, min(b + batch_size, n), micro_batch):
                x = as_input(images[i:min(i + micro_batch, b + batch_size, n)])
                for stage in self.stages:
                    x = stage.run(None, {"x": x})[0]
                logits = self.heads[last].run(None, {"x": x})[0]
                predictions[i:i + len(x)], probabilities[i:i + len(x)] = self.class_and_probability(last, logits)
        return Prediction(np.full(n, last), predictions, probabilities, time.perf_counter() - start)

