"""The registry of named models, timm-style: `@register_model("name")` on a factory, `create_model("name")`."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from ..errors import UserError
from .base import MultiExitNetwork

MODELS: dict[str, Callable[[], MultiExitNetwork]] = {}


def register_model(name: str) -> Callable:
    """Decorator: make a factory (a class or function taking no arguments) available by `name` to the CLI and
    the Python API."""
    def add(factory: Callable[[], MultiExitNetwork]) -> Callable[[], MultiExitNetwork]:
        if name in MODELS:
            raise ValueError(f"model {name!r} is registered already")
        MODELS[name] = factory
        return factory
    return add


def create_model(name: str | Path) -> MultiExitNetwork:
    """A new model registered as `name`, which it knows as `model.name`; or the attached model in a folder
    `exitwise attach` wrote, with its weights, named by the folder's absolute path."""
    if str(name) in MODELS:
        model = MODELS[str(name)]()
    else:
        from .attach import is_model_dir, load_attached
        if not is_model_dir(name):
            raise UserError(f"unknown model {str(name)!r} (nor a folder written by exitwise attach); "
                            f"known models: {', '.join(sorted(MODELS))}")
        model, name = load_attached(name), Path(name).resolve()
    model.name = str(name)
    return model
