"""Defaults and the choices they are checked against, in one place and torch-free (the CLI and `deploy/` read them)."""
from __future__ import annotations

from .errors import UserError

DEVICES = ("auto", "cpu", "cuda", "mps")
PRECISIONS = ("bf16", "mixed", "fp32")
AGREEMENT_REQUIRED = 0.99  # a reduced precision may change at most 1% of any exit's predictions
DEFAULT_MICRO_BATCH = 64   # used when nothing is measured (tests, explicit runs); best on the AMX machine


def check_precision(precision: str, allow_auto: bool = True) -> str:
    known = ("auto",) * allow_auto + PRECISIONS
    if precision not in known:
        raise UserError(f"unknown precision {precision!r}; choose one of {', '.join(known)}")
    return precision


def check_micro_batch(micro_batch: int | None) -> int | None:
    if micro_batch is not None and micro_batch < 1:
        raise UserError(f"micro-batch must be a positive number of rows, got {micro_batch}")
    return micro_batch
