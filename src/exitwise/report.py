"""Moved to `exitwise.study.report`; kept for one release."""
from ._moved import moved

moved(__name__, ["exitwise.study.report"])
from .study.report import *  # noqa: F401,F403
