"""``sweep run --plan``: what ``sweep run`` would train, how it groups the grid into
ensembles and what each asks of the hardware — without training or writing anything.

It plans as ``sweep run`` does (the same checks, Ray resources, memory model and GPU shares)
on the store that exists or, for ``data=synthetic``, the one the config would generate. A
store that must be harvested or copied first is refused: its width is not known yet.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from sweep import archs, driver, execution, grid, launcher, planning, restore
from sweep.activations import harvest, synthetic
from sweep.activations.store import ChunkStore, planned_steps, staged_bytes
from sweep.config import SweepConfig, SyntheticDataConfig
from sweep.errors import SweepError
from sweep.io import memory_text
from sweep.lock import holder_alive, read_lock
from sweep.planning import SweepPlan
from sweep.sweepdir import LOCK, SweepFolder, unwritable_fix

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from rich.console import Console


@dataclass(frozen=True)
class StoreShape:
    """What planning needs of a store: its width and what two staged chunks take."""

    path: Path
    width: int
    staged: int
    store: ChunkStore | None = None
    """The store, when it exists."""


@dataclass
class Preview:
    cfg: SweepConfig
    """With ``train.dtype`` resolved as the run would record it."""
    plan: SweepPlan
    res: launcher.Resources | None
    """None when every run is final (no Ray was asked)."""
    rows: list[dict]
    """One per ensemble: id, dict ratio and size, members, share, memory, runs."""
    notes: list[str]
    """What the run would do first, or what holds the sweep now."""


def preview(cfg: SweepConfig) -> Preview:
    """The plan ``sweep run`` would make now (refusing what it would refuse)."""
    folder = SweepFolder(cfg.sweep_dir)
    blocked = next((p for p in (folder.path, *folder.path.parents) if p.is_file()), None)
    if blocked is not None:  # (the run itself is refused when it cannot create the folder)
        raise SweepError(f"sweep_dir {folder.path}: {blocked} is a file; use another sweep_dir")
    existing = next(p for p in (folder.path, *folder.path.parents) if p.exists())
    if not os.access(existing, os.W_OK | os.X_OK):  # (as the run's write probe would find)
        raise SweepError(
            f"sweep_dir {folder.path} is not writable ({existing} is not: read-only or no "
            f"permission); {unwritable_fix(folder.path)}"
        )
    driver.check_config(cfg, folder)
    finished = driver.recorded_finished_plan(cfg, folder, tidy=False)  # (its store may be gone)
    if finished is not None:  # nothing to train: no store, no Ray, as in the run
        return Preview(*finished, None, [], _lock_notes(folder))
    shape = store_shape(cfg, folder)
    finished = driver.finished_plan(cfg, folder, shape.width, tidy=False)
    if finished is not None:
        return Preview(*finished, None, [], _notes(folder, shape))
    res = _resources(cfg)
    cfg, p = driver.plan_for(cfg, folder, res, shape.width, shape.staged, shape.path, tidy=False)
    shares = execution.gpu_shares(cfg, p.ensembles, res, shape.staged) if res.on_gpu else {}
    notes = _notes(folder, shape) + execution.gpu_notes(cfg, res, shares, shape.width)
    return Preview(cfg, p, res, _rows(cfg, p, res, shape, shares), notes)


def _resources(cfg: SweepConfig) -> launcher.Resources:
    """As ``sweep run`` would find them; for ``launch=local`` without starting Ray."""
    early = launcher.early_gpu_probe(cfg)
    local = launcher.local_cluster(cfg.launch)
    if local is not None:
        return launcher.Resources(cfg, local, early=early)
    with launcher.ray_session(cfg.launch):
        return launcher.Resources.of_cluster(cfg, early)


def store_shape(cfg: SweepConfig, folder: SweepFolder) -> StoreShape:
    """The store the run would train on, refused as the run would refuse it (reads only); a
    synthetic store not made yet, from its config."""
    path = driver.store_path(cfg).expanduser()
    if isinstance(cfg.data, SyntheticDataConfig):
        store = synthetic.existing_store(cfg.data, path)
        if store is None:
            synthetic.refuse_begun(cfg.data, path, driver.owns_store(cfg))
            synthetic.check_resources(cfg.data, path)
            _warn_of_schedule(cfg)
            d = cfg.data
            staged = staged_bytes(min(d.rows_per_chunk, d.rows), d.width, d.dtype)
            return StoreShape(path, d.width, staged)  # (the grid was checked at this width)
    elif cfg.data.name == "harvest":
        store = harvest.harvested_store(cfg.data, path, cfg.launch)
        if store is None:
            raise SweepError(
                f"{path} holds no complete harvest with these settings yet, so its width is "
                "unknown: `sweep run --plan` plans on an existing store (harvest it first with "
                "`sweep harvest`, or `sweep run`)"
            )
    else:
        store = ChunkStore(path)  # (the run's own error when there is none)
    driver.check_store_fits(cfg, folder, store, verify=False)  # (noted: the run verifies)
    return StoreShape(path, store.width, store.staged_bytes(), store)


def _warn_of_schedule(cfg: SweepConfig) -> None:
    """The run's warnings of its schedule (:func:`sweep.driver.schedule_notes`) and of the
    rows it leaves out for a synthetic store not made yet (the run gives them once it is
    made): its chunks' sizes follow from its config."""
    t, d = cfg.train, cfg.data
    chunks = synthetic.chunk_rows(d)  # type: ignore[arg-type]
    steps = planned_steps(chunks, t.batch_size, t.epochs, d.eval_rows)
    if not steps:
        return
    notes = [driver.held_out_note(d.eval_rows, sum(chunks), new=True)]
    notes += [
        *driver.schedule_notes(cfg, steps),
        driver.skipped_rows_note(chunks, t.batch_size, d.eval_rows),
    ]
    for note in notes:
        if note:
            log.warning(note)


def _notes(folder: SweepFolder, shape: StoreShape) -> list[str]:
    notes = []
    if shape.store is None:
        notes.append(f"the run first generates the synthetic store in {shape.path}")
    elif not shape.store.is_verified(elsewhere=folder.store_verified):
        notes.append(f"the run first verifies the store {shape.path} (sha256 of every chunk)")
    return notes + _lock_notes(folder)


def _lock_notes(folder: SweepFolder) -> list[str]:
    info = read_lock(folder.path, strict=True)  # (as the run reads it)
    if not info or not holder_alive(info, folder.path / LOCK):
        return []
    return [
        f"a sweep run (pid {info.get('pid')} on {info.get('host')}) holds {folder.path} now: "
        "another run would be refused until it ends; this is what a run after it would do"
    ]


def _rows(
    cfg: SweepConfig, p: SweepPlan, res: launcher.Resources, shape: StoreShape,
    shares: dict[grid.EnsembleSpec, float],
) -> list[dict]:  # fmt: skip
    t, rows = cfg.train, []
    for e in p.ensembles:
        buffers = planning.batch_buffers(cfg, shape.width, e.dict_size)
        per = grid.bytes_per_member(
            shape.width, e.dict_size, t.batch_size, t.dtype, buffers, res.on_gpu
        )
        memory = len(e.members) * per + (shape.staged if res.on_gpu else 0)
        size = memory_text(memory)
        ask = f"{shares[e]:g} GPU" if res.on_gpu else f"{res.num_cpus:g} CPU"
        rows.append(
            {
                "ensemble": e.ensemble_id,
                "dict_ratio": f"{e.dict_ratio:g}",
                "dict_size": e.dict_size,
                "members": len(e.members),
                "asks": ask,
                "memory": size,
                "runs": ", ".join(m.run_id for m in e.members),
            }
        )
    return rows


SHED = ("dict_size", "memory", "asks", "dict_ratio")
"""Columns a narrow terminal leaves out, first ones first."""


def print_preview(v: Preview) -> None:
    from sweep.console import fit_table, table_console

    p, console = v.plan, table_console()
    if v.res is None:
        console.print(f"{len(p.runs)} runs: all already finished, nothing to train")
        _print_notes(console, v.notes)
        return
    res = v.res
    budget = res.device_bytes  # (on GPUs: one's, times a fixed launch.gpus_per_ensemble)
    planned = f"memory budget {memory_text(budget)} per ensemble"
    planned += f", planned to {grid.MEMORY_USE:.0%}: {memory_text(grid.MEMORY_USE * budget)}"
    where = (
        f"GPUs ({res.gpus:g} in the Ray cluster, {planned})" if res.on_gpu else f"CPUs ({planned})"
    )
    title = f"sweep plan: {v.cfg.sweep_dir} (nothing trained or written)"
    cols = ["ensemble", "dict_ratio", "dict_size", "members", "asks", "memory", "runs"]
    cells = [[str(row[c]) for c in cols] for row in v.rows]
    fitted = fit_table(console, title, cols, cells, drop=SHED, text=("runs",))
    if v.rows:  # (every run done: no table, the line below says so)
        fitted.print(console)
    todo = sum(len(e.members) for e in p.ensembles if not e.evaluate)
    again = sum(len(e.members) for e in p.ensembles if e.evaluate)
    evaluated = f", {again} to evaluate again from their weights," if again else ""
    device = torch.device("cuda" if driver.on_cuda(v.cfg, res) else "cpu")
    kind = restore.step_kind(v.cfg.train, archs.get(v.cfg.sae.name), device)
    console.print(
        f"{len(p.runs)} runs: {len(p.skipped)} already done, {todo} to train{evaluated} in "
        f"{len(p.ensembles)} ensemble(s) on {where}, compute dtype {v.cfg.train.dtype}, "
        f"step {kind}"
    )
    _print_notes(console, v.notes)


def _print_notes(console: Console, notes: list[str]) -> None:
    for note in notes:
        console.print(f"note: {note}")
