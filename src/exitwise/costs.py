"""Moved to `exitwise.models.costs`; kept for one release."""
from .models.costs import *  # noqa: F401,F403
