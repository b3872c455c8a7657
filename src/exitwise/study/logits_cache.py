"""Every exit's logits on the validation and test splits, saved by the study as `logits.safetensors`.

Calibration, sweeps and budgets need only these arrays, so `exitwise calibrate` re-decides
thresholds in seconds without the model or the images. Stored with safetensors: nothing unpickled.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save

from ..errors import UserError, first_line
from ..io import atomic_write_bytes
from .results import Measurements

FILENAME = "logits.safetensors"
ARRAYS = ("val_logits", "val_labels", "test_logits", "test_labels", "exit_macs", "stage_seconds_per_sample")


@dataclass
class ExitLogits:
    val_logits: np.ndarray    # (K, N_val, C) float32
    val_labels: np.ndarray    # (N_val,) int64
    test_logits: np.ndarray   # (K, N_test, C) float32
    test_labels: np.ndarray   # (N_test,) int64
    exit_macs: np.ndarray     # (K,) MACs of a sample leaving at exit k
    stage_seconds_per_sample: np.ndarray  # (K,) measured seconds of stage k and its head, per sample
    measurements: Measurements  # model, dataset, precision, batch size, machine, times (the file's "info")


def save_logits(cache: ExitLogits, path: str | Path) -> None:
    tensors = {name: torch.from_numpy(np.ascontiguousarray(getattr(cache, name))) for name in ARRAYS}
    atomic_write_bytes(path, save(tensors, metadata={"info": json.dumps(cache.measurements.to_json())}))


def load_logits(path: str | Path) -> ExitLogits:
    """Read and check a logits file: shapes that agree, finite logits, labels in range."""
    path = Path(path)
    if path.is_dir():
        path = path / FILENAME
    if not path.is_file():
        raise UserError(f"no logits file at {str(path)!r} (a study's output directory holds {FILENAME})")
    try:
        with safe_open(str(path), framework="np") as f:
            info = Measurements.from_json(json.loads((f.metadata() or {}).get("info", "{}")))
            cache = ExitLogits(**{name: f.get_tensor(name) for name in ARRAYS}, measurements=info)
    except Exception as e:  # a corrupt or foreign file fails in many ways
        raise UserError(f"cannot read logits file {str(path)!r}: {first_line(e, 160)}") from None
    if cache.test_logits.ndim != 3 or cache.val_logits.ndim != 3:
        raise UserError(f"logits file {str(path)!r}: logits must be (exits, samples, classes) arrays")
    k, _, c = cache.test_logits.shape
    if cache.val_logits.shape[0] != k or cache.val_logits.shape[2] != c or len(cache.exit_macs) != k \
            or cache.stage_seconds_per_sample.shape != (k,):
        raise UserError(f"logits file {str(path)!r}: validation and test logits, exit MACs and stage times disagree "
                        "in shape")
    if k < 2 or 0 in (cache.val_logits.shape[1], cache.test_logits.shape[1]):
        raise UserError(f"logits file {str(path)!r}: needs 2 exits or more and samples in both splits, has {k} exits, "
                        f"{cache.val_logits.shape[1]} validation and {cache.test_logits.shape[1]} test samples")
    for name in ("exit_macs", "stage_seconds_per_sample"):
        if not (np.isfinite(getattr(cache, name)) & (getattr(cache, name) >= 0)).all():
            raise UserError(f"logits file {str(path)!r}: {name} must be finite and non-negative")
    for split in ("val", "test"):
        labels, logits = getattr(cache, f"{split}_labels"), getattr(cache, f"{split}_logits")
        if labels.shape != logits.shape[1:2] or labels.min(initial=0) < 0 or labels.max(initial=0) >= c:
            raise UserError(f"logits file {str(path)!r}: {split} labels do not match the logits")
    for name in ("val_logits", "test_logits"):
        if not np.isfinite(getattr(cache, name)).all():
            raise UserError(f"logits file {str(path)!r}: {name} holds NaN or infinite values")
    return cache
