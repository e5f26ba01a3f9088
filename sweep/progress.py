"""Progress bars: tqdm on a terminal; into a file (a SLURM job's log, ``> run.log``) one plain
line a minute (and one when its caller refreshes, e.g. as an ensemble ends) instead of a
carriage-return redraw several times a second."""

from __future__ import annotations

import sys
from typing import IO, Any

LOG_INTERVAL = 60.0
"""Seconds between progress lines when stderr is not a terminal."""


class _Lines:
    """A file for tqdm that ends every redraw with a newline and drops carriage returns, so
    a log file holds one readable line per update (and no blank clears)."""

    def __init__(self, out: IO[str]):
        self.out = out

    def write(self, s: str) -> None:
        text = s.replace("\r", "").strip()
        if text:
            self.out.write(text + "\n")

    def flush(self) -> None:
        self.out.flush()


def progress_bar(iterable: Any = None, **kw: Any):
    """``tqdm(iterable, **kw)``, written as lines every :data:`LOG_INTERVAL` s outside a terminal."""
    from tqdm.auto import tqdm

    out = sys.stderr
    if not (hasattr(out, "isatty") and out.isatty()):
        kw.setdefault("mininterval", LOG_INTERVAL)
        kw.setdefault("maxinterval", LOG_INTERVAL)  # (else tqdm's monitor redraws every 10 s)
        kw.setdefault("file", _Lines(out))
        kw.setdefault("ascii", True)
    return tqdm(iterable, **kw)
