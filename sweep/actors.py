"""The driver's tiny Ray actor, in a module that imports nothing heavy: an actor's process
imports its class's module, and torch would add about a second to every sweep's start."""

from __future__ import annotations


class ProgressCounter:
    """Rows trained across all ensembles (workers report, the driver's progress bar reads)."""

    def __init__(self) -> None:
        self.rows = 0

    def add(self, rows: int) -> None:
        self.rows += rows

    def total(self) -> int:
        return self.rows
