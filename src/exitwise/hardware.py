"""The machine exitwise runs on: its CPU, the device, and the precision and micro-batch that are fastest there.

Nothing about speed is assumed from a CPU's name. bf16 is 5-10x faster than fp32 on Intel CPUs with AMX
and 7-8x slower on AVX2-only CPUs, where it is emulated; the best micro-batch depends on cache sizes.
So each choice is a short timed probe on this machine, and every result records the CPU it came from.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .errors import UserError
from .models.base import MultiExitNetwork

DEVICES = ("auto", "cpu", "cuda", "mps")
PRECISIONS = ("bf16", "mixed", "fp32")
AGREEMENT_REQUIRED = 0.99  # a reduced precision may change at most 1% of any exit's predictions
PRECISION_CHECK_IMAGES = 1000
PROBE_ROWS = 32            # images per timed precision probe: a second or two even where bf16 is emulated
MICRO_BATCH_SIZES = (16, 32, 64, 128, 256)
DEFAULT_MICRO_BATCH = 64   # used when nothing is measured (tests, explicit runs); best on the AMX machine
BUSY_SHARE = 0.25          # other work using a quarter of the CPUs' time makes timings slow and noisy


@dataclass(frozen=True)
class Machine:
    """Where a figure was measured."""
    cpu: str            # the CPU's model name
    capability: str     # torch's widest CPU kernels here: AVX2, AVX512, ...
    native_bf16: bool   # AMX or AVX512_BF16: bf16 in hardware, not emulated
    threads: int
    torch: str
    device: str

    def to_json(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        bf16 = "native bf16" if self.native_bf16 else "no native bf16"
        return (f"{self.cpu} ({self.capability}, {bf16}), {self.threads} threads, torch {self.torch}, "
                f"device {self.device}")


def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo (empty where there is none, e.g. macOS)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    fields = {}
    for line in text.split("\n\n")[0].splitlines():
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    return fields


def machine(device: str | torch.device = "cpu") -> Machine:
    info = _cpuinfo()
    flags = set(info.get("flags", "").split())
    return Machine(cpu=info.get("model name") or platform.processor() or platform.machine(),
                   capability=torch.backends.cpu.get_cpu_capability(),
                   native_bf16=bool(flags & {"amx_bf16", "avx512_bf16"}),
                   threads=torch.get_num_threads(), torch=torch.__version__, device=str(device))


def resolve_device(name: str) -> torch.device:
    """"auto": CUDA, else Apple's MPS, else the CPU; a named device must be present."""
    available = {"cpu": True, "cuda": torch.cuda.is_available(),
                 "mps": hasattr(torch.backends, "mps") and torch.backends.mps.is_available()}
    if name == "auto":
        return torch.device(next(d for d in ("cuda", "mps", "cpu") if available[d]))
    if name not in available:
        raise UserError(f"unknown device {name!r}; choose one of {', '.join(DEVICES)}")
    if not available[name]:
        raise UserError(f"device {name!r} is not available on this machine")
    return torch.device(name)


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels, so a clock read after it times finished work (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def check_precision(precision: str, allow_auto: bool = True) -> str:
    known = ("auto",) * allow_auto + PRECISIONS
    if precision not in known:
        raise UserError(f"unknown precision {precision!r}; choose one of {', '.join(known)}")
    return precision


def check_micro_batch(micro_batch: int | None) -> int | None:
    if micro_batch is not None and micro_batch < 1:
        raise UserError(f"micro-batch must be a positive number of rows, got {micro_batch}")
    return micro_batch


def cpu_busy_share(seconds: float = 0.1) -> float | None:
    """The share of all CPUs' time that other processes spent working over the next `seconds`: /proc/stat's busy
    time less this process's own (its OpenMP threads may still spin after torch work). None where /proc/stat is
    missing (macOS, Windows)."""
    def ticks() -> tuple[int, int, float]:
        with open("/proc/stat") as f:  # cpu user nice system idle iowait irq softirq steal ...
            values = [int(v) for v in f.readline().split()[1:9]]
        own = os.times()
        return sum(values), values[3] + values[4], (own.user + own.system) * os.sysconf("SC_CLK_TCK")

    try:
        total_before, idle_before, own_before = ticks()
        time.sleep(seconds)
        total_after, idle_after, own_after = ticks()
    except (OSError, ValueError, IndexError, AttributeError):
        return None
    total = total_after - total_before
    others = total - (idle_after - idle_before) - (own_after - own_before)
    return min(1.0, max(0.0, others / total)) if total > 0 else None


def machine_load() -> dict:
    """How busy the CPUs were just before timed work, and whether that makes its times slow and noisy: other
    processes' share of the CPUs' time over a tenth of a second decides where /proc/stat exists (the 1-minute load
    average, also recorded, trails: it still counts a job that ended a minute ago), else the load average."""
    load = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    share = cpu_busy_share()
    busy = share >= BUSY_SHARE if share is not None else load is not None and load >= 0.75 * cpus
    return {"load_average": load, "cpus": cpus, "busy_share": None if share is None else round(share, 3),
            "busy": busy}


def describe_load(load: dict) -> str:
    """`machine_load()` in words, for a benchmark's header."""
    share = "" if load["busy_share"] is None else f"other work used {load['busy_share']:.0%} of them just now, "
    return (f"{load['cpus']} CPUs: {share}1-minute load average {load['load_average']}"
            + (": BUSY, the timings below are not to be trusted" if load["busy"] else ""))


def seconds_per_call(fn: Callable[[], object], device: torch.device, min_seconds: float = 0.2,
                     max_calls: int = 5, warm_up: bool = True) -> float:
    """The fastest of a few timed calls of `fn` (at least one, more until `min_seconds` were spent), after an
    untimed call for one-time kernel set-up (`warm_up`; off when the caller has run one)."""
    if warm_up:
        fn()
    synchronize(device)
    best, spent, calls = float("inf"), 0.0, 0
    while calls < 1 or (spent < min_seconds and calls < max_calls):
        start = time.perf_counter()
        fn()
        synchronize(device)
        took = time.perf_counter() - start
        best, spent, calls = min(best, took), spent + took, calls + 1
    return best


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
                     ) -> tuple[str, dict | None]:
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
                                  check_images: int, micro_batch: int) -> tuple[MultiExitNetwork, str, dict | None]:
    """`choose_precision`, also returning the inference copy in the chosen precision that it timed."""
    from .runtime import all_exit_logits, prepare
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

    def agreement(p: str) -> np.ndarray:
        if not reference:
            reference.append(all_exit_logits(copy_in("fp32"), sample, micro_batch=micro_batch).logits.argmax(-1))
        got = all_exit_logits(copy_in(p), sample, micro_batch=micro_batch).logits.argmax(-1)
        return (got == reference[0]).mean(1)

    chosen, tried = pick_precision(speed, agreement, auto=precision == "auto")
    return copy_in(chosen["precision"]), chosen["precision"], {
        "images": len(sample), "required": AGREEMENT_REQUIRED, "probe_images": timing["probe_images"],
        "timing_cached": timing["cached"], "tried": tried,
        "precision": chosen["precision"], "agreement_with_fp32": chosen["agreement_with_fp32"],
        "machine": machine(device).to_json()}


def pick_precision(ms_per_image: dict[str, float], agreement: Callable[[str], np.ndarray],
                   auto: bool = True) -> tuple[dict, list[dict]]:
    """The decision of `choose_precision` from measured speeds: candidates in order of speed, the first that
    agrees with fp32 wins (fp32 always does); `agreement(p)` (per-exit shares) is asked only while nothing has
    won, so a candidate slower than the winner is never checked. Not `auto`: the one candidate, as asked."""
    tried, chosen = [], None
    for p in sorted(ms_per_image, key=ms_per_image.get):
        entry = {"precision": p, "ms_per_image": ms_per_image[p], "agreement_per_exit": None,
                 "agreement_with_fp32": 1.0 if p == "fp32" else None}
        if p != "fp32" and chosen is None:
            a = agreement(p)
            entry.update(agreement_per_exit=[float(v) for v in a], agreement_with_fp32=float(np.min(a)))
        tried.append(entry)
        passes = entry["agreement_with_fp32"] is not None and entry["agreement_with_fp32"] >= AGREEMENT_REQUIRED
        if chosen is None and (passes or not auto):
            chosen = entry
    return chosen, tried


def architecture_fingerprint(model: torch.nn.Module) -> str:
    """Names, shapes and dtypes of every tensor: two models that compute alike share it, whatever their weights."""
    layout = [(k, tuple(v.shape), str(v.dtype)) for k, v in model.state_dict().items()]
    return hashlib.sha256(repr((type(model).__name__, layout)).encode()).hexdigest()[:16]


def choose_micro_batch(prepared: MultiExitNetwork, data, device: torch.device, precision: str,
                       batch_size: int = 256, cache_dir: Path | None = None) -> tuple[int, dict]:
    """The micro-batch (rows run through the whole network together) that is fastest per image here.

    Each size in MICRO_BATCH_SIZES up to `batch_size` runs the full network over the same images; the
    answer is cached (`cached_probe`), so the probe runs once per machine and model."""
    sizes = [m for m in MICRO_BATCH_SIZES if m <= batch_size] or [batch_size]

    @torch.inference_mode()
    def full_network(m: int, rows: torch.Tensor) -> None:
        for x in rows.split(m):
            for stage in prepared.stages:
                x = stage(x)
            prepared.heads[-1](x)

    def timed() -> dict:
        images = next(data.batches(min(max(sizes), len(data))))[0].to(device)
        ms = {}
        for m in sizes:
            full_network(m, images[:m])  # one micro-batch untimed: this shape's kernels are set up
            ms[m] = 1e3 * seconds_per_call(lambda: full_network(m, images), device, min_seconds=0.1, max_calls=3,
                                           warm_up=False) / len(images)
        return {"micro_batch": min(ms, key=ms.get), "ms_per_image": {str(m): t for m, t in ms.items()},
                "probe_images": len(images), "precision": precision}

    setting = f"batch {batch_size}, images {tuple(data.images.shape[1:])}"
    probe = cached_probe("micro_batch", prepared, precision, device, setting, timed, cache_dir)
    return probe["micro_batch"], probe


def cached_probe(kind: str, model: torch.nn.Module, precision: str, device: torch.device, setting: str,
                 measure: Callable[[], dict], cache_dir: Path | None = None) -> dict:
    """`measure()`'s answer, timed once per architecture, precision, device, CPU, threads, torch version and
    `setting` and kept in the cache directory's `probes.json`; the entry names its machine and says whether it came
    from the cache ("cached")."""
    host = machine(device)
    key = "|".join((kind, architecture_fingerprint(model), precision, str(device), host.cpu, str(host.threads),
                    host.torch, setting))
    path = probe_cache(cache_dir)
    entry = _read_json(path).get(key)
    if entry is None:
        entry = {**measure(), "machine": host.to_json()}
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
                           device: torch.device) -> tuple[str, dict]:
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
    return chosen, {"precision": chosen, "ms_per_image": ms, "probe_images": len(x), "machine": machine(device).to_json()}


@dataclass(frozen=True)
class Tuned:
    """An inference copy of a model in the precision and micro-batch measured fastest here, and the evidence."""
    network: MultiExitNetwork
    precision: str
    micro_batch: int
    precision_check: dict | None
    micro_batch_probe: dict | None


def tune(model: MultiExitNetwork, data, precision: str = "auto", micro_batch: int | None = None,
         device: torch.device | None = None, batch_size: int = 256,
         check_images: int = PRECISION_CHECK_IMAGES) -> Tuned:
    """`choose_precision` (its timed inference copy), then `choose_micro_batch` (unless `micro_batch` is given):
    what the study, the runtime's early-exit model and the benchmarks run."""
    device = device or torch.device("cpu")
    network, chosen, check = _prepared_in_chosen_precision(model, data, precision, device, check_images,
                                                           micro_batch or DEFAULT_MICRO_BATCH)
    probe = None
    if micro_batch is None:
        micro_batch, probe = choose_micro_batch(network, data, device, chosen, batch_size)
    return Tuned(network, chosen, micro_batch, check, probe)
