"""Running a multi-exit network: all exits at once (for analysis) or with real early exit.

Early exit is real: inside each batch only the samples that have not left go on to the next stage
(compaction), and the heads and exit decisions sit inside the timed region. Per-stage wall time is
recorded so a cost model can predict the time of any threshold setting (see `exitwise.study`).
"""
from __future__ import annotations

import collections
import copy
import itertools
import time
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
import torch
from torch.nn.utils.fusion import fuse_conv_bn_eval

from .exit_rule import leaves
from .errors import UserError
from .config import DEFAULT_MICRO_BATCH, check_precision
from .device import resolve_device, synchronize
from .models.base import MultiExitNetwork, device_of
from .policies import ExitPolicy
from .progress import progress_bar

# Every runtime function splits a caller's batch into `micro_batch`-row pieces that each go through the whole
# network while their activations stay in cache (on the AMX machine 64 rows ran 1.5-2x faster per image than
# 256); predictions are unchanged. `tune.choose_micro_batch` measures the best size for a machine.


class _InDtype(torch.nn.Module):
    """`module` run on its input cast to `dtype`, the dtype its weights are stored in (None: as it comes)."""

    def __init__(self, module: torch.nn.Module, dtype: torch.dtype | None):
        super().__init__()
        self.module, self.dtype = module, dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x if self.dtype is None else x.to(self.dtype))


def _in_own_dtype(module: torch.nn.Module) -> _InDtype:
    tensors = itertools.chain(module.parameters(), module.buffers())
    return _InDtype(module, next((t.dtype for t in tensors if t.is_floating_point()), None))


def fold_batch_norms(module: torch.nn.Module) -> None:
    """Fold every BatchNorm2d that directly follows a Conv2d (in an nn.Sequential) into that conv; also one
    after a conv and a max pool when every channel's scale is positive (max commutes with x -> a x + b, a > 0)."""
    for child in module.children():
        fold_batch_norms(child)
    if isinstance(module, torch.fx.GraphModule):
        _fold_graph_batch_norms(module)
    if isinstance(module, torch.nn.Sequential):
        names, layers = list(module._modules), module._modules
        for a, b in zip(names, names[1:]):
            if isinstance(layers[a], torch.nn.Conv2d) and isinstance(layers[b], torch.nn.BatchNorm2d):
                layers[a], layers[b] = fuse_conv_bn_eval(layers[a], layers[b]), torch.nn.Identity()
        for a, pool, b in zip(names, names[1:], names[2:]):
            if (isinstance(layers[a], torch.nn.Conv2d) and isinstance(layers[pool], torch.nn.MaxPool2d)
                    and isinstance(layers[b], torch.nn.BatchNorm2d) and _bn_scale(layers[b]).gt(0).all()):
                layers[a], layers[b] = fuse_conv_bn_eval(layers[a], layers[b]), torch.nn.Identity()


def _fold_graph_batch_norms(gm: torch.fx.GraphModule) -> None:
    """In a traced graph (an attached model's stage): fold each BatchNorm2d whose input is a Conv2d's output used
    nowhere else, when that conv and that batch norm are each called once."""
    modules = dict(gm.named_modules())
    calls = collections.Counter(n.target for n in gm.graph.nodes if n.op == "call_module")
    for node in list(gm.graph.nodes):
        conv = node.args[0] if node.op == "call_module" and node.args else None
        if (isinstance(modules.get(node.target), torch.nn.BatchNorm2d) and isinstance(conv, torch.fx.Node)
                and conv.op == "call_module" and isinstance(modules.get(conv.target), torch.nn.Conv2d)
                and len(conv.users) == 1 and calls[conv.target] == calls[node.target] == 1):
            parent, _, name = conv.target.rpartition(".")
            setattr(gm.get_submodule(parent), name, fuse_conv_bn_eval(modules[conv.target], modules[node.target]))
            node.replace_all_uses_with(conv)
            gm.graph.erase_node(node)
    gm.delete_all_unused_submodules()
    gm.recompile()


def _bn_scale(bn: torch.nn.BatchNorm2d) -> torch.Tensor:
    weight = bn.weight if bn.weight is not None else torch.ones_like(bn.running_var)
    return weight / torch.sqrt(bn.running_var + bn.eps)


def prepare(model: MultiExitNetwork, precision: str = "fp32", device: str | torch.device = "cpu") -> MultiExitNetwork:
    """An inference copy of `model` that runs in `precision`; the runtime functions below take it.

    Eval mode, batch norms folded into the convolutions before them, channels_last (the fast layout
    for CPU convolutions), and every stage and head stored in the dtype it runs in, so no weight is cast
    per call as autocast would. "bf16": everything in bfloat16 (5-10x faster than fp32 on AMX/AVX-512-bf16
    CPUs). "mixed": the first stage (raw pixels) and every exit head (they decide who leaves) in fp32,
    the other stages in bf16: on the founding network bf16 everywhere changes up to 1% of an exit's
    predictions, mixed at most 0.2%. "fp32": the reference. Which is fastest depends on the machine
    (`tune.choose_precision`). The copy lives on `device`; the runtime moves each batch there.
    """
    check_precision(precision, allow_auto=False)
    device = resolve_device(device)
    net = copy.deepcopy(model).eval()
    fold_batch_norms(net)
    net.to(device=device, memory_format=torch.channels_last)
    for k in range(net.num_exits):
        if precision == "bf16" or (precision == "mixed" and k > 0):
            net.stages[k].to(torch.bfloat16)
        if precision == "bf16":
            net.heads[k].to(torch.bfloat16)
        net.stages[k], net.heads[k] = _in_own_dtype(net.stages[k]), _in_own_dtype(net.heads[k])
    return net


def run_stage(model: MultiExitNetwork, k: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Stage k of a `prepare`d model, then its head: (features, fp32 logits)."""
    x = model.stages[k](x)
    return x, model.heads[k](x).float()


def keep_rows(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """x[keep] (a mask or row indices) in one copy that stays channels_last (plain indexing returns NCHW, costing a second copy)."""
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return x.permute(0, 2, 3, 1)[keep].permute(0, 3, 1, 2)
    return x[keep]


@dataclass
class Run:
    exits: np.ndarray          # (N,) exit index of each sample
    predictions: np.ndarray    # (N,) predicted class
    stage_seconds: list[float]  # wall time per stage, its head and its exit decision, summed over batches
                               # (empty from `run_backbone`, which times only the whole loop)
    seconds: float             # wall time of the whole loop
    logits: np.ndarray | None = None  # (K, N, C) every exit's logits, from `all_exit_logits` only
    head_seconds: list[float] | None = None  # the heads' share of stage_seconds, from `all_exit_logits` only

    @property
    def trunk_seconds(self) -> float:
        """An all-exits pass's time without its side heads: the full network's time, measured in that pass."""
        return self.seconds - sum(self.head_seconds[:-1])


def _micro_batches(data, batch_size: int, micro_batch: int, device: torch.device, progress: bool, desc: str,
                   whole: bool = False) -> Iterable[torch.Tensor]:
    """The images on `device` in batches of `batch_size` (as a caller hands them in), each run as
    `micro_batch`-row pieces (or yielded whole, for a caller that splits them itself)."""
    batches = data.batches(batch_size)  # checks batch_size before it divides here
    total = (len(data) + batch_size - 1) // batch_size
    for images, _ in progress_bar(batches, total=total, desc=desc, enabled=progress,
                                  leave=False, unit="batch"):
        images = images.to(device, non_blocking=True)
        yield from [images] if whole else images.split(micro_batch)


@torch.inference_mode()
def warm_up(model: MultiExitNetwork, data, batch_size: int = 256, batches: int = 8,
            micro_batch: int = DEFAULT_MICRO_BATCH) -> None:
    """Run a few micro-batches untimed, so one-time kernel set-up does not count as a stage's cost."""
    for i, x in enumerate(_micro_batches(data, batch_size, micro_batch, device_of(model), False, "warm-up")):
        if i == batches:
            break
        for k in range(model.num_exits):
            x, _ = run_stage(model, k, x)


@torch.inference_mode()
def all_exit_logits(model: MultiExitNetwork, data, batch_size: int = 256, progress: bool = False,
                    micro_batch: int = DEFAULT_MICRO_BATCH) -> Run:
    """Every sample through every stage and head of a `prepare`d model: each exit's logits, per-stage time."""
    num_exits, device = model.num_exits, device_of(model)
    stage_seconds, head_seconds = [0.0] * num_exits, [0.0] * num_exits
    chunks: list[list[torch.Tensor]] = [[] for _ in range(num_exits)]
    start = time.perf_counter()
    for x in _micro_batches(data, batch_size, micro_batch, device, progress, "all exits"):
        for k in range(num_exits):
            t0 = time.perf_counter()
            x = model.stages[k](x)
            synchronize(device)
            t1 = time.perf_counter()
            chunks[k].append(model.heads[k](x).float())
            synchronize(device)
            t2 = time.perf_counter()
            stage_seconds[k] += t2 - t0
            head_seconds[k] += t2 - t1
    seconds = time.perf_counter() - start
    logits = torch.stack([torch.cat(c) for c in chunks]).cpu().numpy()
    return Run(exits=np.full(len(data), num_exits - 1), predictions=logits[-1].argmax(-1),
               stage_seconds=stage_seconds, seconds=seconds, logits=logits, head_seconds=head_seconds)


@dataclass
class _Rows:
    """Samples waiting for a stage: their features, positions in the data set and policy state."""
    x: torch.Tensor
    index: torch.Tensor
    state: torch.Tensor

    @staticmethod
    def cat(parts: list["_Rows"]) -> "_Rows":
        if len(parts) == 1:
            return parts[0]
        return _Rows(torch.cat([p.x for p in parts]), torch.cat([p.index for p in parts]),
                     torch.cat([p.state for p in parts]))


@torch.inference_mode()
def run_early_exit(model: MultiExitNetwork, data, thresholds: Sequence[float], policy: ExitPolicy,
                   batch_size: int = 256, progress: bool = False, micro_batch: int = DEFAULT_MICRO_BATCH) -> Run:
    """Real early exit with a `prepare`d model: a sample leaves at the first side exit whose score is <= its threshold.

    Each batch enters in micro-batches; the samples that stay are compacted and wait at the next
    stage until a micro-batch's worth has gathered (or the batch is done), so later stages run on
    full-sized batches instead of the few survivors of each micro-batch (2-3x cheaper per image at
    the last stage of b-resnet11). Every sample of a batch has left before the next batch starts.
    Thresholds of -inf never let a sample leave, so `[-inf] * (K - 1)` runs the full network
    (every side head included, as in the founding system's loop).
    """
    num_exits, device = model.num_exits, device_of(model)
    thr = torch.as_tensor(np.asarray(thresholds, dtype=np.float64), dtype=torch.float32)
    if thr.shape != (num_exits - 1,):
        raise UserError(f"expected {num_exits - 1} thresholds, got {tuple(thr.shape)}")
    thr = list(thr.to(device).unbind())  # one 0-d tensor per exit, made once
    exits = torch.empty(len(data), dtype=torch.int64, device=device)
    predictions = torch.empty(len(data), dtype=torch.int64, device=device)
    stage_seconds = [0.0] * num_exits
    waiting: list[list[_Rows]] = [[] for _ in range(num_exits)]

    def advance(k: int, rows: _Rows) -> None:
        """Stage k and its exit decision for `rows`; the samples that stay wait at stage k + 1."""
        t0 = time.perf_counter()
        x, logits = run_stage(model, k, rows.x)
        exits[rows.index] = k  # every row: the ones that stay are written over at a later exit
        predictions[rows.index] = logits.argmax(-1)
        if k < num_exits - 1:
            scores, state = policy.step(k, logits, rows.state)
            stay = (~leaves(scores, thr[k])).nonzero().squeeze(1)  # the stage's one wait for the device
            if len(stay) == len(rows.index):
                waiting[k + 1].append(_Rows(x, rows.index, state))
            elif len(stay):
                waiting[k + 1].append(_Rows(keep_rows(x, stay), rows.index[stay], state[stay]))
        synchronize(device)
        stage_seconds[k] += time.perf_counter() - t0

    def run_waiting(k: int, at_least: int) -> None:
        if sum(len(r.index) for r in waiting[k]) >= at_least:
            t0 = time.perf_counter()
            rows, waiting[k] = _Rows.cat(waiting[k]), []  # gathering stage k's rows is stage k's time too (it was
            stage_seconds[k] += time.perf_counter() - t0  # left out, and so charged to stage 0)
            advance(k, rows)

    offset = 0
    start = time.perf_counter()
    for batch in _micro_batches(data, batch_size, micro_batch, device, progress, "early exit", whole=True):
        for x in batch.split(micro_batch):
            index = torch.arange(offset, offset + len(x), device=device)
            advance(0, _Rows(x, index, policy.init_state(len(x)).to(device)))
            offset += len(x)
            for k in range(1, num_exits):
                run_waiting(k, micro_batch)
        for k in range(1, num_exits):  # the batch is done: the rest go on as they are
            run_waiting(k, 1)
    seconds = time.perf_counter() - start
    return Run(exits=exits.cpu().numpy(), predictions=predictions.cpu().numpy(), stage_seconds=stage_seconds,
               seconds=seconds)


@torch.inference_mode()
def run_backbone(model: MultiExitNetwork, data, batch_size: int = 256, progress: bool = False,
                 micro_batch: int = DEFAULT_MICRO_BATCH) -> Run:
    """The `prepare`d network without side exits: every stage, then the final head. The baseline to beat."""
    predictions, device = [], device_of(model)
    start = time.perf_counter()
    for x in _micro_batches(data, batch_size, micro_batch, device, progress, "backbone"):
        for stage in model.stages:
            x = stage(x)
        predictions.append(model.heads[-1](x).argmax(-1))
    predictions = torch.cat(predictions).cpu()
    seconds = time.perf_counter() - start
    return Run(exits=np.full(len(data), model.num_exits - 1), predictions=predictions.numpy(),
               stage_seconds=[], seconds=seconds)
