"""Moved to `exitwise.study.logits_cache`; kept for one release."""
from .study.logits_cache import *  # noqa: F401,F403
