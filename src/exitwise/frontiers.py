"""Moved to `exitwise.study.frontiers`; kept for one release."""
from ._moved import moved

moved(__name__, ["exitwise.study.frontiers"])
from .study.frontiers import *  # noqa: F401,F403
