"""Where a sweep's start-up goes: the driver's phases before its first ensemble is submitted
(lock and config checks, store made or opened, store checked, the sweep folder tidied and its
finished runs looked for, Ray started, the GPUs asked, planned), each timed, logged
to ``sweep.log`` and recorded in the sweep's manifest (``startup``) for ``scripts/bench.py``.
What a worker then spends before training (its process and imports, restoring, compiling) is
in each run's ``placement.json`` (``task_began``, ``time``) and ``timings``."""

from __future__ import annotations

import time

PHASES = ("config checks", "store", "store checks", "sweep folder", "Ray", "hardware", "plan")
"""The driver's phases in their order (the manifest's JSON keeps them sorted)."""


class Laps:
    """Seconds of consecutive phases: each :meth:`lap` ends the phase begun by the one before
    (or by the start)."""

    def __init__(self) -> None:
        self.began = time.time()
        self._last = time.perf_counter()
        self.seconds: dict[str, float] = {}

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.seconds[phase] = self.seconds.get(phase, 0.0) + now - self._last
        self._last = now

    def record(self) -> dict[str, float]:
        """What the manifest keeps: when the driver began (``time.time()``) and each phase."""
        return {"began": self.began, **{k: round(v, 4) for k, v in self.seconds.items()}}

    def text(self) -> str:
        total = sum(self.seconds.values())
        parts = ", ".join(f"{k} {v:.1f} s" for k, v in self.seconds.items())
        return f"start-up took {total:.1f} s: {parts}"
