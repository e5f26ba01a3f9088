"""The driver's tiny Ray actor, in a module that imports nothing heavy: an actor's process
imports its class's module, and torch would add about a second to every sweep's start."""

from __future__ import annotations


class ProgressCounter:
    """Rows trained of every run (workers report, the driver's progress bar reads): for each
    run the most it has reached, so an ensemble that continues from a checkpoint (a retry, a
    split after running out of memory, a resumed sweep) never counts its rows twice.

    ``weights``: what a row of each run costs (its dictionary's size; 1 where not given): the
    work done so far, :meth:`work`, paces the time left of a sweep whose ensembles differ."""

    def __init__(
        self, reached: dict[str, int] | None = None, weights: dict[str, float] | None = None
    ) -> None:
        self.reached = dict(reached or {})
        self.weights = dict(weights or {})

    def reach(self, run_ids: list[str], rows: int) -> None:
        for run_id in run_ids:
            self.reached[run_id] = max(self.reached.get(run_id, 0), rows)

    def total(self) -> int:
        return sum(self.reached.values())

    def work(self) -> tuple[int, float, dict[str, int]]:
        """Rows trained, those rows weighted by their runs' cost, and each run's rows."""
        weighted = sum(rows * self.weights.get(r, 1.0) for r, rows in self.reached.items())
        return self.total(), weighted, dict(self.reached)
