"""Moved to `exitwise.deploy.onnx_runtime` (its manifest to `exitwise.deploy.manifest`, its numpy scores to
`exitwise.exit_rule`); kept for one release."""
from ._moved import moved

moved(__name__, ["exitwise.deploy.manifest", "exitwise.deploy.onnx_runtime", "exitwise.exit_rule"])
from .deploy.manifest import *  # noqa: F401,F403
from .deploy.onnx_runtime import *  # noqa: F401,F403
from .exit_rule import *  # noqa: F401,F403
