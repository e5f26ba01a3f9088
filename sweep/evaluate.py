"""``sweep evaluate``: a sweep's finished runs evaluated again from their final weights.

A newer sweep may compute metrics an older one did not (or compute one differently); training
the runs again for them would take as long as the first time. This checks the sweep's
finished runs (weights hashed against ``DONE``: :func:`evaluable_runs`), groups them into
ensembles of their own (:func:`evaluation_plan`) and runs those through Ray as training is
(:class:`sweep.execution.Execution`): each worker loads its members' verified weights and
writes their metrics, feature density and ``DONE`` again, their previous metrics recorded in
their ``events.jsonl`` first (:mod:`sweep.reevaluate`). Weights and ``cfg.json`` are never
written; runs that are not finished are named and left as they are.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Collection
from dataclasses import replace

from sweep import driver, grid, launcher, planning, rundir
from sweep.activations.store import ChunkStore
from sweep.config import SweepConfig
from sweep.errors import SweepError
from sweep.execution import Execution, Outcome
from sweep.grid import RunSpec
from sweep.io import ensure_writable, hashing_map
from sweep.lock import EVALUATING, SweepLock
from sweep.planning import SweepPlan
from sweep.sweepdir import RunRecord, SweepFolder, write_summary

log = logging.getLogger(__name__)

STOPPED = (
    "the runs evaluated before it have their new metrics (an evaluated_again event in their "
    "events.jsonl says so), the others their old ones; run the same command again to "
    "evaluate every run"
)


def evaluate_sweep(cfg: SweepConfig, only: Collection[str] = ()) -> list[RunRecord]:
    """Evaluate the sweep's finished runs (of ``only``, when given) again; returns every run
    of the sweep as recorded. Holds the sweep's lock, as training does."""
    fix = "sweep evaluate writes its runs' metrics there: make it writable"
    folder = SweepFolder(ensure_writable(cfg.sweep_dir, "sweep_dir", fix))
    outcome = Outcome(stopped_note=STOPPED)
    asking = "every ensemble to stop (nothing is trained: nothing to checkpoint)"
    with driver.driving(folder, outcome, cfg, asking, doing=EVALUATING) as lock:
        driver.check_config(cfg, folder)
        _check_known(cfg, folder, only)  # (before the store: it may be made again)
        store = driver.checked_store(cfg, folder, training=False)
        runs = evaluable_runs(cfg, store.width, only)  # (before Ray: hashes their weights)
        if not folder.manifest():  # (deleted: written as a sweep run would)
            specs = [r.as_dict() for r in planning.expand_grid(cfg, store.width)]
            folder.write_manifest(specs, folder.previous_ensembles(), store, grid=True)
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
    driver.clear_leftovers(cfg, folder, lock)
    with launcher.ray_session(cfg.launch, outcome.shutdown_wait):
        res = launcher.Resources.of_cluster(cfg)
        cfg, budget = driver.on_hardware(cfg, res, store.staged_bytes(), store.path)
        p = evaluation_plan(cfg, runs, store.width, budget, res.on_gpu)
        log.info("evaluating %d finished run(s) again from their weights", len(runs))
        outcome.signals.training()
        Execution(cfg, folder, p, store, res, lock, outcome).run()
    ours = {r.run_id for r in runs}  # (their weights were hashed when picked: not again)
    records = folder.read_runs(live=False, deep=True, trusted=ours)  # (a damaged one: not done)
    write_summary(folder.path, [r.row() for r in records])
    return records


def evaluable_runs(cfg: SweepConfig, width: int, only: Collection[str] = ()) -> list[RunSpec]:
    """The sweep's finished runs (its grid's, and those an earlier grid left, as their
    ``spec.json`` records them; of ``only``, when given) whose final files verify (weights
    hashed); a run that is not finished, or fails its checks, is named and left as it is.
    No run to evaluate is refused (an unknown id was, before the store: :func:`_check_known`)."""
    folder = SweepFolder(cfg.sweep_dir)
    runs = planning.expand_grid(cfg, width)
    runs += _recorded_beside(folder, {r.run_id for r in runs})
    ready = _verified(folder, [r for r in runs if not only or r.run_id in only])
    if not ready:
        raise SweepError(
            f"no finished run to evaluate in {cfg.sweep_dir}; 'sweep resume {cfg.sweep_dir}' "
            "finishes (or trains again) its runs"
        )
    return ready


def _check_known(cfg: SweepConfig, folder: SweepFolder, only: Collection[str]) -> None:
    """Each of ``only`` is a run of the sweep's grid or one an earlier grid recorded."""
    knob = cfg.sae.knob
    g = cfg.grid
    known = {p.run_id for p in grid.points(g.values(knob), g.dict_ratio, g.seeds, knob, g.lr)}
    unknown = sorted(set(only) - known - set(folder.recorded_specs()))
    if unknown:
        raise SweepError(
            f"no run {', '.join(unknown)} in the grid of {cfg.sweep_dir}; 'sweep status "
            f"{cfg.sweep_dir}' lists its runs"
        )


def _verified(folder: SweepFolder, runs: list[RunSpec]) -> list[RunSpec]:
    """Those of ``runs`` that can be evaluated again; the others are warned about, those
    never finished in one line."""
    ready, unfinished = [], []
    folders = [folder.run(r.run_id) for r in runs]
    problems = hashing_map(lambda run: run.unevaluable(remember=True), folders)  # (locked)
    for r, run, problem in zip(runs, folders, problems, strict=True):
        if problem is None:
            ready.append(r)
        elif not (run.path / rundir.DONE).is_file() and run.unvouched() is None:
            unfinished.append(r.run_id)
        else:
            log.warning("run %s: %s; not evaluated", r.run_id, problem)
    if unfinished:
        shown = ", ".join(unfinished[:3]) + (", ..." if len(unfinished) > 3 else "")
        log.warning(
            "%d run(s) not finished, not evaluated (%s); 'sweep resume %s' finishes them",
            len(unfinished), shown, folder.path,
        )  # fmt: skip
    return ready


def _recorded_beside(folder: SweepFolder, ids: set[str]) -> list[RunSpec]:
    """The runs whose ``spec.json`` the sweep folder holds that are not in ``ids`` (left by
    an earlier grid)."""
    names = {f.name for f in dataclasses.fields(RunSpec)}
    out = []
    for rid, spec in folder.recorded_specs().items():
        if rid in ids:
            continue
        try:
            out.append(RunSpec(**{k: v for k, v in spec.items() if k in names}))
        except TypeError:  # (an edited spec.json: the run is left)
            log.warning("run %s: its spec.json is damaged; not evaluated", rid)
    return out


def evaluation_plan(
    cfg: SweepConfig, runs: list[RunSpec], width: int, device_bytes: float, on_gpu: bool
) -> SweepPlan:
    """Finished ``runs`` (:func:`evaluable_runs`) in ensembles that evaluate them again from
    their final weights (``-eval``, as many members as training would hold)."""
    folder = SweepFolder(cfg.sweep_dir)
    learned = planning.learned_limits(cfg, folder, {r.dict_ratio for r in runs})
    grouped = planning.grouper(cfg, width, device_bytes, on_gpu, learned)(runs)
    taken = set(folder.previous_ensembles().values())
    ensembles = grid.renumber(grouped, tag="-eval", taken=taken)
    return SweepPlan(runs, [], [replace(e, evaluate="all") for e in ensembles])
