"""Running a multi-exit network: all exits at once (for analysis) or with real early exit.

Early exit is real: inside each batch only the samples that have not left go on to the next stage
(compaction), and the heads and exit decisions sit inside the timed region. Per-stage wall time is
recorded so a cost model can predict the time of any threshold setting (see `exitwise.study`).
"""
from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
import torch
from tqdm import tqdm

from .errors import UserError
from .models.base import MultiExitNetwork
from .policies import ExitPolicy

PRECISIONS = ("bf16", "mixed", "fp32")


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise UserError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    return precision


def precision_context(precision: str, enabled: bool = True):
    """bf16 autocast on CPU (5-10x faster on AMX/AVX-512-bf16 CPUs), or nothing for fp32."""
    low = check_precision(precision) != "fp32" and enabled
    return torch.autocast("cpu", dtype=torch.bfloat16) if low else nullcontext()


def stage_context(precision: str, k: int):
    """The precision stage k runs in (see `run_stage`)."""
    return precision_context(precision, enabled=not (precision == "mixed" and k == 0))


def run_stage(model: MultiExitNetwork, k: int, x: torch.Tensor, precision: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Stage k, then its head: (features, fp32 logits).

    "bf16": stage and head under bf16 autocast. "mixed": the first stage (raw pixels) and every exit
    head (they decide who leaves) in fp32, the other stages in bf16: on the founding network bf16
    everywhere changes up to 1% of an exit's predictions, mixed at most 0.2%. Features travel to the
    next stage in bf16, which its autocast convolution would cast to anyway: half the bytes to move
    when a batch is compacted.
    """
    with stage_context(precision, k):
        x = model.stages[k](x)
    with precision_context(precision, enabled=precision == "bf16"):
        logits = model.heads[k](x if precision == "bf16" else x.float()).float()
    return (x if precision == "fp32" else x.to(torch.bfloat16)), logits


def prepare(model: MultiExitNetwork) -> MultiExitNetwork:
    """Eval mode and channels_last memory format, the fast layout for CPU convolutions."""
    return model.eval().to(memory_format=torch.channels_last)


def keep_rows(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """x[keep] in one copy that stays channels_last (plain indexing returns NCHW, costing a second copy)."""
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return x.permute(0, 2, 3, 1)[keep].permute(0, 3, 1, 2)
    return x[keep]


@dataclass
class Run:
    exits: np.ndarray          # (N,) exit index of each sample
    predictions: np.ndarray    # (N,) predicted class
    stage_seconds: list[float]  # wall time per stage, its head and its exit decision, summed over batches
    seconds: float             # wall time of the whole loop
    logits: np.ndarray | None = None  # (K, N, C) every exit's logits, from `all_exit_logits` only


def _batches(data, batch_size: int, progress: bool, desc: str) -> Iterable[torch.Tensor]:
    total = (len(data) + batch_size - 1) // batch_size
    for images, _ in tqdm(data.batches(batch_size), total=total, desc=desc, disable=not progress,
                          leave=False, unit="batch"):
        yield images


@torch.inference_mode()
def warm_up(model: MultiExitNetwork, data, batch_size: int = 256, precision: str = "bf16", batches: int = 2) -> None:
    """Run a few batches untimed, so one-time kernel set-up does not count as a stage's cost."""
    for i, (x, _) in enumerate(data.batches(batch_size)):
        if i == batches:
            break
        for k in range(model.num_exits):
            x, _ = run_stage(model, k, x, precision)


@torch.inference_mode()
def all_exit_logits(model: MultiExitNetwork, data, batch_size: int = 256, precision: str = "bf16",
                    progress: bool = False) -> Run:
    """Every sample through every stage and head: each exit's logits, and per-stage time."""
    k_exits = model.num_exits
    stage_seconds = [0.0] * k_exits
    chunks: list[list[torch.Tensor]] = [[] for _ in range(k_exits)]
    start = time.perf_counter()
    for x in _batches(data, batch_size, progress, "all exits"):
        for k in range(k_exits):
            t0 = time.perf_counter()
            x, logits = run_stage(model, k, x, precision)
            chunks[k].append(logits)
            stage_seconds[k] += time.perf_counter() - t0
    seconds = time.perf_counter() - start
    logits = torch.stack([torch.cat(c) for c in chunks]).numpy()
    return Run(exits=np.full(len(data), k_exits - 1), predictions=logits[-1].argmax(-1),
               stage_seconds=stage_seconds, seconds=seconds, logits=logits)


@torch.inference_mode()
def run_early_exit(model: MultiExitNetwork, data, thresholds: Sequence[float], policy: ExitPolicy,
                   batch_size: int = 256, precision: str = "bf16", progress: bool = False) -> Run:
    """Real early exit: a sample leaves at the first side exit whose score is <= its threshold.

    Thresholds of -inf never let a sample leave, so `[-inf] * (K - 1)` runs the full network
    (every side head included, as in the founding system's loop).
    """
    k_exits = model.num_exits
    thr = torch.as_tensor(np.asarray(thresholds, dtype=np.float64), dtype=torch.float32)
    if thr.shape != (k_exits - 1,):
        raise UserError(f"expected {k_exits - 1} thresholds, got {tuple(thr.shape)}")
    exits = torch.empty(len(data), dtype=torch.int64)
    predictions = torch.empty(len(data), dtype=torch.int64)
    stage_seconds = [0.0] * k_exits
    offset = 0
    start = time.perf_counter()
    for x in _batches(data, batch_size, progress, "early exit"):
        index = torch.arange(offset, offset + len(x))
        offset += len(x)
        state = policy.init_state(len(x))
        for k in range(k_exits):
            t0 = time.perf_counter()
            x, logits = run_stage(model, k, x, precision)
            if k < k_exits - 1:
                scores, state = policy.step(k, logits, state)
                leave = scores <= thr[k]
                n_leave = int(leave.sum())
            if k == k_exits - 1 or n_leave == len(x):  # everyone left: no indexing (batch 1 lives here)
                exits[index] = k
                predictions[index] = logits.argmax(-1)
                stage_seconds[k] += time.perf_counter() - t0
                break
            if n_leave:
                exits[index[leave]] = k
                predictions[index[leave]] = logits[leave].argmax(-1)
                stay = ~leave
                x, index, state = keep_rows(x, stay), index[stay], state[stay]
            stage_seconds[k] += time.perf_counter() - t0
    seconds = time.perf_counter() - start
    return Run(exits=exits.numpy(), predictions=predictions.numpy(), stage_seconds=stage_seconds, seconds=seconds)


@torch.inference_mode()
def run_backbone(model: MultiExitNetwork, data, batch_size: int = 256, precision: str = "bf16",
                 progress: bool = False) -> Run:
    """The network without side exits: every stage, then the final head only. The baseline to beat."""
    last = model.num_exits - 1
    predictions, stage_seconds = [], [0.0] * model.num_exits
    start = time.perf_counter()
    for x in _batches(data, batch_size, progress, "backbone"):
        for k in range(last):
            t0 = time.perf_counter()
            with stage_context(precision, k):
                x = model.stages[k](x)
            stage_seconds[k] += time.perf_counter() - t0
        t0 = time.perf_counter()
        x, logits = run_stage(model, last, x, precision)
        predictions.append(logits.argmax(-1))
        stage_seconds[last] += time.perf_counter() - t0
    seconds = time.perf_counter() - start
    return Run(exits=np.full(len(data), last), predictions=torch.cat(predictions).numpy(),
               stage_seconds=stage_seconds, seconds=seconds)
