"""The registry of named models, timm-style: `@register_model("name")` on a factory (`ref.create_model` builds one)."""
from __future__ import annotations

from typing import Callable

from .base import MultiExitNetwork

MODELS: dict[str, Callable[[], MultiExitNetwork]] = {}


def register_model(name: str) -> Callable:
    """Decorator: make a factory (a class or function taking no arguments) available by `name` to the CLI and
    the Python API."""
    if not isinstance(name, str):  # `@register_model` bare, as timm's is used: the factory came as the name
        raise TypeError(f"register_model takes the model's name: @register_model(\"my-net\"), got "
                        f"{getattr(name, '__name__', type(name).__name__)}")

    def add(factory: Callable[[], MultiExitNetwork]) -> Callable[[], MultiExitNetwork]:
        if name in MODELS:
            raise ValueError(f"model {name!r} is registered already")
        MODELS[name] = factory
        return factory
    return add
