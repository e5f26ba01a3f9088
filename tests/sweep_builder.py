"""Build a small finished sweep folder directly with the worker (no Ray): tiny and fast."""

from __future__ import annotations

from pathlib import Path

from sweep import grid
from sweep.activations.store import ChunkStore
from sweep.config import LoggerConfig
from sweep.sweepdir import SweepFolder
from sweep.worker import EnsembleJob, train_ensemble
from tests.conftest import tiny_train

L1S = (1e-3, 1e-2, 1e-1)
RATIOS = (1.0, 2.0)


def write_manifest(sweep_dir: Path, runs: list[grid.RunSpec], store: ChunkStore) -> None:
    SweepFolder(sweep_dir).write_manifest([r.as_dict() for r in runs], {}, store)


def jobs(
    store,
    sweep_dir: Path,
    l1s=L1S,
    ratios=RATIOS,
    seeds: int = 2,
    logger: LoggerConfig | None = None,
    **train,
) -> list[EnsembleJob]:
    runs = grid.expand(list(l1s), list(ratios), seeds, store.width, "untied")
    ensembles = grid.group(runs, dict.fromkeys(ratios, 16))
    sweep_dir.mkdir(parents=True, exist_ok=True)
    write_manifest(sweep_dir, runs, store)
    return [
        EnsembleJob(
            e,
            str(sweep_dir),
            str(store.path),
            True,
            2048,
            tiny_train(**train),
            threads=1,
            logger=logger,
        )
        for e in ensembles
    ]


def build_sweep(store, sweep_dir: Path, **kw) -> Path:
    for job in jobs(store, sweep_dir, **kw):
        train_ensemble(job)
    return sweep_dir
