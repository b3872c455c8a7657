"""Moved to `exitwise.models.attach`; kept for one release."""
from ._moved import moved

moved(__name__, ["exitwise.models.attach"])
from .models.attach import *  # noqa: F401,F403
