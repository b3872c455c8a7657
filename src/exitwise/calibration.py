"""Moved to `exitwise.study.calibration`; kept for one release."""
from .study.calibration import *  # noqa: F401,F403
