"""Model registry: `create_model(name)`, `load_weights(model, path)` and the weights shipped inside the package."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from ..errors import UserError
from .base import MultiExitNetwork
from .digits_convnet import DigitsConvNet
from .resnet import BResNet
from .seed_branchynet import SeedBranchyNet

MODELS: dict[str, Callable[[], MultiExitNetwork]] = {
    "seed-branchynet": SeedBranchyNet,
    "digits-convnet": DigitsConvNet,
    "b-resnet11": BResNet,
}

SHIPPED_WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"


def register_model(name: str, factory: Callable[[], MultiExitNetwork]) -> None:
    """Make a model available by name to the CLI and the Python API."""
    MODELS[name] = factory


def create_model(name: str) -> MultiExitNetwork:
    if name not in MODELS:
        raise UserError(f"unknown model {name!r}; known models: {', '.join(sorted(MODELS))}")
    return MODELS[name]()


def check_fits(model: MultiExitNetwork, images, dataset: str) -> None:
    """Refuse a data set (an ImageSet: uint8 (N, H, W, C) images and class names) the model cannot take."""
    n, h, w, c = images.images.shape
    if tuple(model.input_shape) != (c, h, w) or model.num_classes != len(images.classes):
        mc, mh, mw = model.input_shape
        raise UserError(f"the model takes {mc}x{mh}x{mw} images of {model.num_classes} classes, but "
                        f"{dataset} has {c}x{h}x{w} images of {len(images.classes)} classes")


def shipped_weights(name: str) -> Path | None:
    """The safetensors file shipped for model `name`, or None if the package carries none."""
    path = SHIPPED_WEIGHTS_DIR / f"{name}.safetensors"
    return path if path.is_file() else None


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read tensors from a .safetensors file or a PyTorch state_dict, never unpickling code."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"weights file not found: {str(path)!r}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            return load_file(str(path), device="cpu")
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt or foreign files raise many different types
        raise UserError(f"cannot read weights {str(path)!r}: {str(e).splitlines()[0][:200]}") from None
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]  # an exitwise training checkpoint
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{str(path)!r} is not a state_dict of tensors")
    return state


def load_weights(model: MultiExitNetwork, path: str | Path) -> MultiExitNetwork:
    """Load a checkpoint into `model`, refusing one with missing, extra or mis-shaped tensors."""
    state = model.convert_state_dict(read_state_dict(path))
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    extra = [k for k in state if k not in expected]
    misshaped = [f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}" for k, v in expected.items()
                 if k in state and state[k].shape != v.shape]
    problems = [f"{label}: {', '.join(names[:6])}{' ...' if len(names) > 6 else ''}"
                for label, names in (("missing", missing), ("unexpected", extra), ("wrong shape", misshaped))
                if names]
    if problems:
        raise UserError(f"weights {str(path)!r} do not fit {type(model).__name__}: " + "; ".join(problems))
    model.load_state_dict(state)
    return model
