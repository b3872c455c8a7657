"""The study: measure a model's exits once, analyse the cached arrays (sweeps, calibration, frontiers, the oracle),
verify with real early-exit runs, and report. `run.py` holds the three calls, `config.py` the options (torch-free);
the rest are its parts. `exitwise.study.run_study` etc. load `run` (and torch) on first use."""
from .config import DEFAULT_DESIRED, CalibrateConfig, StudyConfig  # noqa: F401

_RUN = ("Evaluator", "Study", "analyse", "calibration_table", "choose", "measure", "oracle_report", "run_study",
        "seconds_per_sample", "software_versions", "target_calibration", "time_stages", "timing_subset", "verify",
        "write_study")


def __getattr__(name: str):
    if name in _RUN:
        from . import run
        return getattr(run, name)
    raise AttributeError(f"module 'exitwise.study' has no attribute {name!r}")
