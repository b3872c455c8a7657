"""The precision and micro-batch that are fastest on this machine, each a short timed probe of the model.

Nothing about speed is assumed from a CPU's name. bf16 is 5-10x faster than fp32 on Intel CPUs with AMX
and 7-8x slower on AVX2-only CPUs, where it is emulated; the best micro-batch depends on cache sizes.
So each choice is a short timed probe on this machine, and every result records the CPU it came from.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import torch

from .config import AGREEMENT_REQUIRED, DEFAULT_MICRO_BATCH, PRECISIONS, check_precision
from .device import machine, machine_load, seconds_per_call
from .models.base import MultiExitNetwork
from .refs import Machine, MicroBatchProbe, PrecisionCheck, PrecisionTried, TrainPrecisionProbe
from .runtime import all_exit_logits, prepare

PRECISION_CHECK_IMAGES = 1000
PROBE_ROWS = 32            # images per timed precision probe: a second or two even where bf16 is emulated
MICRO_BATCH_SIZES = (16, 32, 64, 128, 256)
GPU_MICRO_BATCH_SIZES = MICRO_BATCH_SIZES + (512, 1024, 2048, 4096)  # a GPU fills with more rows than a cache holds
Agreement = Mapping[str, Sequence[float]]  # precision -> share of images whose prediction equals fp32's, per exit


@torch.inference_mode()
def _forward_all(model: MultiExitNetwork, x: torch.Tensor) -> list[torch.Tensor]:
    """Every stage and head of a `prepare`d model on one batch."""
    logits = []
    for stage, head in zip(model.stages, model.heads):
        x = stage(x)
        logits.append(head(x))
    return logits


def choose_precision(model: MultiExitNetwork, data, precision: str = "auto", device: torch.device | None = None,
                     check_images: int = PRECISION_CHECK_IMAGES, micro_batch: int = DEFAULT_MICRO_BATCH,
                     ) -> tuple[str, PrecisionCheck | None]:
    """The precision to run `model` in, and the evidence (None when fp32 is asked for).

    "auto": each of fp32, bf16 and mixed is timed on PROBE_ROWS images of `data`; the fastest whose
    predictions agree with fp32 at every exit on at least AGREEMENT_REQUIRED of the first `check_images`
    images wins. Agreement is measured only for candidates faster than fp32 (a slower one cannot win),
    so where bf16 is emulated the slow bf16 pass over the check images is never run. An explicit
    precision is used as asked; its agreement is measured and recorded.
    """
    _, chosen, check = _prepared_in_chosen_precision(model, data, precision, device or torch.device("cpu"),
                                                     check_images, micro_batch)
    return chosen, check


def _prepared_in_chosen_precision(model: MultiExitNetwork, data, precision: str, device: torch.device,
                                  check_images: int, micro_batch: int, agreement: Agreement | None = None,
                                  ) -> tuple[MultiExitNetwork, str, PrecisionCheck | None]:
    """`choose_precision`, also returning the inference copy in the chosen precision that it timed. `agreement`:
    per-exit agreement with fp32 measured before on real images (a shipped model's card), used instead of measuring
    it on `data` for the precisions it names."""
    check_precision(precision)
    if precision == "fp32" or check_images <= 0:
        chosen = precision if precision != "auto" else "fp32"
        return prepare(model, chosen, device), chosen, None
    probe = next(data.batches(min(PROBE_ROWS, len(data))))[0].to(device)
    sample = data.subset(torch.arange(min(check_images, len(data))))
    copies: dict[str, MultiExitNetwork] = {}

    def copy_in(p: str) -> MultiExitNetwork:
        if p not in copies:
            copies[p] = prepare(model, p, device)
        return copies[p]

    def timed() -> dict:
        candidates = PRECISIONS if precision == "auto" else (precision,)
        return {"ms_per_image": {p: 1e3 * seconds_per_call(lambda m=copy_in(p): _forward_all(m, probe), device)
                                 / len(probe) for p in candidates}, "probe_images": len(probe)}

    if precision == "auto":  # the speeds depend on the architecture and the machine, not on the weights
        timing = cached_probe("precision", model, "auto", device, f"probe {tuple(probe.shape)}", timed)
    else:
        timing = {**timed(), "cached": False}
    speed = timing["ms_per_image"]
    reference: list[np.ndarray] = []
    host, cache, cached, keys, given = machine(device), probe_cache(), [], [], []

    def agreement_of(p: str) -> np.ndarray:
        if agreement and p in agreement:
            given.append(p)
            return np.asarray(agreement[p], dtype=float)
        if not keys:  # it depends on the weights and the images as well: kept under both (hashed once, when needed),
            # so a second study of the same weights on the same data (this machine and torch) skips the check's passes
            keys.append("|".join(("agreement", weights_fingerprint(model), _digest(sample.images), str(device),
                                  host.cpu, host.torch, str(micro_batch))))
        checked = keys[0]
        stored = _read_json(cache).get(f"{checked}|{p}")
        if stored is not None:
            cached.append(p)
            return np.asarray(stored["per_exit"])
        if not reference:
            reference.append(all_exit_logits(copy_in("fp32"), sample, micro_batch=micro_batch).logits.argmax(-1))
        got = all_exit_logits(copy_in(p), sample, micro_batch=micro_batch).logits.argmax(-1)
        shares = (got == reference[0]).mean(1)
        _write_json_entry(cache, f"{checked}|{p}", {"per_exit": shares.tolist(), "machine": host.to_json()})
        return shares

    chosen, tried = pick_precision(speed, agreement_of, auto=precision == "auto")
    return copy_in(chosen.precision), chosen.precision, PrecisionCheck(
        chosen.precision, chosen.agreement_with_fp32, len(sample), AGREEMENT_REQUIRED, tried, timing["probe_images"],
        timing["cached"], tuple(cached), tuple(given), host)


def pick_precision(ms_per_image: dict[str, float], agreement: Callable[[str], np.ndarray],
                   auto: bool = True) -> tuple[PrecisionTried, tuple[PrecisionTried, ...]]:
    """The decision of `choose_precision` from measured speeds: candidates in order of speed, the first that
    agrees with fp32 wins (fp32 always does); `agreement(p)` (per-exit shares) is asked only while nothing has
    won, so a candidate slower than the winner is never checked. Not `auto`: the one candidate, as asked."""
    tried, chosen = [], None
    for p in sorted(ms_per_image, key=ms_per_image.get):
        entry = PrecisionTried(p, ms_per_image[p], agreement_with_fp32=1.0 if p == "fp32" else None)
        if p != "fp32" and chosen is None:
            a = agreement(p)
            entry = dataclasses.replace(entry, agreement_per_exit=tuple(float(v) for v in a),
                                        agreement_with_fp32=float(np.min(a)))
        tried.append(entry)
        passes = entry.agreement_with_fp32 is not None and entry.agreement_with_fp32 >= AGREEMENT_REQUIRED
        if chosen is None and (passes or not auto):
            chosen = entry
    return chosen, tuple(tried)


def weights_fingerprint(model: torch.nn.Module) -> str:
    """The architecture and every tensor's values: two models share it only when they compute the same."""
    h = hashlib.sha256(architecture_fingerprint(model).encode())
    for v in model.state_dict().values():
        h.update(v.detach().contiguous().view(-1).view(torch.uint8).cpu().numpy().tobytes())
    return h.hexdigest()[:24]


def _digest(images: torch.Tensor) -> str:
    return hashlib.sha256(images.contiguous().numpy().tobytes()).hexdigest()[:24]


def architecture_fingerprint(model: torch.nn.Module) -> str:
    """Names, shapes and dtypes of every tensor: two models that compute alike share it, whatever their weights."""
    layout = [(k, tuple(v.shape), str(v.dtype)) for k, v in model.state_dict().items()]
    return hashlib.sha256(repr((type(model).__name__, layout)).encode()).hexdigest()[:16]


def choose_micro_batch(prepared: MultiExitNetwork, data, device: torch.device, precision: str,
                       batch_size: int = 256, cache_dir: Path | None = None) -> tuple[int, MicroBatchProbe]:
    """The micro-batch (rows run through the whole network together) that is fastest per image here.

    Each size in MICRO_BATCH_SIZES (GPU_MICRO_BATCH_SIZES on a GPU) up to `batch_size` runs the full network
    over the same images; the answer is cached (`cached_probe`), so the probe runs once per machine and model."""
    sizes = [m for m in (GPU_MICRO_BATCH_SIZES if device.type == "cuda" else MICRO_BATCH_SIZES)
             if m <= batch_size] or [batch_size]

    @torch.inference_mode()
    def full_network(m: int, rows: torch.Tensor) -> None:
        for x in rows.split(m):
            for stage in prepared.stages:
                x = stage(x)
            prepared.heads[-1](x)

    probe_images = min(max(sizes), len(data))  # a run on a few images times every size on those few: noise

    def timed() -> dict:
        images = next(data.batches(probe_images))[0].to(device)
        ms = {}
        for m in sizes:
            full_network(m, images[:m])  # one micro-batch untimed: this shape's kernels are set up
            ms[m] = 1e3 * seconds_per_call(lambda: full_network(m, images), device, min_seconds=0.1, max_calls=3,
                                           warm_up=False) / len(images)
        return {"micro_batch": min(ms, key=ms.get), "ms_per_image": {str(m): t for m, t in ms.items()},
                "probe_images": len(images), "precision": precision}

    # the images timed in the key: a small run's choice is kept for small runs, not taken by every later one
    setting = f"batch {batch_size}, images {tuple(data.images.shape[1:])}, probe {probe_images}"
    probe = cached_probe("micro_batch", prepared, precision, device, setting, timed, cache_dir)
    return probe["micro_batch"], MicroBatchProbe(probe["micro_batch"], probe["ms_per_image"], probe["probe_images"],
                                                 precision, Machine(**probe["machine"]), probe["busy_share"],
                                                 probe["cached"])


def cached_probe(kind: str, model: torch.nn.Module, precision: str, device: torch.device, setting: str,
                 measure: Callable[[], dict], cache_dir: Path | None = None) -> dict:
    """`measure()`'s answer, timed once per architecture, precision, device, CPU, threads, torch version and
    `setting` and kept in the cache directory's `probes.json`; the entry names its machine and says whether it came
    from the cache ("cached"). A probe timed while other work kept the CPUs busy (`device.machine_load`) is used
    once and not kept, so a busy moment does not decide every later run on this machine."""
    host = machine(device)
    key = "|".join((kind, architecture_fingerprint(model), precision, str(device), host.cpu, str(host.threads),
                    host.torch, setting) + ((host.accelerator,) if host.accelerator else ()))
    path = probe_cache(cache_dir)
    entry = _read_json(path).get(key)
    if entry is None:
        load = machine_load()
        entry = {**measure(), "machine": host.to_json(), "busy_share": load.busy_share}
        if not load.busy:
            _write_json_entry(path, key, entry)
        return {**entry, "cached": False}
    return {**entry, "cached": True}


def probe_cache(cache_dir: Path | None = None) -> Path:
    """The file of timed probes (`exitwise cache --clear` deletes it: a probe taken on a busy machine is then
    measured again)."""
    from .data import default_cache_dir
    return (cache_dir or default_cache_dir()) / "probes.json"


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_json_entry(path: Path, key: str, entry: dict) -> None:
    """Add one entry to a JSON cache file; a cache that cannot be written only costs a probe next time."""
    from .io import atomic_write_json
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, {**_read_json(path), key: entry})
    except OSError:
        pass


def choose_train_precision(model: MultiExitNetwork, images: torch.Tensor, labels: torch.Tensor,
                           device: torch.device) -> tuple[str, TrainPrecisionProbe]:
    """bf16 autocast or fp32 for training, whichever runs a training step (forward and backward of every exit's
    loss) faster here, timed on a copy of `model` with the given batch; the model and the RNGs are untouched."""
    import copy
    probe = copy.deepcopy(model).to(device).train()
    x, y = images.to(device), labels.to(device)

    def step(precision: str) -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            logits = probe(x)
        sum(torch.nn.functional.cross_entropy(l.float(), y) for l in logits).backward()
        probe.zero_grad(set_to_none=True)

    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        ms = {p: 1e3 * seconds_per_call(lambda p=p: step(p), device, max_calls=3) / len(x) for p in ("fp32", "bf16")}
    chosen = min(ms, key=ms.get)
    return chosen, TrainPrecisionProbe(chosen, ms, len(x), machine(device))


@dataclass(frozen=True)
class Tuned:
    """An inference copy of a model in the precision and micro-batch measured fastest here, and the evidence."""
    network: MultiExitNetwork
    precision: str
    micro_batch: int
    precision_check: PrecisionCheck | None
    micro_batch_probe: MicroBatchProbe | None


def tune(model: MultiExitNetwork, data, precision: str = "auto", micro_batch: int | None = None,
         device: torch.device | None = None, batch_size: int = 256,
         check_images: int = PRECISION_CHECK_IMAGES, agreement: Agreement | None = None) -> Tuned:
    """`choose_precision` (its timed inference copy), then `choose_micro_batch` (unless `micro_batch` is given):
    what the study, the runtime's early-exit model and the benchmarks run. `agreement`: per-exit agreement with
    fp32 already measured on real images, by precision (a shipped model's card), instead of measuring it on `data`
    (a server's random images, on which predictions are near-ties and a reduced precision flips more of them)."""
    device = device or torch.device("cpu")
    network, chosen, check = _prepared_in_chosen_precision(model, data, precision, device, check_images,
                                                           micro_batch or DEFAULT_MICRO_BATCH, agreement)
    probe = None
    if micro_batch is None:
        micro_batch, probe = choose_micro_batch(network, data, device, chosen, batch_size)
    return Tuned(network, chosen, micro_batch, check, probe)
