"""Moved to `exitwise.study.calibration`; kept for one release."""
from ._moved import moved

moved(__name__, ["exitwise.study.calibration"])
from .study.calibration import *  # noqa: F401,F403
