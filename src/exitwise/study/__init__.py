"""The study: measure a model's exits once, analyse the cached arrays (sweeps, calibration, frontiers, the oracle),
verify with real early-exit runs, and report. `run.py` holds the three calls; the rest are its parts."""
from .run import (DEFAULT_DESIRED, Study, StudyConfig, analyse, measure, run_study, software_versions, time_stages,
                  timing_subset, verify, write_study)

__all__ = ["DEFAULT_DESIRED", "Study", "StudyConfig", "analyse", "measure", "run_study", "software_versions",
           "time_stages", "timing_subset", "verify", "write_study"]
