"""What the timing benchmarks share: the fastest of a few runs of each contender, the contenders taking turns; a
shipped model's card setting on a seeded sample of the CIFAR-10 test images, prepared as the commands run it."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

SHARED = Path(__file__).resolve().parents[2] / "shared"  # ../shared beside the repository: CIFAR-10, the seed


def best_of_interleaved(repeats: int, *runs: Callable[[], object]) -> list:
    """The fastest (by `.seconds`) of `repeats` calls of each run, called in turn (a, b, a, b, ...) so that a machine
    slowing down or speeding up partway through weighs on both sides of a ratio alike."""
    results: list[list] = [[] for _ in runs]
    for _ in range(repeats):
        for run, out in zip(runs, results):
            out.append(run())
    return [min(out, key=lambda r: r.seconds) for out in results]


def card_setting_on_test(data_dir: Path, model_name: str, images: int, device):
    """(test images, the early-exit model, its `tune` result, the model `prepare`d in that precision on `device`):
    `model_name` with its card's setting (what `exitwise serve --model NAME` serves) and a seeded sample of `images`
    CIFAR-10 test images (the split is sorted by class), glibc's malloc thresholds raised first, as the `exitwise`
    commands raise them (`exitwise.allocator`)."""
    import torch

    from exitwise.allocator import keep_freed_memory
    from exitwise.data import load_splits
    from exitwise.serve_torch import load_early_exit
    from exitwise.tune import tune
    keep_freed_memory()
    test = load_splits("cifar10", data_dir=data_dir, progress=False).test
    test = test.subset(torch.randperm(len(test), generator=torch.Generator().manual_seed(0))[:images])
    model = load_early_exit(model=model_name)
    tuned = tune(model.network, test, "auto", None, device)
    return test, model, tuned, model.prepare(tuned.precision, device)
