"""Moved to `exitwise.config`, `exitwise.device` and `exitwise.tune`; kept for one release."""
from .config import *  # noqa: F401,F403
from .device import *  # noqa: F401,F403
from .tune import *  # noqa: F401,F403
