"""Moved to `exitwise.config`, `exitwise.device` and `exitwise.tune`; kept for one release."""
from ._moved import moved

moved(__name__, ["exitwise.config", "exitwise.device", "exitwise.tune"])
from .config import *  # noqa: F401,F403
from .device import *  # noqa: F401,F403
from .tune import *  # noqa: F401,F403
