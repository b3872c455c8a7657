"""What the server runs: a multi-exit network as stages that a scheduler calls one at a time (torch-free).

A `Runner` is the network cut at its exits. The scheduler (`exitwise.deploy.scheduler`) never sees torch
or ONNX Runtime: it hands a runner's own `features` back to it, and gets numpy out.

    features = runner.to_input(uint8 (N, H, W, C) pixels)        # stage 0's input
    out = runner.step(k, features, state)                       # stage k and its exit decision
    out.features, out.state                                     # go on to stage k + 1 (rows that stay)
    out.leave                                                   # (N,) bool, None: no head ran here, nobody leaves
    out.predictions, out.probabilities                          # (N,) int64 / float32 at exit k
    runner.take(features, rows), runner.concat([f1, f2])        # compaction and re-batching
    runner.to_numpy(features), runner.from_numpy(array)         # features over the wire (tiers)
    runner.stage(k, features)                                   # stage k alone (a later tier given images)
    runner.answer(k, array)                                     # exit k's class and probability on numpy features
                                                                # after stage k, no exit decision (a degraded answer)

`state` is the exit policy's per-sample memory, a numpy array with one row per sample (patience keeps
two int64 columns; the other policies none): the scheduler indexes it like the features.
Implementations: `OnnxRunner` (`exitwise.deploy.onnx_runner`, ONNX Runtime) and `TorchRunner`
(`exitwise.serve_torch`, the offline runtime's prepared network).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, Sequence

import numpy as np

from ..errors import UserError


@dataclass(frozen=True)
class StepOut:
    """One stage and its exit for N rows."""
    features: Any                   # the runner's features after stage k, all N rows
    leave: np.ndarray | None        # (N,) bool: rows that leave at exit k; None: this exit's head was skipped
    predictions: np.ndarray | None  # (N,) int64 class at exit k (None when the head was skipped)
    probabilities: np.ndarray | None  # (N,) float32 softmax probability of that class (temperature-scaled)
    state: np.ndarray               # (N, S) the policy's state after exit k


class Runner(Protocol):
    num_exits: int
    input_shape: tuple[int, int, int]      # (C, H, W) of the images it takes
    class_names: tuple[str, ...] | None
    name: str                              # the model's name in the protocol
    platform: str                          # "onnxruntime" or "pytorch", for the metadata
    micro_batch: int                       # rows per network call at most (larger stage calls are split)

    def to_input(self, images: np.ndarray) -> Any: ...        # uint8 (N, H, W, C) -> stage 0's features
    def init_state(self, n: int) -> np.ndarray: ...
    def step(self, k: int, features: Any, state: np.ndarray) -> StepOut: ...
    def take(self, features: Any, rows: np.ndarray) -> Any: ...  # rows: bool mask or int index
    def concat(self, parts: Sequence[Any]) -> Any: ...
    def to_numpy(self, features: Any) -> np.ndarray: ...
    def from_numpy(self, array: np.ndarray) -> Any: ...
    def stage(self, k: int, features: Any) -> Any: ...
    def answer(self, k: int, array: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...


def check_images(images, input_shape: Sequence[int], floats: bool = False) -> None:
    """Refuse, once per call and in one line, images a runner cannot take: anything but a numpy array of uint8
    (N, H, W, C) pixels of the model's `input_shape` (C, H, W); with `floats` (`OnnxEarlyExit.run`), also float32
    (N, C, H, W) in [0, 1]. Another dtype, layout or size would otherwise fail deep in a runtime, or (floats 0-255,
    or floats taken as pixels) give wrong answers silently."""
    c, h, w = input_shape
    if isinstance(images, np.ndarray) and images.ndim == 4:
        if images.dtype == np.uint8 and images.shape[1:] == (h, w, c):
            return
        if floats and images.dtype == np.float32 and images.shape[1:] == (c, h, w):
            if images.size and not (images.min() >= 0 and images.max() <= 1):  # `not`: NaN refused too
                raise UserError(f"float32 images must be in [0, 1], got {images.min():g}..{images.max():g} "
                                "(uint8 pixels 0-255 go in as they are, (N, H, W, C))")
            return
    want = f"uint8 (N, {h}, {w}, {c}) pixels" + (f" or float32 (N, {c}, {h}, {w}) in [0, 1]" if floats else "")
    shape = getattr(images, "shape", None)
    got = (f"{images.dtype} {images.shape}" if isinstance(images, np.ndarray) else
           f"a {type(images).__name__}" + (f" {tuple(shape)}" if shape is not None else ""))
    raise UserError(f"images must be a numpy array of {want}, got {got}")


def model_name(name: str) -> str:
    """The name a model goes by in the protocol: a registered name as it is, an attached model's folder by its name."""
    return name.rstrip("/").rsplit("/", 1)[-1] if "/" in name else name


def describe(runner: Runner) -> str:
    """The serving line's name for a runner: model, platform, and the precision (torch runners measure theirs,
    `exitwise.tune`) and micro-batch its stages run in."""
    precision = getattr(runner, "precision", None)
    return f"{runner.name} ({runner.platform}{f', {precision}' if precision else ''}, micro-batch {runner.micro_batch})"
