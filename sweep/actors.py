"""Tiny Ray actors of the driver, in a module that imports nothing heavy: an actor's process
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


class StopFlag:
    """Raised by the driver on SIGTERM/SIGINT; workers poll it and checkpoint."""

    def __init__(self) -> None:
        self.value = False

    def set(self) -> None:
        self.value = True

    def is_set(self) -> bool:
        return self.value
