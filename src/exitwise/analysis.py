"""Moved to `exitwise.study.analysis`; kept for one release."""
from ._moved import moved

moved(__name__, ["exitwise.study.analysis"])
from .study.analysis import *  # noqa: F401,F403
