"""Moved to `exitwise.deploy.onnx_runtime` (its numpy scores to `exitwise.exit_rule`); kept for one release."""
from .deploy.onnx_runtime import *  # noqa: F401,F403
from .exit_rule import *  # noqa: F401,F403
