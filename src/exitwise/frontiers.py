"""Moved to `exitwise.study.frontiers`; kept for one release."""
from .study.frontiers import *  # noqa: F401,F403
