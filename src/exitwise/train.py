"""Joint multi-exit training (BranchyNet): the loss is a weighted sum of every exit's cross-entropy.

Recipe: SGD with Nesterov momentum, a one-cycle learning rate (30% warmup, cosine down; on digits it
beat 5%-warmup cosine by 0.6 points at the final exit and 1.4 at the middle one), label smoothing,
random crop + flip done on whole uint8 batches in torch, channels_last + bf16 autocast (2.5x the
fp32 training speed of b-resnet11 here, same accuracy on digits). Exit weights default to 1.0 each:
every exit is a classifier users rely on, so none is sacrificed to the others.

Checkpoints: after every epoch, atomically, as tensors and plain Python (`weights_only=True` loads
them). Data order, augmentation and dropout are seeded from (seed, epoch, rank) at the start of each
epoch, so a resumed run draws exactly what the uninterrupted run would have drawn.

Distributed: under `torchrun` (WORLD_SIZE > 1) the model is wrapped in DistributedDataParallel; every
rank takes its slice perm[rank::world] of the same per-epoch permutation, with batch_size / world
images per step (the global batch and the recipe stay the same). BatchNorm normalizes per rank
(SyncBatchNorm needs a GPU); its running statistics are averaged across ranks after every epoch, so
all ranks hold identical weights. Only rank 0 evaluates, writes files and shows progress.
"""
from __future__ import annotations

import inspect
import io
import math
import os
import platform
import random
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, fields, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import save as safetensors_bytes
from tqdm import tqdm

from .config import TrainConfig, __version__
from .models.costs import exit_macs, head_report
from .data import ImageSet, Splits
from .errors import UserError, first_line
from .refs import TrainPrecisionProbe
from .tune import choose_train_precision
from .device import machine, resolve_device
from .io import atomic_write_bytes, atomic_write_json, ensure_writable_dir
from .models import check_fits
from .models.weights import read_torch_file
from .models.card import ModelCard
from .models.base import MultiExitNetwork, device_of
from .progress import progress_bar

CHECKPOINT_FORMAT = "exitwise-train-checkpoint-v1"
CHECKPOINT, WEIGHTS, CARD = "checkpoint.pt", "model.safetensors", "model.json"


def joint_loss(logits: list[torch.Tensor], labels: torch.Tensor, weights: list[float] | tuple[float, ...],
               label_smoothing: float = 0.0, distill: float = 0.0, temperature: float = 3.0) -> torch.Tensor:
    """BranchyNet's joint loss: sum over exits k of w_k * loss_k, in fp32.

    loss_k is exit k's cross-entropy; with `distill` = a > 0 a side exit's is (1 - a) * cross-entropy
    + a * T^2 * KL(final exit || exit k) at temperature T (Phuong & Lampert 2019, "Distillation-based
    training for multi-exit architectures"). The final exit is the teacher and gets no gradient from it.
    """
    losses = [F.cross_entropy(l.float(), labels, label_smoothing=label_smoothing) for l in logits]
    if distill:
        teacher = F.log_softmax(logits[-1].detach().float() / temperature, dim=1)
        for k, student in enumerate(logits[:-1]):
            kl = F.kl_div(F.log_softmax(student.float() / temperature, dim=1), teacher, reduction="batchmean",
                          log_target=True)
            losses[k] = (1 - distill) * losses[k] + distill * temperature ** 2 * kl
    return sum(w * loss for w, loss in zip(weights, losses, strict=True))


class _ScaleGradient(torch.autograd.Function):
    """The identity going forward; multiplies the gradient by `scale` going back."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad * ctx.scale, None


@contextmanager
def side_gradient_scaled(model: MultiExitNetwork, scale: float):
    """Within this block the side heads see their input unchanged, but pass only `scale` times their gradient
    back into the shared layers (0: none, so those layers learn from the final exit alone and the heads
    train on its features, as Kaya et al.'s Shallow-Deep Networks do; 1: BranchyNet's joint training).
    The final head is untouched. Gradient rescaling between exits follows MSDNet and Li et al. 2019."""
    def scale_input(_head: torch.nn.Module, args: tuple) -> tuple:
        return (args[0].detach() if scale == 0 else _ScaleGradient.apply(args[0], scale),) + args[1:]
    handles = [head.register_forward_pre_hook(scale_input) for head in model.heads[:-1]] if scale != 1 else []
    try:
        yield model
    finally:
        for handle in handles:
            handle.remove()


def augment(images: torch.Tensor, padding: int, flip: bool, generator: torch.Generator | None = None,
            cutout: int = 0) -> torch.Tensor:
    """Random crop (a shift of the zero-padded image), horizontal flip and cutout of a uint8 (B, H, W, C) batch.

    One gather for the whole batch: per-image row and column indices into the padded batch (reversed
    columns flip). Cutout zeroes a `cutout`-sided square centred anywhere in the image (clipped at the
    border), one mask for the batch. Returns float (B, C, H, W) in [0, 1], channels_last.
    """
    b, h, w, _ = images.shape
    dy, dx = torch.randint(0, 2 * padding + 1, (2, b, 1), generator=generator)
    cols = torch.arange(w).expand(b, w)
    if flip:
        cols = torch.where(torch.rand(b, 1, generator=generator) < 0.5, cols.flip(1), cols)
    rows, cols = (dy + torch.arange(h)).to(images.device), (dx + cols).to(images.device)
    padded = F.pad(images, (0, 0, padding, padding, padding, padding))
    out = padded[torch.arange(b, device=images.device)[:, None, None], rows[:, :, None], cols[:, None, :]]
    if cutout:
        cy, cx = (torch.randint(0, n, (b, 1), generator=generator) - cutout // 2 for n in (h, w))
        inside_rows = (torch.arange(h) >= cy) & (torch.arange(h) < cy + cutout)
        inside_cols = (torch.arange(w) >= cx) & (torch.arange(w) < cx + cutout)
        out = out.masked_fill((inside_rows[:, :, None] & inside_cols[:, None, :])[..., None].to(images.device), 0)
    return out.permute(0, 3, 1, 2).float().div_(255)  # NHWC storage viewed as NCHW is channels_last


class _FrozenBackbone(torch.nn.Module):
    """The side heads on the features of a frozen network: its stages and final head run without autograd (and
    stay in eval mode, so batch-norm statistics and the final exit do not change)."""

    def __init__(self, model: MultiExitNetwork):
        super().__init__()
        self.model = model

    def train(self, mode: bool = True) -> "_FrozenBackbone":
        super().train(mode)
        self.model.stages.eval()
        self.model.heads[-1].eval()
        return self

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = []
        with torch.no_grad():
            for stage in self.model.stages:
                x = stage(x)
                features.append(x)
            final = self.model.heads[-1](x)
        return [head(f) for head, f in zip(self.model.heads[:-1], features)] + [final]


@contextmanager
def _frozen(model: MultiExitNetwork, freeze: bool):
    """Within this block (with `freeze`) only the side heads' parameters require gradients, as DDP and the
    optimizer must see; the flags are restored afterwards (the stages hold the user's own parameters)."""
    frozen = [p for m in (model.stages, model.heads[-1]) for p in m.parameters() if p.requires_grad] if freeze else []
    for p in frozen:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in frozen:
            p.requires_grad_(True)


@torch.no_grad()
def evaluate(model: MultiExitNetwork, data: ImageSet, batch_size: int = 512, precision: str = "fp32") -> list[float]:
    """Accuracy of every exit on `data` (eval mode; the model's training flag is restored)."""
    was_training, device = model.training, device_of(model)
    model.eval()
    correct = torch.zeros(model.num_exits, dtype=torch.int64, device=device)
    with _autocast(device, precision):
        for x, y in data.batches(batch_size):
            y = y.to(device)
            correct += torch.stack([(l.argmax(1) == y).sum() for l in model(x.to(device))])
    model.train(was_training)
    return (correct.cpu().double() / max(len(data), 1)).tolist()


def train(model: MultiExitNetwork, splits: Splits, config: TrainConfig | None, out_dir: str | Path, *,
          resume: str | Path | None = None, progress: bool = True, model_name: str | None = None,
          device: str = "auto") -> ModelCard | None:
    """Train `model` in place on `splits.train` on `device`, validating every exit after each epoch; return the
    model card (what `model.json` holds; None on ranks > 0). The model comes back on the device it was on.

    Writes `out_dir/checkpoint.pt` after every epoch, then `model.safetensors` and `model.json`.
    `resume` continues a checkpoint exactly; its recipe is used when `config` is None.
    """
    name = model_name or model.name or type(model).__name__
    checkpoint = _read_checkpoint(Path(resume)) if resume is not None else None
    if checkpoint is not None:
        config = _check_resume(checkpoint, name, config, splits, Path(resume))
    config = config or TrainConfig()
    _check_inputs(model, splits, config)
    out = Path(out_dir)
    if checkpoint is None and any((out / f).exists() for f in (CHECKPOINT, WEIGHTS, CARD)):
        raise UserError(f"{str(out)!r} already holds a training run: resume it "
                        f"(from {str(out / CHECKPOINT)!r}) or choose another output directory")
    ensure_writable_dir(out)

    device = resolve_device(device)
    rank, world, owns_group = _init_distributed(device)
    if config.batch_size % world or len(splits.train) < config.batch_size // world * world:
        raise UserError(f"the batch size ({config.batch_size}) must be a multiple of the {world} processes, "
                        f"and each process needs a batch of train images")
    if checkpoint is not None and checkpoint["world_size"] != world:
        raise UserError(f"checkpoint {str(resume)!r} was written by {checkpoint['world_size']} process(es); "
                        f"resume it with the same number, not {world}")
    device, home = _rank_device(device), device_of(model)
    model.to(device=device, memory_format=torch.channels_last)
    try:
        with _frozen(model, config.freeze_backbone):
            card = _train_loop(model, splits, config, out, name, checkpoint, resume, rank, world, device, progress)
    finally:  # the caller's model stays where it was built, like the weights it saved (a diverged run's too)
        model.to(home)
    if world > 1:
        _barrier()  # every rank leaves with the outputs written
        if owns_group:
            dist.destroy_process_group()
    return card


def _train_loop(model: MultiExitNetwork, splits: Splits, config: TrainConfig, out: Path, name: str,
                checkpoint: dict | None, resume: str | Path | None, rank: int, world: int, device: torch.device,
                progress: bool) -> ModelCard | None:
    trainer = _FrozenBackbone(model) if config.freeze_backbone else model
    net = _distributed(trainer) if world > 1 else trainer

    images, labels = splits.train.images.to(device), splits.train.labels.to(device)
    per_rank = len(images) // world
    batch = min(config.batch_size // world, per_rank)
    precision_probe = None
    if config.precision == "auto":  # resolved once and recorded: a resumed run keeps the same precision
        x = augment(images[:min(batch, 64)], 0, False, torch.Generator().manual_seed(0))
        precision, precision_probe = choose_train_precision(model, x, labels[:len(x)], device)
        if world > 1:  # every rank trains in rank 0's choice
            choice = [precision]
            dist.broadcast_object_list(choice, src=0)
            precision = choice[0]
        config = replace(config, precision=precision)
    steps = per_rank // batch  # the last partial batch is dropped; each epoch's permutation differs
    weights = list(config.exit_weights or [1.0] * model.num_exits)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=config.lr,
                                momentum=config.momentum, nesterov=True, weight_decay=config.weight_decay)
    scheduler = _scheduler(optimizer, config, steps * config.epochs)
    start_epoch, history, seconds = 0, [], 0.0
    if checkpoint is not None:
        start_epoch, history, seconds = checkpoint["epoch"], checkpoint["history"], checkpoint["train_seconds"]
        _restore(checkpoint, model, optimizer, scheduler, resume)

    show = progress and rank == 0
    for epoch in range(start_epoch, config.epochs):
        t0 = time.perf_counter()
        trainer.train()
        perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(_seed(config.seed, epoch)))
        shard = perm[rank::world][:per_rank].to(device)  # same permutation on every rank, disjoint shards
        aug = torch.Generator().manual_seed(_seed(config.seed, epoch, rank, 1))
        torch.manual_seed(_seed(config.seed, epoch, rank, 2))  # dropout and anything else in the model
        loss_sum, correct = torch.zeros((), device=device), torch.zeros(model.num_exits, device=device)
        bar = progress_bar(range(steps), desc=f"epoch {epoch + 1}/{config.epochs}", unit="batch", leave=False,
                           enabled=show)
        for step in bar:
            idx = shard[step * batch:(step + 1) * batch]
            x, y = augment(images[idx], config.crop_padding, config.flip, aug, config.cutout), labels[idx]
            with _autocast(device, config.precision), side_gradient_scaled(model, config.side_gradient):
                logits = net(x)
            loss = joint_loss(logits, y, weights, config.label_smoothing, config.distill, config.distill_temperature)
            if not torch.isfinite(loss):  # stop at once, keeping the last good checkpoint
                raise UserError(f"training diverged (loss {loss.item()}) in epoch {epoch + 1}, step {step + 1}: "
                                f"lower the learning rate (now {config.lr})")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            loss_sum += loss.detach()
            correct += torch.stack([(l.argmax(1) == y).sum() for l in logits])
            if show:
                seen = (step + 1) * batch
                bar.set_postfix_str(f"loss {loss_sum.item() / (step + 1):.3f} acc {_percent((correct / seen).tolist())} "
                                    f"{seen * world / (time.perf_counter() - t0):.0f} img/s", refresh=False)
        train_time = time.perf_counter() - t0
        if world > 1:
            _average_buffers(model, world)  # BatchNorm statistics are per rank; average them
        mean_loss = loss_sum.item() / steps
        val = evaluate(model, splits.val, 2 * config.batch_size, config.precision) \
            if rank == 0 and len(splits.val) else None
        epoch_time = time.perf_counter() - t0
        seconds += epoch_time
        history.append({"epoch": epoch + 1, "loss": mean_loss, "lr": scheduler.get_last_lr()[0],
                        "train_accuracy": (correct / (steps * batch)).tolist(), "val_accuracy": val,
                        "seconds": epoch_time, "images_per_second": steps * batch * world / train_time})
        if rank == 0:
            _write_checkpoint(out / CHECKPOINT, model, optimizer, scheduler, name, epoch + 1, config, splits,
                              history, seconds, world)
            tqdm.write(_epoch_line(history[-1], config.epochs))
            sys.stdout.flush()  # a log file sees each epoch as it ends, not when the run does
        if world > 1:
            _barrier()

    return _finish(model, name, splits, config, history, seconds, world, out, device, precision_probe) \
        if rank == 0 else None


def _finish(model: MultiExitNetwork, name: str, splits: Splits, config: TrainConfig, history: list[dict],
            seconds: float, world: int, out: Path, device: torch.device,
            precision_probe: TrainPrecisionProbe | None) -> ModelCard:
    """Measure test accuracy, then write the weights and the model card (the card last: it marks completion)."""
    test = evaluate(model, splits.test, 2 * config.batch_size, config.precision) if len(splits.test) else None
    side = [["heads", str(k)] for k in range(model.num_exits - 1)]
    state = {k: v.detach().cpu().clone(memory_format=torch.contiguous_format)  # no shared storage
             for k, v in model.state_dict().items()
             if not config.freeze_backbone or k.split(".")[:2] in side}  # frozen: the rest is unchanged
    atomic_write_bytes(out / WEIGHTS, safetensors_bytes(state, metadata={"model": name}))
    card = ModelCard(model=name, num_exits=model.num_exits, dataset=splits.describe(), split_seed=splits.split_seed,
                     recipe=asdict(config), epochs=config.epochs, train_seconds=seconds, precision=config.precision,
                     precision_probe=precision_probe,
                     machine={**machine(device).to_json(), "platform": platform.platform(), "processes": world},
                     val_accuracy=_per_exit(history[-1]["val_accuracy"] if history else None),
                     test_accuracy=_per_exit(test), exit_macs=tuple(exit_macs(model)),
                     heads=tuple(head_report(model, model.exit_names)), history=tuple(history), weights=WEIGHTS,
                     exitwise_version=__version__)
    atomic_write_json(out / CARD, card.to_json())
    return card


def _per_exit(accuracy: list[float] | None) -> tuple[float, ...] | None:
    return None if accuracy is None else tuple(accuracy)


def _check_inputs(model: MultiExitNetwork, splits: Splits, config: TrainConfig) -> None:
    if len(splits.train) == 0:
        raise UserError(f"the {splits.dataset} train split has no images (is the validation split all of it?)")
    check_fits(model, splits.train, splits.dataset)
    if config.exit_weights is not None and len(config.exit_weights) != model.num_exits:
        raise UserError(f"{len(config.exit_weights)} exit weights given for a model with {model.num_exits} exits")


def _read_checkpoint(path: Path) -> dict:
    if not path.is_file():
        raise UserError(f"checkpoint not found: {str(path)!r}")
    checkpoint = read_torch_file(path, "checkpoint")
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{str(path)!r} is not an exitwise training checkpoint")
    return checkpoint


def _check_resume(checkpoint: dict, name: str, config: TrainConfig | None, splits: Splits, path: Path) -> TrainConfig:
    """The checkpoint must be of this model and data; the recipe must be the one it was trained with."""
    if checkpoint["model_name"] != name:
        raise UserError(f"checkpoint {str(path)!r} is of model {checkpoint['model_name']!r}, not {name!r}")
    data = _data_identity(splits)
    if checkpoint["data"] != data:
        raise UserError(f"checkpoint {str(path)!r} was trained on {checkpoint['data']}, not {data}")
    saved = TrainConfig(**checkpoint["config"])
    if config is not None and config.precision == "auto":  # the saved recipe holds what "auto" resolved to
        config = replace(config, precision=saved.precision)
    if config is not None and config != saved:
        changed = ", ".join(f"{f.name}={getattr(saved, f.name)!r} (asked {getattr(config, f.name)!r})"
                            for f in fields(TrainConfig) if getattr(saved, f.name) != getattr(config, f.name))
        raise UserError(f"checkpoint {str(path)!r} was trained with {changed}: resume with its recipe")
    return saved


def _data_identity(splits: Splits) -> dict:
    return {"dataset": splits.dataset, "split_seed": splits.split_seed, "train_images": len(splits.train)}


def _restore(checkpoint: dict, model: MultiExitNetwork, optimizer: torch.optim.Optimizer,
             scheduler: torch.optim.lr_scheduler.LRScheduler, path: str | Path) -> None:
    try:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
    except (RuntimeError, KeyError, ValueError) as e:
        raise UserError(f"checkpoint {str(path)!r} does not fit the model: {first_line(e)}") from None
    rng = checkpoint["rng"]
    torch.set_rng_state(rng["torch"])
    np.random.set_state((rng["numpy"][0], rng["numpy"][1].numpy().astype(np.uint32), *rng["numpy"][2:]))
    random.setstate((rng["python"][0], tuple(rng["python"][1]), rng["python"][2]))


def _write_checkpoint(path: Path, model: MultiExitNetwork, optimizer: torch.optim.Optimizer,
                      scheduler: torch.optim.lr_scheduler.LRScheduler, name: str, epoch: int, config: TrainConfig,
                      splits: Splits, history: list[dict], seconds: float, world: int) -> None:
    """Everything needed to continue, as tensors and plain Python (so `weights_only=True` loads it)."""
    np_state = np.random.get_state()
    state = {"format": CHECKPOINT_FORMAT, "model_name": name, "epoch": epoch, "config": asdict(config),
             "data": _data_identity(splits), "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "rng": {"torch": torch.get_rng_state(),
                     "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
                     "python": list(random.getstate())},
             "history": history, "train_seconds": seconds, "world_size": world, "exitwise_version": __version__}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def _scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig,
               total_steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    if config.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, config.lr, total_steps=total_steps,
                                                   pct_start=0.3, cycle_momentum=False)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, _warmup_cosine(total_steps))


def _warmup_cosine(total_steps: int, warmup_fraction: float = 0.05):
    """Learning-rate factor per step: linear warmup, then cosine decay to zero."""
    warmup = max(1, round(warmup_fraction * total_steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total_steps - warmup))))
    return factor


def _init_distributed(device: torch.device) -> tuple[int, int, bool]:
    """(rank, world size, whether we started the process group): torchrun sets WORLD_SIZE. NCCL between GPUs,
    gloo between CPUs."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), False
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        return dist.get_rank(), dist.get_world_size(), True
    return 0, 1, False


def _distributed(model: torch.nn.Module) -> torch.nn.parallel.DistributedDataParallel:
    """DDP without per-forward buffer broadcasts: BatchNorm statistics are averaged once per epoch instead."""
    ddp = torch.nn.parallel.DistributedDataParallel
    newer = "forward_sync_buffers" in inspect.signature(ddp).parameters  # torch 2.13 deprecates broadcast_buffers
    return ddp(model, **{"forward_sync_buffers" if newer else "broadcast_buffers": False})


_LAST_BARRIER: list = []


def _barrier() -> None:
    """dist.barrier(), keeping its finished work for the main thread to free. DDP keeps gloo's threads alive past
    destroy_process_group; one freeing the last barrier's work (and the tensors of collectives it waited on)
    during interpreter exit aborts the process: "terminate called without an active exception"."""
    work = dist.barrier(async_op=True)
    work.wait()
    _LAST_BARRIER[:] = [work]


def _average_buffers(model: torch.nn.Module, world: int) -> None:
    for buffer in model.buffers():
        if buffer.is_floating_point():
            dist.all_reduce(buffer)
            buffer.div_(world)


def _autocast(device: torch.device, precision: str):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def _rank_device(device: torch.device) -> torch.device:
    """This process's GPU under torchrun (one per process: LOCAL_RANK), or `device` as it is (`cuda:1` alone)."""
    if device.type != "cuda" or (device.index is not None and "LOCAL_RANK" not in os.environ):
        return device
    local_rank, count = int(os.environ.get("LOCAL_RANK", 0)), torch.cuda.device_count()
    if local_rank >= count:
        raise UserError(f"process {local_rank} on this machine has no GPU of its own ({count} here): start at most "
                        f"{count} per machine (torchrun --nproc-per-node {count}) or train on the CPU (--device cpu)")
    return torch.device("cuda", local_rank)


def _seed(*keys: int) -> int:
    return int(np.random.SeedSequence(list(keys)).generate_state(1)[0])


def _percent(values: list[float]) -> str:
    return " ".join(f"{100 * v:.1f}" for v in values)


def _epoch_line(h: dict, epochs: int) -> str:
    val = f" | val acc {_percent(h['val_accuracy'])}" if h["val_accuracy"] is not None else ""
    return (f"epoch {h['epoch']}/{epochs} loss {h['loss']:.3f} | train acc {_percent(h['train_accuracy'])}{val} | "
            f"{h['seconds']:.1f}s {h['images_per_second']:.0f} img/s")
