"""The warning an old import path gives (the top-level modules that moved into `models/`, `study/` and `deploy/`)."""
import warnings


def moved(old: str, new: list[str]) -> None:
    """Warn (once per process: a module runs once) that module `old` moved to `new` and goes in the next release.
    The warning names the line that imported it (`warnings` skips importlib's frames)."""
    where = ", ".join(new[:-1]) + " and " + new[-1] if len(new) > 1 else new[0]
    warnings.warn(f"{old} moved to {where}; the old path goes in the next release", DeprecationWarning, stacklevel=3)
