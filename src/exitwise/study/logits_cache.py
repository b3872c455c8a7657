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

from ..errors import UserError
from ..io import atomic_write_bytes

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
    info: dict                # model, dataset, precision, batch size


def save_logits(cache: ExitLogits, path: str | Path) -> None:
    tensors = {name: torch.from_numpy(np.ascontiguousarray(getattr(cache, name))) for name in ARRAYS}
    atomic_write_bytes(path, save(tensors, metadata={"info": json.dumps(cache.info)}))


def load_logits(path: str | Path) -> ExitLogits:
    """Read and check a logits file: shapes that agree, finite logits, labels in range."""
    path = Path(path)
    if path.is_dir():
        path = path / FILENAME
    if not path.is_file():
        raise UserError(f"no logits file at {str(path)!r} (a study's output directory holds {FILENAME})")
    try:
        with safe_open(str(path), framework="np") as f:
            info = json.loads((f.metadata() or {}).get("info", "{}"))
            cache = ExitLogits(**{name: f.get_tensor(name) for name in ARRAYS}, info=info)
    except Exception as e:  # a corrupt or foreign file fails in many ways
        raise UserError(f"cannot read logits file {str(path)!r}: {str(e).splitlines()[0][:160]}") from None
    if cache.test_logits.ndim != 3 or cache.val_logits.ndim != 3:
        raise UserError(f"logits file {str(path)!r}: logits must be (exits, samples, classes) arrays")
    k, _, c = cache.test_logits.shape
    if cache.val_logits.shape[0] != k or cache.val_logits.shape[2] != c or len(cache.exit_macs) != k:
        raise UserError(f"logits file {str(path)!r}: validation and test logits disagree in shape")
    for split in ("val", "test"):
        labels, logits = getattr(cache, f"{split}_labels"), getattr(cache, f"{split}_logits")
        if labels.shape != logits.shape[1:2] or labels.min(initial=0) < 0 or labels.max(initial=0) >= c:
            raise UserError(f"logits file {str(path)!r}: {split} labels do not match the logits")
    for name in ("val_logits", "test_logits"):
        if not np.isfinite(getattr(cache, name)).all():
            raise UserError(f"logits file {str(path)!r}: {name} holds NaN or infinite values")
    return cache
