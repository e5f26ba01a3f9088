"""The sweep's training rate and the time it has left, for ``sweep status``.

The driver's progress bar shows both, but only on the driver's terminal. A researcher asks
from another one (a login node, while a SLURM job trains): the driver measures the rows its
ensembles trained over the last minutes (:class:`RateMeter`) and writes them to
``SWEEP_DIR/rate.json`` every few seconds; ``sweep status`` shows them while that driver is
alive and the file is fresh (:func:`pace`, :func:`words`). The file is the driver's alone and is
removed when it ends.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections import deque
from pathlib import Path

from sweep.io import atomic_write_json, read_json

RATE = "rate.json"
WINDOW = 120.0
"""Seconds of progress the rate is measured over."""
EVERY = 10.0
"""Seconds between writes of the file."""
FRESH = 60.0
"""A file older than this is not shown (its driver is stuck, or its clock is off)."""
MIN_SPAN = 5.0
"""Seconds of samples needed before a rate is said."""


class RateMeter:
    """Samples of (time, rows trained by the whole sweep, their work) -> ``rate.json``.

    The work is the rows weighted by what a row of their run costs (its dictionary's size):
    ensembles of one size after another train at different row rates (the largest first), so
    the time left is paced by work, ``work_total`` in all; the rate said stays in rows."""

    def __init__(self, sweep_dir: Path, total: int, work_total: float | None = None) -> None:
        self.path, self.total = Path(sweep_dir) / RATE, total
        self.work_total = float(total if work_total is None else work_total)
        self.samples: deque[tuple[float, float, float]] = deque()
        self.written = 0.0

    def sample(self, rows: float, now: float | None = None, work: float | None = None) -> None:
        """Record the rows trained so far (and their work: the rows where not given); write the
        file when it is due (never raises: a full disk must not stop training)."""
        now = time.time() if now is None else now
        if self.samples and rows < self.samples[-1][1]:
            self.samples.clear()  # (never, as the counter keeps each run's most: to be safe)
        self.samples.append((now, rows, rows if work is None else work))
        while len(self.samples) > 2 and now - self.samples[0][0] > WINDOW:
            self.samples.popleft()
        if self.total > 0 and now - self.written >= EVERY:  # (0: evaluating only)
            self.written = now
            with contextlib.suppress(OSError):
                atomic_write_json(self.path, self.facts(now))

    def rate(self, of: int = 1) -> float | None:
        """Rows (``of=2``: work) per second over the samples kept, None before
        :data:`MIN_SPAN` of them."""
        first, last = self.samples[0], self.samples[-1]
        span = last[0] - first[0]
        return (last[of] - first[of]) / span if span >= MIN_SPAN else None

    def seconds_left(self) -> float | None:
        """At the work's rate over the samples kept (None before it has one, or at 0)."""
        rate = self.rate(of=2) if self.samples else None
        return max(self.work_total - self.samples[-1][2], 0.0) / rate if rate else None

    def facts(self, now: float) -> dict:
        (t0, _, _), (t1, rows, work) = self.samples[0], self.samples[-1]
        return {
            "time": now,
            "rows": rows,
            "total": self.total,
            "rows_per_s": self.rate(),
            "over_s": t1 - t0,
            "work": work,
            "work_total": self.work_total,
            "work_per_s": self.rate(of=2),
        }

    def __enter__(self) -> RateMeter:
        return self

    def __exit__(self, *_: object) -> None:
        """The driver's training ended: the file goes with it."""
        forget(self.path.parent)


def forget(sweep_dir: Path) -> None:
    """A driver that starts removes the file a killed one left (status would show its rate
    until it went stale)."""
    with contextlib.suppress(OSError):
        (Path(sweep_dir) / RATE).unlink(missing_ok=True)


def pace(sweep_dir: Path, now: float | None = None) -> dict | None:
    """From a fresh ``rate.json``: ``rows_per_s``, ``over_s`` (the seconds it was measured
    over) and ``seconds_left`` at the pace of its work (None when it is 0); None without
    one, or without a rate yet."""
    now = time.time() if now is None else now
    try:
        facts = read_json(Path(sweep_dir) / RATE)
        age, rate, over = now - float(facts["time"]), facts["rows_per_s"], float(facts["over_s"])
        work_rate = float(facts["work_per_s"] or 0.0)
        left = float(facts["work_total"]) - float(facts["work"]) - max(age, 0.0) * work_rate
    except (OSError, ValueError, KeyError, TypeError):  # (since written: left out above)
        return None
    if abs(age) > FRESH or not isinstance(rate, (int, float)) or not math.isfinite(rate):
        return None  # (either way: the driver may run on another host, its clock off a bit)
    fits = work_rate > 0 and math.isfinite(work_rate)
    seconds_left = max(left, 0.0) / work_rate if fits else None
    return {"rows_per_s": rate, "over_s": over, "seconds_left": seconds_left}


def words(p: dict) -> str:
    """``training 18.3k rows/s over the last 120 s; about 1:20:00 left at that rate``."""
    from tqdm import tqdm

    said = (
        f"training {tqdm.format_sizeof(p['rows_per_s'])} rows/s over the last {p['over_s']:.0f} s"
    )
    if p["seconds_left"]:
        said += f"; about {interval(p['seconds_left'])} left at that rate"
    return said


def interval(seconds: float) -> str:
    """``01:20:00``, as tqdm writes times."""
    from tqdm import tqdm

    return tqdm.format_interval(seconds)
