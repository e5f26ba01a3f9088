"""Whole worker runs: ``worker.train_ensemble`` from scratch in a fresh sweep dir, sized to a
target length (sections 4 and 5)."""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

from sweep import worker
from sweep.activations.store import BatchStream, ChunkStore
from sweep.config import LoggerConfig, TrainConfig
from sweep.grid import EnsembleSpec


def steps_per_epoch(store: ChunkStore, batch: int, eval_rows: int) -> int:
    return BatchStream(store, batch, 0, 1, eval_rows).total_steps


def epochs_for(seconds: float, seconds_per_step: float, per_epoch: int, least: int = 1) -> int:
    """Epochs for a run of about ``seconds`` (at least ``least``)."""
    return max(least, round(seconds / (seconds_per_step * per_epoch)))


def train_run(
    store: Path, spec: EnsembleSpec, train: TrainConfig, eval_rows: int, tmp: Path
) -> tuple[float, worker.EnsembleResult]:
    """One ``train_ensemble`` from scratch in a fresh sweep dir: (wall seconds, its result)."""
    sweep_dir = Path(tempfile.mkdtemp(prefix="run-", dir=tmp))
    job = worker.EnsembleJob(
        spec,
        str(sweep_dir),
        str(store),
        True,
        eval_rows,
        train,
        threads=train.threads,
        logger=LoggerConfig(),
    )
    try:
        t0 = time.perf_counter()
        result = worker.train_ensemble(job)
        return time.perf_counter() - t0, result
    finally:
        shutil.rmtree(sweep_dir, ignore_errors=True)
