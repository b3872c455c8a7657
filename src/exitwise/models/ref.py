"""Which network, with which weights: a registered name or a folder `exitwise attach` wrote, resolved in one place.

`load_model(name, weights)` opens what a user names (weights given, shipped, or an attached folder's own) and returns
the network with its `ModelRef`; `load_network(ref)` rebuilds the network a saved `ModelRef` names (a study's logits,
an early_exit.json), refusing weights that are missing or changed since. `ModelRef` itself is torch-free, in
`exitwise.refs` (re-exported here).
"""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import UserError
from ..io import file_sha256
from ..refs import ModelRef
from .attach import ATTACHED_WEIGHTS, is_model_dir, load_attached
from .base import MultiExitNetwork
from .registry import MODELS
from .weights import check_unchanged, load_weights, shipped_weights, weight_files


def create_model(name: str | Path) -> MultiExitNetwork:
    """A new model registered as `name`, which it knows as `model.name`; or the attached model in a folder
    `exitwise attach` wrote, with its weights, named by the folder's absolute path."""
    if not isinstance(name, (str, Path)):
        raise TypeError(f"create_model takes a registered model's name or an attached model's folder, got "
                        f"{type(name).__name__} {name!r}")
    if str(name) in MODELS:
        model = MODELS[str(name)]()
        if not isinstance(model, MultiExitNetwork):
            raise TypeError(f"the factory registered as model {str(name)!r} returned {type(model).__name__}, not a "
                            "MultiExitNetwork (stages and heads; exitwise.attach makes one of any nn.Module)")
    else:
        if (Path(name) / ATTACHED_WEIGHTS).is_file() and not is_model_dir(name):
            raise UserError(f"{str(name)!r} holds trained weights (exitwise train), not an attached model: give "
                            f"--model {_trained_network(name)} --weights {str(Path(name) / ATTACHED_WEIGHTS)!r}")
        if not is_model_dir(name):
            raise UserError(f"unknown model {str(name)!r} (nor a folder written by exitwise attach); "
                            f"known models: {', '.join(sorted(MODELS))}")
        model, name = load_attached(name), Path(name).resolve()
    model.name = str(name)
    return model


def _trained_network(folder: str | Path) -> str:
    """The registered network a training run's folder holds weights of, as its card names it (else NAME)."""
    try:
        name = json.loads((Path(folder) / "model.json").read_text())["model"]
    except (OSError, ValueError, KeyError, TypeError):
        return "NAME"
    return name if isinstance(name, str) and name in MODELS else "NAME"


def model_key(name: str | Path) -> str:
    """How saved files name a model: a registered name as it is, an attached folder by its absolute path (as
    `create_model` names it), so a relative `--model-dir a1` matches what a study or calibration wrote."""
    return str(name) if str(name) in MODELS or not is_model_dir(name) else str(Path(name).resolve())


def _own_weights(name: str | Path, weights: str | Path | None) -> bool:
    """Whether these are an attached folder's own weights, which `create_model` loads with the folder."""
    if str(name) in MODELS or not is_model_dir(name):
        return False
    return weights is None or Path(weights).resolve() == (Path(name) / ATTACHED_WEIGHTS).resolve()


def load_model(name: str | Path, weights: str | Path | None = None) -> tuple[MultiExitNetwork, ModelRef]:
    """A registered model with its weights (given, or shipped with the package), or the attached model in a folder
    `exitwise attach` wrote (its own weights), and the `ModelRef` that names it."""
    if _own_weights(name, weights):
        model = create_model(name)
        path = Path(name) / ATTACHED_WEIGHTS
        return model, ModelRef(model.name, str(path), file_sha256(path), False, model.num_exits)
    model = create_model(name)
    path = Path(weights) if weights is not None else shipped_weights(str(name))
    if path is None:
        raise UserError(f"no weights ship with model {str(name)!r}: pass --weights FILE")
    load_weights(model, path)
    return model, ModelRef(str(name), str(path), file_sha256(*weight_files(path)), weights is None, model.num_exits)


def load_network(ref: ModelRef, named_by: str) -> MultiExitNetwork:
    """The network a saved `ModelRef` names, its weights checked unchanged by SHA-256 first (`named_by`: the file
    that records it, for the message)."""
    check_unchanged(ref.weights, ref.weights_sha256, named_by)
    network = create_model(ref.name)
    if not _own_weights(ref.name, ref.weights):
        load_weights(network, ref.weights)
    if network.num_exits != ref.num_exits:
        raise UserError(f"{named_by!r} names {ref.name!r} with {ref.num_exits} exits; it has {network.num_exits}")
    return network


def reference(name: str, weights: str | Path, weights_sha256: str | None, num_exits: int) -> ModelRef:
    """The `ModelRef` of weights a saved file names by path (and SHA-256, else hashed now)."""
    if weights_sha256 is None and not Path(weights).is_file():
        raise UserError(f"weights file not found: {str(weights)!r}")
    shipped = shipped_weights(name) if name in MODELS else None
    return ModelRef(name, str(weights), weights_sha256 or file_sha256(*weight_files(weights)),
                    shipped is not None and shipped.resolve() == Path(weights).resolve(), num_exits)
