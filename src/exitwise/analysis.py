"""Moved to `exitwise.study.analysis`; kept for one release."""
from .study.analysis import *  # noqa: F401,F403
