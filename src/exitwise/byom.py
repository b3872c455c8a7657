"""Moved to `exitwise.models.attach`; kept for one release."""
from .models.attach import *  # noqa: F401,F403
