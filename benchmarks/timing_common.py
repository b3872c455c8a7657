"""What the timing benchmarks share: the fastest of a few runs of each contender, the contenders taking turns."""
from __future__ import annotations

from typing import Callable


def best_of_interleaved(repeats: int, *runs: Callable[[], object]) -> list:
    """The fastest (by `.seconds`) of `repeats` calls of each run, called in turn (a, b, a, b, ...) so that a machine
    slowing down or speeding up partway through weighs on both sides of a ratio alike."""
    results: list[list] = [[] for _ in runs]
    for _ in range(repeats):
        for run, out in zip(runs, results):
            out.append(run())
    return [min(out, key=lambda r: r.seconds) for out in results]
