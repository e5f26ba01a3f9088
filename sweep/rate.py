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
    """Samples of (time, rows trained by the whole sweep, their work, each run's rows) ->
    ``rate.json``.

    The work is the rows weighted by what a row of their run costs (its dictionary's size):
    ensembles of one size after another train at different row rates (the largest first), so
    the time left is paced by work, ``work_total`` in all; the rate said stays in rows. Where
    ensembles train side by side (one on each GPU) the sweep lasts as long as its slowest: the
    time left is never less than the longest any running run needs at its own rate
    (``run_totals``: the rows each run trains in all)."""

    def __init__(
        self,
        sweep_dir: Path,
        total: int,
        work_total: float | None = None,
        run_totals: dict[str, float] | None = None,
    ) -> None:
        self.path, self.total = Path(sweep_dir) / RATE, total
        self.work_total = float(total if work_total is None else work_total)
        self.run_totals = dict(run_totals or {})
        self.samples: deque[tuple[float, float, float]] = deque()
        self.moves: dict[str, deque[tuple[int, float, float]]] = {}
        """Each run's (sample number, time, rows) at every sample kept where its rows grew:
        kept as samples come, so the time left costs the runs moving, not every run times
        every sample."""
        self.last: dict[str, float] = {}
        self.count = 0
        """Samples taken: the kept ones are the last ``len(samples)`` of them."""
        self.written = 0.0

    def sample(
        self,
        rows: float,
        now: float | None = None,
        work: float | None = None,
        runs: dict[str, float] | None = None,
    ) -> None:
        """Record the rows trained so far (their work: the rows where not given; ``runs``: each
        run's); write the file when it is due (never raises: a full disk must not stop
        training)."""
        now = time.time() if now is None else now
        if self.samples and rows < self.samples[-1][1]:
            self._restart()  # (never, as the counter keeps each run's most: to be safe)
        if self.samples and rows == self.samples[0][1] == self.samples[-1][1]:
            self._restart()  # nothing trained since the window began (start-up: Ray,
            # workers, compiles; or a pause as long): the rate starts again at the next rows
        self._note_moves(now, runs or {})
        self.samples.append((now, rows, rows if work is None else work))
        self.count += 1
        while len(self.samples) > 2 and now - self.samples[0][0] > WINDOW:
            self.samples.popleft()
        self._forget_moves_before(self.count - len(self.samples))
        if self.total > 0 and now - self.written >= EVERY:  # (0: evaluating only)
            self.written = now
            with contextlib.suppress(OSError):
                atomic_write_json(self.path, self.facts(now))

    def _restart(self) -> None:
        self.samples.clear()
        self.moves.clear()
        self.last = {}

    def _note_moves(self, now: float, runs: dict[str, float]) -> None:
        """A run moved where its rows grew since the sample before (the window's first
        sample is no move: nothing before it is compared)."""
        for run, rows in runs.items():
            before = self.last.get(run)
            if before is not None and rows > before:
                self.moves.setdefault(run, deque()).append((self.count, now, rows))
        self.last = dict(runs)

    def _forget_moves_before(self, first: int) -> None:
        """Moves at or before the window's first sample (by number: a clock may repeat or go
        back) are out of it."""
        for run in list(self.moves):
            moves = self.moves[run]
            while moves and moves[0][0] <= first:
                moves.popleft()
            if not moves:
                del self.moves[run]

    def span(self) -> float:
        return self.samples[-1][0] - self.samples[0][0] if self.samples else 0.0

    def rate(self, of: int = 1) -> float | None:
        """Rows (``of=2``: work) per second over the samples kept, None before
        :data:`MIN_SPAN` of them."""
        first, last = self.samples[0], self.samples[-1]
        return (last[of] - first[of]) / self.span() if self.span() >= MIN_SPAN else None

    def seconds_left(self) -> float | None:
        """At the work's rate over the samples kept, and no less than the longest a running
        run needs at its own rate (None before it has a rate, or at 0)."""
        rate = self.rate(of=2) if self.samples else None
        if not rate:
            return None
        return max(max(self.work_total - self.samples[-1][2], 0.0) / rate, self._slowest_run())

    def _slowest_run(self) -> float:
        """Seconds the run needing the longest at its own rate needs. Its rate runs from its
        first move in the window to its last: not over the part of the window it waited for
        its turn, nor the time since its last report (a run reports every few steps, not every
        sample)."""
        longest = 0.0
        for run, moves in self.moves.items():
            total = self.run_totals.get(run)
            if total is None or len(moves) < 2:
                continue  # (only begun: no rate of its own yet)
            (_, t0, r0), (_, t1, r1) = moves[0], moves[-1]
            longest = max(longest, max(total - r1, 0.0) * (t1 - t0) / (r1 - r0))
        return longest

    def facts(self, now: float) -> dict:
        _, rows, work = self.samples[-1]
        return {
            "time": now,
            "rows": rows,
            "total": self.total,
            "rows_per_s": self.rate(),
            "over_s": self.span(),
            "work": work,
            "work_total": self.work_total,
            "seconds_left": self.seconds_left(),
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
    over) and ``seconds_left`` as the driver judged it when it wrote the file, less the time
    since (None when it had none); None without one, or without a rate yet."""
    now = time.time() if now is None else now
    try:
        facts = read_json(Path(sweep_dir) / RATE)
        age, rate, over = now - float(facts["time"]), facts["rows_per_s"], float(facts["over_s"])
        left = facts["seconds_left"]
        left = None if left is None else max(float(left) - max(age, 0.0), 0.0)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if abs(age) > FRESH or not isinstance(rate, (int, float)) or not math.isfinite(rate):
        return None  # (either way: the driver may run on another host, its clock off a bit)
    return {"rows_per_s": rate, "over_s": over, "seconds_left": left}


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
