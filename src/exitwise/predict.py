"""Moved to `exitwise.deploy.predict`; kept for one release."""
from .deploy.predict import *  # noqa: F401,F403
