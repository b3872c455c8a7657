"""Moved to `exitwise.study.results`; kept for one release."""
from .study.results import *  # noqa: F401,F403
