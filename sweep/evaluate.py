"""``sweep evaluate``: a sweep's finished runs evaluated again from their final weights.

A newer sweep may compute metrics an older one did not (or compute one differently); training
the runs again for them would take as long as the first time. This checks the grid's
finished runs (weights hashed against ``DONE``: :func:`sweep.planning.evaluable_runs`), groups
them into ensembles of their own and runs those through Ray as training is
(:class:`sweep.execution.Execution`): each worker loads its members' verified weights and
writes their metrics, feature density and ``DONE`` again, each run's previous metrics into its
``events.jsonl`` (:mod:`sweep.reevaluate`). Weights and ``cfg.json`` are never written; runs
that are not finished are named and left as they are.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from dataclasses import replace

from sweep import driver, launcher, planning
from sweep.activations.store import ChunkStore
from sweep.config import SweepConfig
from sweep.execution import Execution, Outcome
from sweep.grid import RunSpec
from sweep.lock import SweepLock
from sweep.stop import DriverSignals, at_exit_now
from sweep.sweepdir import RunRecord, SweepFolder, write_summary

log = logging.getLogger(__name__)


def evaluate_sweep(cfg: SweepConfig, only: Collection[str] = ()) -> list[RunRecord]:
    """Evaluate the finished runs of ``cfg``'s grid (of ``only``, when given) again; returns
    every run of the sweep as recorded. Holds the sweep's lock, as training does."""
    folder = SweepFolder(cfg.sweep_dir)  # (a sweep: cli.load_saved read its config.yaml)
    outcome = Outcome()
    with DriverSignals(folder.request_stop) as signals, driver.sweep_log(folder):
        lock = SweepLock(folder.path)
        with at_exit_now(lambda _line: lock.release()), lock:
            outcome.signals, outcome.locked = signals, True
            driver.check_config(cfg, folder)
            store = driver.checked_store(cfg, folder)
            runs = planning.evaluable_runs(cfg, store.width, only)  # (before Ray: seconds)
            if not folder.manifest():  # (deleted: written as a sweep run would)
                grid = [r.as_dict() for r in planning.expand_grid(cfg, store.width)]
                folder.write_manifest(grid, folder.previous_ensembles(), store, grid=True)
            records = _evaluate(cfg, folder, store, runs, lock, outcome)
            driver.logged(outcome.raise_if_unfinished)
    return records


def _evaluate(
    cfg: SweepConfig,
    folder: SweepFolder,
    store: ChunkStore,
    runs: list[RunSpec],
    lock: SweepLock,
    outcome: Outcome,
) -> list[RunRecord]:
    """Start Ray, group ``runs`` into ensembles, evaluate them; write the summary."""
    assert outcome.signals is not None
    folder.clear_stop()  # left by an earlier, stopped driver
    with launcher.ray_session(cfg.launch, outcome.shutdown_wait):
        import ray

        res = launcher.Resources(cfg, ray.cluster_resources(), launcher.alive_nodes())
        cfg = replace(cfg, train=replace(cfg.train, dtype=driver.compute_dtype(cfg, res)))
        budget = driver.device_budget(store.staged_bytes(), store.path, res)
        p = planning.evaluation_plan(cfg, runs, store.width, budget, res.on_gpu)
        log.info("evaluating %d finished run(s) again from their weights", len(runs))
        outcome.signals.training()
        Execution(cfg, folder, p, store, res, lock, outcome).run()
    records = folder.read_runs(live=False)
    write_summary(folder.path, [r.row() for r in records])
    return records
