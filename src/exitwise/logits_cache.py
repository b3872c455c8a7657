"""Moved to `exitwise.study.logits_cache`; kept for one release."""
from ._moved import moved

moved(__name__, ["exitwise.study.logits_cache"])
from .study.logits_cache import *  # noqa: F401,F403
