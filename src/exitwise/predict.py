"""Moved to `exitwise.deploy.predict`; kept for one release."""
from ._moved import moved

moved(__name__, ["exitwise.deploy.predict"])
from .deploy.predict import *  # noqa: F401,F403
