"""Progress bars: tqdm on a terminal; into a file (a SLURM job's log, ``> run.log``) one plain
line a minute (and one when its caller refreshes, e.g. as an ensemble ends) instead of a
carriage-return redraw several times a second."""

from __future__ import annotations

import math
import re
import sys
import time
from typing import IO, Any

LOG_INTERVAL = 60.0
"""Seconds between progress lines when stderr is not a terminal."""
REPEAT_AFTER = LOG_INTERVAL / 2
"""Seconds after which a line alike the last but for its times and rates is written anyway."""


class _Lines:
    """A file for tqdm that ends every redraw with a newline and drops carriage returns, so
    a log file holds one readable line per update (no blank clears, and not a line alike
    but for its times and rates right after another: a refresh and the close that follows
    it draw the same; a minute's line is written even when its count has not moved)."""

    def __init__(self, out: IO[str]):
        self.out = out
        self.last, self.when = "", -math.inf

    def write(self, s: str) -> None:
        text = s.replace("\r", "").strip()
        gist, now = _gist(text), time.monotonic()
        if text and (gist != self.last or now - self.when >= REPEAT_AFTER):
            self.out.write(text + "\n")
            self.last, self.when = gist, now

    def flush(self) -> None:
        self.out.flush()


_CLOCK = re.compile(r"\d+:\d{2}(:\d{2})?|[\d.?]+\s?[a-zA-Z]+/[a-zA-Z]+")
"""Times (``01:02``) and rates (``4.2krow/s``, ``?it/s``, ``3.1s/it``) in a bar's line."""


def _gist(line: str) -> str:
    """A bar's line without its times and rates: two lines alike but for them say the same."""
    return _CLOCK.sub("", line)


def progress_bar(iterable: Any = None, **kw: Any):
    """``tqdm(iterable, **kw)``, written as lines every :data:`LOG_INTERVAL` s outside a terminal."""
    from tqdm.auto import tqdm

    out = sys.stderr
    if not (hasattr(out, "isatty") and out.isatty()):
        kw.setdefault("mininterval", LOG_INTERVAL)
        kw.setdefault("maxinterval", LOG_INTERVAL)  # (else tqdm's monitor redraws every 10 s)
        kw.setdefault("file", _Lines(out))
        kw.setdefault("ascii", True)
        kw["leave"] = True  # (a file cannot be cleared: its last line says how the bar ended)
    return tqdm(iterable, **kw)
