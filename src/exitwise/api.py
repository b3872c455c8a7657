"""The Python API behind the CLI: each function does one user-level job from names and paths."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from .data import Splits, load_splits
from .io import check_writable_dir
from .errors import UserError
from .models import create_model, load_weights, shipped_weights
from .models.base import MultiExitNetwork
from .study import DEFAULT_DESIRED, StudyConfig, file_sha256, run_study, write_study


def load_model(name: str, weights: str | Path | None = None) -> tuple[MultiExitNetwork, dict]:
    """A registered model with its weights (given, or shipped with the package), and a description of both."""
    model = create_model(name)
    path = Path(weights) if weights is not None else shipped_weights(name)
    if path is None:
        raise UserError(f"no weights ship with model {name!r}: pass --weights FILE")
    load_weights(model, path)
    return model, {"name": name, "weights": str(path), "weights_sha256": file_sha256(path),
                   "shipped": weights is None, "num_exits": model.num_exits}


def study(*, dataset: str, data_dir: str | Path | None, model: str, out: str | Path,
          weights: str | Path | None = None, download: bool = False, cutoff: float = 0.6,
          desired_accuracies: Sequence[float] | None = None, methods: Sequence[str] | None = None,
          batch_size: int = 256, precision: str = "bf16", val_size: int | None = None,
          split_seed: int = 0, progress: bool = True) -> dict:
    """Run the whole early-exit study and write results.json, plots and reports into `out`."""
    config = StudyConfig(cutoff=cutoff, desired_accuracies=tuple(desired_accuracies or DEFAULT_DESIRED),
                         methods=tuple(methods or ("per-exit", "seed-percentile")), batch_size=batch_size,
                         precision=precision, progress=progress)
    check_writable_dir(out)  # fail before the long work, not after it
    net, info = load_model(model, weights)
    splits = load_splits(dataset, data_dir, download=download, val_size=val_size,
                         split_seed=split_seed, progress=progress)
    check_fits(net, splits, model)
    done = run_study(net, splits, config, info)
    write_study(done, out)
    return done.results


def check_fits(net: MultiExitNetwork, splits: Splits, name: str) -> None:
    n, h, w, c = splits.test.images.shape
    if net.num_classes != len(splits.test.classes) or tuple(net.input_shape) != (c, h, w):
        mc, mh, mw = net.input_shape
        raise UserError(f"model {name!r} takes {mc}x{mh}x{mw} images of {net.num_classes} classes, "
                        f"but {splits.dataset} has {c}x{h}x{w} images of {len(splits.test.classes)} classes")


# digits are 8x8 and not mirror-symmetric: a 1-pixel crop jitter and no flips; 30 epochs take seconds
TRAIN_DEFAULTS = {"digits": {"crop_padding": 1, "flip": False, "epochs": 30, "batch_size": 64, "lr": 0.05}}


def train(*, dataset: str, data_dir: str | Path | None, model: str, out: str | Path,
          resume: str | Path | None = None, download: bool = False, val_size: int | None = None,
          split_seed: int = 0, progress: bool = True, **recipe) -> dict | None:
    """Train a registered model on a dataset's train split; returns the model card (None on ranks > 0)."""
    from .train import TrainConfig, train as run_training
    check_writable_dir(out)
    net = create_model(model)
    splits = load_splits(dataset, data_dir, download=download, val_size=val_size, split_seed=split_seed,
                         progress=progress)
    check_fits(net, splits, model)
    config = None if resume is not None and not recipe else TrainConfig(**{**TRAIN_DEFAULTS.get(dataset, {}), **recipe})
    return run_training(net, splits, config, out, resume=resume, progress=progress, model_name=model)
