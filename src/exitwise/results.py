"""Moved to `exitwise.study.results`; kept for one release."""
from ._moved import moved

moved(__name__, ["exitwise.study.results"])
from .study.results import *  # noqa: F401,F403
