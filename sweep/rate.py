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
    """Samples of (time, rows trained by the whole sweep) -> ``rate.json``."""

    def __init__(self, sweep_dir: Path, total: int) -> None:
        self.path, self.total = Path(sweep_dir) / RATE, total
        self.samples: deque[tuple[float, float]] = deque()
        self.written = 0.0

    def sample(self, rows: float, now: float | None = None) -> None:
        """Record the rows trained so far; write the file when it is due (never raises: a
        full disk must not stop training)."""
        now = time.time() if now is None else now
        if self.samples and rows < self.samples[-1][1]:
            self.samples.clear()  # (never, as the counter keeps each run's most: to be safe)
        self.samples.append((now, rows))
        while len(self.samples) > 2 and now - self.samples[0][0] > WINDOW:
            self.samples.popleft()
        if self.total > 0 and now - self.written >= EVERY:  # (0: evaluating only)
            self.written = now
            with contextlib.suppress(OSError):
                atomic_write_json(self.path, self.facts(now))

    def rate(self) -> float | None:
        """Rows per second over the samples kept, None before :data:`MIN_SPAN` of them."""
        (t0, r0), (t1, r1) = self.samples[0], self.samples[-1]
        return (r1 - r0) / (t1 - t0) if t1 - t0 >= MIN_SPAN else None

    def facts(self, now: float) -> dict:
        (t0, _), (t1, rows) = self.samples[0], self.samples[-1]
        rate = self.rate()
        return {
            "time": now,
            "rows": rows,
            "total": self.total,
            "rows_per_s": rate,
            "over_s": t1 - t0,
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
    over) and ``seconds_left`` at that rate (None when it is 0); None without one, or
    without a rate yet."""
    now = time.time() if now is None else now
    try:
        facts = read_json(Path(sweep_dir) / RATE)
        age, rate = now - float(facts["time"]), facts["rows_per_s"]
        left = float(facts["total"]) - float(facts["rows"]) - max(age, 0.0) * rate  # (since)
        over = float(facts["over_s"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if abs(age) > FRESH or not isinstance(rate, (int, float)) or not math.isfinite(rate):
        return None  # (either way: the driver may run on another host, its clock off a bit)
    seconds_left = max(left, 0.0) / rate if rate > 0 else None
    return {"rows_per_s": rate, "over_s": over, "seconds_left": seconds_left}


def words(p: dict) -> str:
    """``training 18.3k rows/s over the last 120 s; about 1:20:00 left at that rate``."""
    from tqdm import tqdm

    said = (
        f"training {tqdm.format_sizeof(p['rows_per_s'])} rows/s over the last {p['over_s']:.0f} s"
    )
    if p["seconds_left"]:
        said += f"; about {tqdm.format_interval(p['seconds_left'])} left at that rate"
    return said
