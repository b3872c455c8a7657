"""Atomic file output (a reader sees the old file or the complete new one, never half of one), and reading back the
JSON files exitwise writes."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from .errors import UserError


def _default_file_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to a temporary file beside `path`, fsync it, then rename it over `path`."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _default_file_mode())  # mkstemp makes 0600; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, allow_nan=False) + "\n")


def ensure_writable_dir(path: str | Path) -> Path:
    """Create `path` if needed and check that files can be written in it, or raise UserError."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=path, prefix=".exitwise-probe-")
        probe.close()
    except OSError as e:
        raise UserError(f"cannot write to output directory {str(path)!r}: {e.strerror or e}") from None
    return path


def check_writable_dir(path: str | Path) -> None:
    """Fail early, creating nothing, if `path` cannot become a directory we can write into."""
    path = Path(path).absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise UserError(f"cannot write to output directory {str(path)!r}: {str(existing)!r} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"cannot write to output directory {str(path)!r}: permission denied")


def check_writable_file(path: str | Path, flag: str) -> None:
    """Fail before any work if the file `path` (given as `flag`) cannot be written: a folder, a folder that does not
    exist, or one that takes no new file (a probe is made and deleted; permissions alone do not say it for root)."""
    path = Path(path)
    why = ("it is a folder" if path.is_dir() else None if path.parent.is_dir()
           else f"no folder {str(path.parent)!r}")
    if why is None:
        try:
            tempfile.NamedTemporaryFile(dir=path.parent, prefix=".exitwise-probe-").close()
        except OSError as e:
            why = f"cannot write in {str(path.parent)!r}: {e.strerror or e}"
    if why:
        raise UserError(f"{flag} {str(path)!r}: {why}; give a file in an existing folder")


@contextmanager
def staged_output(out_dir: str | Path) -> Iterator[Path]:
    """Yield a staging folder; on success move every file in it into `out_dir` (one rename each, in the same
    folder), on failure delete it.

    So a run that fails half-way leaves `out_dir` as it was: no partial results.
    """
    existed = Path(out_dir).exists()
    out = ensure_writable_dir(out_dir)
    stage = Path(tempfile.mkdtemp(dir=out, prefix=".staging-"))
    try:
        yield stage
        for item in sorted(stage.iterdir()):
            if item.is_dir() and (out / item.name).is_dir():
                shutil.rmtree(out / item.name)
            os.replace(item, out / item.name)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        if not existed:
            shutil.rmtree(out, ignore_errors=True)
        raise
    shutil.rmtree(stage, ignore_errors=True)


def file_sha256(*paths: str | Path) -> str:
    """SHA-256 of the files' contents, one after another (a sharded checkpoint hashes as one)."""
    h = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def read_format_json(path: str | Path, fmt: str, what: str, missing: str | None = None) -> dict:
    """A JSON file exitwise wrote, `{"format": fmt, ...}`; refused in one line (`what` names it) when missing
    (`missing`: that line), unreadable or of another format."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(missing or f"no {what} at {str(path)!r}") from None
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {what} {str(path)!r}: {e}") from None
    if not isinstance(doc, dict) or doc.get("format") != fmt:
        raise UserError(f"{str(path)!r} is not an exitwise {what} ({fmt})")
    return doc
