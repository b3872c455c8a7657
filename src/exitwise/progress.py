"""Progress bars for long work: shown on a terminal, silent in logs and pipes (no carriage-return residue)."""
from __future__ import annotations

from tqdm import tqdm


def progress_bar(iterable=None, *, enabled: bool = True, **kwargs) -> tqdm:
    """A tqdm bar when `enabled` and stderr is a terminal (tqdm's disable=None); otherwise a silent pass-through."""
    return tqdm(iterable, disable=None if enabled else True, **kwargs)
