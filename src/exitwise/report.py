"""Moved to `exitwise.study.report`; kept for one release."""
from .study.report import *  # noqa: F401,F403
