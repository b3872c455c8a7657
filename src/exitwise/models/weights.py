"""Weights I/O: `load_weights(model, path)`, (sharded) checkpoints read and written, the weights shipped in the package.

Weights are one .safetensors file or, past a size limit, shards indexed as Hugging Face does it
(`NAME.safetensors.index.json` mapping each tensor to its `NAME-0000i-of-0000n.safetensors` shard).
"""
from __future__ import annotations

import json
import pickle
import warnings
from functools import cache
from pathlib import Path

import torch

from ..errors import UserError, first_line
from .base import MultiExitNetwork
from .card import CalibratedSetting, ModelCard
from .registry import MODELS

SHIPPED_WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"
INDEX_SUFFIX = ".safetensors.index.json"
MAX_SHARD_BYTES = 6 << 20  # shipped files stay under the repository's 8 MiB limit


def check_fits(model: MultiExitNetwork, images, dataset: str, classes: bool = True) -> None:
    """Refuse a data set (an ImageSet: uint8 (N, H, W, C) images and class names) the model cannot take: images of
    another shape, or (with `classes`, for what is scored against labels) another number of classes."""
    n, h, w, c = images.images.shape
    if tuple(model.input_shape) != (c, h, w) or classes and model.num_classes != len(images.classes):
        mc, mh, mw = model.input_shape
        of = (lambda k: f" of {k} classes") if classes else (lambda k: "")
        raise UserError(f"the model takes {mc}x{mh}x{mw} images{of(model.num_classes)}, but "
                        f"{dataset} has {c}x{h}x{w} images{of(len(images.classes))}")


def shipped_weights(name: str) -> Path | None:
    """The safetensors file (or shard index) shipped for model `name`, or None if the package carries none."""
    for path in (SHIPPED_WEIGHTS_DIR / f"{name}.safetensors", SHIPPED_WEIGHTS_DIR / f"{name}{INDEX_SUFFIX}"):
        if path.is_file():
            return path
    return None


@cache  # package data: read once per process (a server's start asks for its setting, classes and agreement)
def shipped_card(name: str) -> ModelCard:
    """The model card (recipe, per-exit accuracy, MACs) shipped beside model `name`'s weights."""
    return ModelCard.from_json(json.loads((SHIPPED_WEIGHTS_DIR / f"{name}.json").read_text()))


def calibrated_setting(name: str, weights: str | Path | None = None) -> CalibratedSetting | None:
    """The early-exit setting chosen on validation for model `name`'s shipped weights, as its card carries it
    (`scripts/card_calibrated.py`); None for other `weights` or a card without one."""
    if weights is not None or name not in MODELS or not shipped_weights(name):
        return None
    return shipped_card(name).calibrated


def shipped_classes(name: str) -> tuple[str, ...] | None:
    """The class names of the data set model `name`'s shipped weights were trained on (None: no weights ship)."""
    if name not in MODELS or not shipped_weights(name):
        return None
    return shipped_card(name).dataset.classes


def shipped_models(dataset: str) -> list[str]:
    """Registered models whose shipped weights were trained on `dataset` (by their model card)."""
    return [n for n in MODELS if shipped_weights(n) and shipped_card(n).dataset.name == dataset]


def _shard_map(index: Path) -> dict[str, str]:
    """An index's tensor -> shard file map, refusing shards that are not .safetensors files beside it."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        shards = set(weight_map.values())
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise UserError(f"cannot read shard index {str(index)!r}: {e}") from None
    bad = [s for s in shards if not (isinstance(s, str) and s.endswith(".safetensors") and Path(s).name == s)]
    if bad:
        raise UserError(f"shard index {str(index)!r} names {bad[0]!r}: shards are .safetensors files beside it")
    return weight_map


def _shards(index: Path, weight_map: dict[str, str]) -> list[Path]:
    return [index.parent / name for name in sorted(set(weight_map.values()))]


def weight_files(path: str | Path) -> list[Path]:
    """Every file that makes up the weights at `path`: the file itself, or a shard index and its shards."""
    path = Path(path)
    if not path.name.endswith(INDEX_SUFFIX):
        return [path]
    return [path] + _shards(path, _shard_map(path))


def check_unchanged(path: str | Path, sha256: str, named_by: str) -> None:
    """Refuse weights that a saved file (`named_by`) names by path and SHA-256 when they are missing or changed."""
    from ..io import file_sha256
    files = weight_files(path) if Path(path).is_file() else []  # a shard index and its shards, each one there
    if not files or not all(f.is_file() for f in files) or file_sha256(*files) != sha256:
        raise UserError(f"{named_by!r} names weights {str(path)!r} that are missing or changed (SHA-256 differs)")


def save_sharded(state: dict[str, torch.Tensor], index_path: str | Path, metadata: dict[str, str] | None = None,
                 max_shard_bytes: int = MAX_SHARD_BYTES) -> list[Path]:
    """Write `state` as safetensors shards of at most `max_shard_bytes` of tensor data, then their index.

    Each file is written atomically, the index last; overwriting a sharded checkpoint in place is not
    atomic as a whole (a crash can leave new shards beside the old index): write to a fresh directory."""
    from safetensors.torch import save
    from ..io import atomic_write_bytes, atomic_write_json
    index_path = Path(index_path)
    if not index_path.name.endswith(INDEX_SUFFIX):
        raise ValueError(f"a shard index is named NAME{INDEX_SUFFIX}, not {index_path.name}")
    groups: list[list[str]] = [[]]
    size = 0
    for key, tensor in state.items():
        if groups[-1] and size + tensor.nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(key)
        size += tensor.nbytes
    stem = index_path.name[:-len(INDEX_SUFFIX)]
    names = [f"{stem}-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    for name, keys in zip(names, groups):
        atomic_write_bytes(index_path.parent / name, save({k: state[k].contiguous() for k in keys}, metadata=metadata))
    total = sum(t.nbytes for t in state.values())
    atomic_write_json(index_path, {"metadata": {"total_size": total, **(metadata or {})},
                                   "weight_map": {k: name for name, keys in zip(names, groups) for k in keys}})
    return [index_path.parent / name for name in names]


def read_torch_file(path: str | Path, what: str):
    """What a `torch.save` file holds, read with `weights_only=True` (tensors and plain containers); refused in one
    line (`what`: the file's role) when it is not one, or holds other Python objects, which are never unpickled."""
    try:
        with warnings.catch_warnings():  # torch warns of a pickle protocol before it refuses the file
            warnings.simplefilter("ignore")
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # torch's own message advises weights_only=False: running the file's code
        raise UserError(f"cannot read {what} {str(path)!r}: not a file of tensors (a pickle of other Python "
                        "objects is refused, never unpickled)") from None
    except Exception as e:  # truncated, corrupt or foreign files raise many different types
        why = str(e).strip() and first_line(e)
        raise UserError(f"cannot read {what} {str(path)!r}: not a file torch.load reads ({type(e).__name__}"
                        f"{': ' + why if why else ''})") from None


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read tensors from a .safetensors file, a shard index or a PyTorch state_dict, never unpickling code."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"weights {str(path)!r} is a folder: give the weights file in it (.safetensors, a shard index "
                        f"NAME{INDEX_SUFFIX} or a PyTorch state_dict)")
    if not path.is_file():
        raise UserError(f"weights file not found: {str(path)!r}")
    if path.name.endswith(INDEX_SUFFIX):
        weight_map = _shard_map(path)
        state = {}
        for shard in _shards(path, weight_map):
            state.update(read_state_dict(shard))
        missing = set(weight_map) - set(state)
        if missing:
            raise UserError(f"the shards of {str(path)!r} lack {len(missing)} tensors, e.g. {sorted(missing)[0]!r}")
        return state
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        try:
            return load_file(str(path), device="cpu")
        except Exception as e:  # corrupt or foreign files raise many different types
            raise UserError(f"cannot read weights {str(path)!r}: {first_line(e)}") from None
    state = read_torch_file(path, "weights")
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]  # an exitwise training checkpoint
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{str(path)!r} is not a state_dict of tensors")
    return state


def load_weights(model: MultiExitNetwork, path: str | Path) -> MultiExitNetwork:
    """Load a checkpoint into `model`, refusing one with missing, extra or mis-shaped tensors."""
    state = model.convert_state_dict(read_state_dict(path))
    check_state_fits(model, state, path)
    model.load_state_dict(state)
    return model


def check_state_fits(model: torch.nn.Module, state: dict[str, torch.Tensor], path: str | Path) -> None:
    """Refuse a state dict with missing, extra or mis-shaped tensors, naming them."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    extra = [k for k in state if k not in expected]
    misshaped = [f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}" for k, v in expected.items()
                 if k in state and state[k].shape != v.shape]
    # load_state_dict would cast integers into float parameters: right names and shapes, silently wrong answers
    mistyped = [f"{k} {state[k].dtype} for {v.dtype}" for k, v in expected.items()
                if k in state and (state[k].is_floating_point(), state[k].is_complex())
                != (v.is_floating_point(), v.is_complex())]
    problems = [f"{label}: {', '.join(names[:6])}{' ...' if len(names) > 6 else ''}"
                for label, names in (("missing", missing), ("unexpected", extra), ("wrong shape", misshaped),
                                     ("wrong kind of number", mistyped))
                if names]
    if problems:
        raise UserError(f"weights {str(path)!r} do not fit {type(model).__name__}: " + "; ".join(problems))
