"""The machine exitwise runs on: its CPU, its device and how busy it is; what every figure records it came from."""
from __future__ import annotations

import os
import platform
import time
from pathlib import Path
from typing import Callable

import torch

from .config import DEVICES
from .errors import UserError
from .refs import Load, Machine

BUSY_SHARE = 0.25          # other work using a quarter of the CPUs' time makes timings slow and noisy


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
    device = torch.device(device)
    accelerator = (torch.cuda.get_device_name(device) if device.type == "cuda"
                   else "Apple MPS" if device.type == "mps" else None)
    return Machine(cpu=info.get("model name") or platform.processor() or platform.machine(),
                   capability=torch.backends.cpu.get_cpu_capability(),
                   native_bf16=bool(flags & {"amx_bf16", "avx512_bf16"}),
                   threads=torch.get_num_threads(), torch=torch.__version__, device=str(device),
                   accelerator=accelerator)


def resolve_device(name: str | torch.device) -> torch.device:
    """"auto": CUDA, else Apple's MPS, else the CPU; a named device (`cuda:1` too) must be present."""
    if isinstance(name, torch.device):
        return name
    available = {"cpu": True, "cuda": torch.cuda.is_available(),
                 "mps": hasattr(torch.backends, "mps") and torch.backends.mps.is_available()}
    if name == "auto":
        return torch.device(next(d for d in ("cuda", "mps", "cpu") if available[d]))
    kind, colon, index = str(name).partition(":")
    if kind not in available or (colon and not (kind == "cuda" and index.isdigit())):
        raise UserError(f"unknown device {name!r}; choose one of {', '.join(DEVICES)} (or cuda:N)")
    if not available[kind] or (colon and int(index) >= torch.cuda.device_count()):
        raise UserError(f"device {name!r} is not available on this machine")
    return torch.device(name)


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels, so a clock read after it times finished work (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


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


def machine_load() -> Load:
    """How busy the CPUs were just before timed work, and whether that makes its times slow and noisy: other
    processes' share of the CPUs' time over a tenth of a second decides where /proc/stat exists (the 1-minute load
    average, also recorded, trails: it still counts a job that ended a minute ago), else the load average."""
    load = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    share = cpu_busy_share()
    busy = share >= BUSY_SHARE if share is not None else load is not None and load >= 0.75 * cpus
    return Load(load, cpus, busy, None if share is None else round(share, 3))


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
