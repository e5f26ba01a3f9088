"""The registry of benchmark sections: number -> (title, function). To add a section, write a
module with ``run(ctx: Context) -> dict`` (printing its table, returning its figures for the
JSON) and add one line here."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from . import checkpoints, e2e, flops, loop, peak, scheduling, stream, topk
from .common import Context


@dataclass(frozen=True)
class Section:
    title: str
    """Printed as ``== {title} ==``."""
    run: Callable[[Context], dict]
    ray: bool = False
    """Starts a local Ray instance (skipped by ``--skip-ray``)."""
    cuda: bool = False
    """Needs a CUDA device (skipped, with a note, on CPU)."""


SECTIONS: dict[int, Section] = {
    1: Section("1. Ensemble vs loop", loop.run),
    2: Section("2. Achieved FLOP/s", flops.run),
    3: Section("3. Streamed vs in-memory", stream.run),
    4: Section("4. Checkpoint cost", checkpoints.run),
    5: Section("5. Scheduling makespan (Ray)", scheduling.run, ray=True),
    6: Section("6. End-to-end sweep vs pure step", e2e.run, ray=True),
    7: Section("7. Architectures vs loop", topk.run),
    8: Section("8. The step against the chip (issue 10)", peak.run),
}
