"""Moved to `exitwise.models.costs`; kept for one release."""
from ._moved import moved

moved(__name__, ["exitwise.models.costs"])
from .models.costs import *  # noqa: F401,F403
