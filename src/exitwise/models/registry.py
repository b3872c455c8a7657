"""The registry of named models, timm-style: `@register_model("name")` on a factory, `create_model("name")`."""
from __future__ import annotations

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


def create_model(name: str) -> MultiExitNetwork:
    """A new model registered as `name`, which it knows as `model.name`."""
    if name not in MODELS:
        raise UserError(f"unknown model {name!r}; known models: {', '.join(sorted(MODELS))}")
    model = MODELS[name]()
    model.name = name
    return model
