"""The sweep folder: every sweep-level file name, the manifest, and one reader of all runs.

``SWEEP_DIR/`` holds::

    config.yaml     the resolved config of the sweep (what ``sweep resume`` reads)
    manifest.json   every run (its spec and ensemble), the store, the width, the sweep's state,
                    and the member limits learned from ensembles that ran out of GPU memory
    summary.csv     one row per run        .lock   while a driver runs (.lock-guard: taking it)
    .stop           a stopping driver's request to every worker
    .stop-request   ``sweep stop``'s request to the driver (:mod:`sweep.stop_request`)
    sweep.log       what every driver logged, with the full details of any error
    store/          the default chunk store (data=synthetic / data=harvest without data.path)
    report/         ``sweep report``       wandb/  offline wandb runs
    runs/<run_id>/  one run folder each (:mod:`sweep.rundir`)

Report, status, the Python API, export and cross-dictionary metrics all read runs through
:meth:`SweepFolder.read_runs`; nothing else parses run folders.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import io
import os
import time
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from sweep.activations.layout import CHUNKS as STORE_CHUNKS
from sweep.activations.layout import FORMAT as STORE_FORMAT
from sweep.activations.layout import MAKING as STORE_MAKING
from sweep.activations.layout import MANIFEST as STORE_MANIFEST
from sweep.errors import RunDirError, SweepError, could_not_read
from sweep.io import (
    atomic_write_bytes,
    atomic_write_json,
    hashing_map,
    json_number,
    read_json,
    unreadable,
)
from sweep.rundir import DONE, MMCS_KEYS, MMCS_OVER, RUNS, RunFolder, RunState

if TYPE_CHECKING:
    from sweep.activations.store import ChunkStore

CONFIG = "config.yaml"
_RESTORE = (
    "restore it (every run's spec.json holds the recorded values), or pass the sweep's "
    "settings again with 'sweep run' after deleting it"
)
GRID = "grid"
"""The manifest's list of the run ids of the last command's grid."""
MANIFEST = "manifest.json"
SUMMARY = "summary.csv"
LOCK = ".lock"
LOCK_GUARD = ".lock-guard"
STOP = ".stop"
STOP_REQUEST = ".stop-request"
"""``sweep stop``'s request to the live driver (:mod:`sweep.stop_request`)."""
NO_OUTCOME = (
    "stopped: its last driver ended without recording how (killed, or its disk full); re-run "
    "it to continue"
)
"""A sweep's activity when its last driver died before recording how it ended."""
JUST_MADE, JUST_MADE_WAIT = 2.0, 0.5
"""A folder without a manifest changed this recently (seconds) is a sweep that may be taking
its lock (milliseconds after it made the folder, longer on a loaded machine): readers wait
this long for it before they say what the folder is."""
LOG = "sweep.log"
STORE = "store"
STORE_VERIFIED = ".store-verified.json"
"""A read-only store's passed verification, remembered by the sweep (where the store cannot
remember it: :meth:`sweep.activations.store.ChunkStore.verify`)."""
LIMITS = "member_limits"
"""The manifest's key for :meth:`SweepFolder.member_limits`."""
STARTUP = "startup"
"""The manifest's key for :meth:`SweepFolder.record_startup`."""
REPORT = "report"
WANDB = "wandb"


SUMMARY_COLUMNS = [
    "run_id",
    "l1",
    "k",
    "lr",
    "dict_ratio",
    "seed",
    "state",
    "l0",
    "fvu",
    "mse",
    "dead_fraction",
    "dense_fraction",
    "gt_mmcs",
    "gt_recovered",
    "loss_recovered",
    "mmcs_next_ratio",
    "mmcs_seeds",
]
"""The first columns of ``summary.csv`` (every other metric follows, sorted)."""

METRICS_VERSION = 2
"""Which definitions measured a run's metrics (``metrics_version`` in its metrics.json; none
recorded: 1). 2: ``cossim`` leaves zero input rows out of its mean, ``l2_norm_in`` and
``l2_norm_out`` are written. A sweep's table says when finished runs were measured by an
earlier one (``sweep evaluate`` measures them again)."""

RUN_METRICS = (
    "cossim",
    "eval_rows",
    "explained_variance",
    "explained_variance_legacy",
    "frac_alive",
    "freq_over_10_percent",
    "freq_over_1_percent",
    "l1_norm",
    "l2_norm_in",
    "l2_norm_out",
    "l2_ratio",
    "metrics_version",
    "normalized_freq_over_10_percent",
    "normalized_freq_over_1_percent",
    "relative_reconstruction_bias",
    "rows_trained",
    "steps",
)
"""Metrics every finished run has beyond :data:`SUMMARY_COLUMNS`: columns from the start,
empty until a run finishes (a table read mid-sweep has the columns of the finished one).
A harvest's LM scores beyond ``loss_recovered`` come with its first finished run."""


FRONTIER = "frontier"
"""The column saying whether a run is on the FVU–L0 Pareto frontier (the report's line)."""


def summary_columns(rows: list[dict]) -> list[str]:
    """The fixed columns (``k`` and ``lr`` only when a run has one; ``frontier`` after
    ``state``), then every other metric (:data:`RUN_METRICS` always), sorted."""
    first = [c for c in SUMMARY_COLUMNS if c not in ("k", "lr") or any(r.get(c) for r in rows)]
    first.insert(first.index("state") + 1, FRONTIER)
    present = {k for r in rows for k in r} | set(RUN_METRICS)
    return first + sorted(present - set(first) - ROW_ONLY)


def with_frontier(rows: list[dict]) -> list[dict]:
    """The rows with ``frontier`` set: True for the runs on the FVU–L0 Pareto frontier."""
    from sweep.runfacts import frontier_ids  # (it imports torch, through crossdict)

    front = frontier_ids(rows)
    return [{**r, FRONTIER: r["run_id"] in front} for r in rows]


ROW_ONLY = {"arch"}
"""Keys of a summary row that are no column (the architecture: one per sweep, in the report's
settings; its readers use it to name the sparsity knob)."""


def write_summary(folder: str | Path, rows: list[dict]) -> Path:
    """``summary.csv`` (one row per run) in ``folder``: the sweep folder or its report."""
    cols = summary_columns(rows)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
    w.writeheader()
    for r in with_frontier(rows):
        w.writerow({k: r.get(k, "") for k in cols})
    path = Path(folder) / SUMMARY
    atomic_write_bytes(path, buf.getvalue().encode())
    return path


def default_store_path(sweep_dir: str | Path) -> Path:
    """Where ``data=synthetic`` / ``data=harvest`` put their store without ``data.path``."""
    return Path(sweep_dir) / STORE


@dataclass
class RunRecord:
    """One run as every reader sees it."""

    run_id: str
    folder: RunFolder
    state: RunState
    spec: dict
    metrics: dict
    """Final metrics ({} until the run is final)."""
    last: dict = field(default_factory=dict)
    """The latest training-curve record."""
    note: str = ""
    """Why it failed (``failed``), or what its final metrics warn about (a diverged run's
    frozen weights, a dead dictionary)."""
    point: dict = field(default_factory=dict)
    """Its grid point as the manifest lists it (what a run not started yet has instead of a
    spec)."""
    kept_weights: bool = False
    """Unfinished only because its ``metrics.json`` was lost: its final weights stay, and a
    re-run evaluates them again (trains nothing)."""
    unread: bool = False
    """A file of it could not be read (its note says which): listed, nothing judged of it."""

    @property
    def grid_point(self) -> dict:
        """Its spec, else (not started, or its spec.json unreadable) the manifest's entry."""
        return self.spec or self.point

    @property
    def total_rows(self) -> int | None:
        batch = self.spec.get("train", {}).get("batch_size", 0)
        return self.spec.get("total_steps", 0) * batch or self.metrics.get("rows_trained")

    @property
    def rows_trained(self) -> int | None:
        if self.state.final:
            return self.metrics.get("rows_trained")
        return self.last.get("rows", 0 if self.spec else None)

    def row(self) -> dict:
        """The summary row: grid point, state and final metrics."""
        point = self.grid_point
        out: dict = {
            "run_id": self.run_id,
            "l1": point.get("l1"),
            "dict_ratio": point.get("dict_ratio"),
            "seed": point.get("seed"),
            "arch": point.get("arch") or point.get("sae"),
        }
        if point.get("k"):  # TopK-style runs: k is the grid value (their l1 is unused)
            out.update(k=point["k"], l1=None)
        if point.get("lr") is not None:  # a grid with an lr axis (grid.lr)
            out["lr"] = point["lr"]
        out.update(self.metrics)
        out["state"] = self.state.value
        if self.note:
            out.setdefault("note", self.note)  # why it failed
        return out


def grid_order(run_id: str, point: object) -> tuple:
    """A run's place in the order runs are listed (status, report, summary.csv, load_sweep):
    dict ratio, sparsity setting (k, else l1: :func:`sweep.crossdict.knob`'s choice, which
    this module cannot import), learning rate (grid.lr; 0 without), seed, ascending as numbers;
    then run id (runs whose grid point is unknown come last). Planning starts the largest dict
    ratio first instead."""
    point = point if isinstance(point, dict) else {}
    k = point.get("k")
    knob = k if json_number(k) and k >= 1 else point.get("l1")  # (k is 0 in an L1 run's spec)
    lr = point.get("lr") if json_number(point.get("lr")) else 0
    values = (point.get("dict_ratio"), knob, lr, point.get("seed"))
    known = all(json_number(v) for v in values)
    return (0, *values, run_id) if known else (1, 0, 0, 0, 0, run_id)


def _done(run: RunFolder, deep: bool = False) -> bool:
    """:meth:`RunFolder.is_done`, False where a file of it could not be read (a reader lists
    it with the reason: :meth:`SweepFolder.read_runs`)."""
    try:
        return run.is_done(deep)
    except RunDirError:
        return False


def _why_unfinished(folder: RunFolder, state: RunState, deep: bool) -> tuple[str, bool]:
    """Why a run with a ``DONE``, or a pending one with final weights, does not count as
    finished ("" for every other run), and whether a re-run only evaluates its kept final
    weights again (:attr:`RunRecord.kept_weights`)."""
    if state.final:
        return "", False
    if (folder.path / DONE).is_file():
        problem = folder.final_problem(deep)
    else:  # (a run being trained again has no DONE yet)
        problem = folder.unvouched() if state == RunState.PENDING else None
    if problem is None:
        return "", False
    lost = folder.evaluated_for(problem)  # (weights hashed when the run reads them)
    again = "evaluates it again from its weights if they verify" if lost else "trains it again"
    return f"{problem}: a sweep run whose grid has it {again}", lost


def _current_mmcs(metrics: dict, digest: Callable[[], str]) -> dict:
    """``metrics`` without MMCS values computed before the latest run finished, and without
    their stamp."""
    if not any(k in metrics for k in (*MMCS_KEYS, MMCS_OVER)):
        return metrics
    current = metrics.get(MMCS_OVER) == digest()
    drop = {MMCS_OVER} if current else {MMCS_OVER, *MMCS_KEYS}
    return {k: v for k, v in metrics.items() if k not in drop}


CLOCK_SLACK = 60.0
"""Seconds a worker's clock (which dates an attempt) may lag the driver's (which dates the lock)."""


def _began_under(folder: RunFolder, state: RunState, since: float | None) -> bool:
    """A pending run (no checkpoint yet) whose latest attempt started under the driver that
    started at ``since`` (give or take :data:`CLOCK_SLACK`): it is training."""
    if state is not RunState.PENDING or not since:
        return False
    return folder.started_at() >= since - CLOCK_SLACK


def _agreed_ensembles(specs: dict[str, dict]) -> dict[str, str]:
    """run_id -> ensemble, from the runs' spec.json, for ensembles every member of which
    recorded the same id and members (a run whose attempt never started keeps an older,
    stale record: trusting it could merge two ensembles and drop their checkpoints)."""
    groups: dict[str, list[tuple[str, ...]]] = {}  # id -> the member sets recorded under it
    for rid, spec in specs.items():
        ens, members = spec.get("ensemble"), spec.get("ensemble_members")
        if ens is None or not isinstance(members, list) or rid not in members:
            continue
        same = all(
            specs.get(m, {}).get("ensemble") == ens
            and specs.get(m, {}).get("ensemble_members") == members
            for m in members
        )
        if same and tuple(members) not in groups.setdefault(ens, []):
            groups[ens].append(tuple(members))
    # an id a later plan gave to other runs (ids are handed out per plan): told apart
    return {
        rid: ens if len(sets) == 1 else f"{ens}#{i}"
        for ens, sets in groups.items()
        for i, members in enumerate(sets)
        for rid in members
    }


class Preparing(SweepError):
    """A live sweep that has not planned its runs yet (it is making or checking its data)."""


class StoppedPreparing(SweepError):
    """A sweep whose driver stopped before it planned any run (a state ``status`` shows; an
    error for what needs runs)."""


def _sweep_files(path: Path) -> bool:
    """Its config.yaml and runs/: a sweep folder, or one whose manifest was deleted."""
    return (path / CONFIG).is_file() and (path / RUNS).is_dir()


def is_sweep(path: Path) -> bool:
    """A sweep folder: its runs/ and a manifest listing runs (and, made by the CLI, its
    config.yaml)."""
    if not (path / RUNS).is_dir():
        return False
    try:
        return "runs" in read_json(path / MANIFEST)
    except (OSError, ValueError, TypeError):
        return False


def enclosing_sweep(path: Path) -> Path | None:
    """The sweep whose runs/ folder ``path`` lies in (or is), if any."""
    here = Path(path).resolve()
    inside = [here, *here.parents]
    return next((p.parent for p in inside if p.name == RUNS and is_sweep(p.parent)), None)


def _is_store(entry: Path) -> bool:
    """A chunk store's folder, complete or being made."""
    if not entry.is_dir():
        return False
    return any((entry / n).is_file() for n in STORE_MAKING) or any(entry.glob(STORE_CHUNKS))


def _sweep_like(path: Path) -> bool:
    """A sweep folder, or one that is still one though damaged or young: its manifest, and
    its runs/ or config.yaml (a chunk store has only a manifest; a project folder with a
    config.yaml and a runs/ folder is no sweep)."""
    return (path / MANIFEST).is_file() and ((path / RUNS).is_dir() or (path / CONFIG).is_file())


def unwritable_fix(sweep_dir: Path) -> str:
    """What to do about a ``sweep_dir`` that cannot be written: another folder for a new
    sweep; for one holding a sweep, or one stopped while it made its store (another folder
    would begin again from nothing), making it writable, or a copy where it can be."""
    folder = SweepFolder(sweep_dir)
    if _sweep_like(sweep_dir) or folder._stopped_preparing(folder._store_chunks()):
        return "make it writable, or copy the sweep folder to a writable disk and run the copy"
    return "choose another folder"


def within_sweep(path: Path) -> tuple[Path, str] | None:
    """The sweep folder ``path`` is in (or is) and the first name of ``path`` under it
    (``""`` for the sweep folder itself; ``"runs"``, ``"report"`` ...), if any; a sweep
    whose manifest is damaged, or that has not started a run yet, counts too."""
    try:
        here = Path(path).resolve()
    except (RuntimeError, OSError) as err:  # (a symlink loop: RuntimeError before 3.13)
        raise RunDirError(f"{path} cannot be resolved ({err}); fix the link or the path") from err
    for p in [here, *here.parents]:
        if _sweep_like(p):  # (every sweep folder is)
            rel = here.relative_to(p).parts
            return p, rel[0] if rel else ""
    return None


def _damaged(manifest: Path, err: Exception) -> RunDirError:
    if unreadable(err):  # (proves nothing)
        return RunDirError(could_not_read(manifest, err))
    return RunDirError(
        f"{manifest} is damaged ({type(err).__name__}); restore it from a backup, or delete it "
        "and re-run the same 'sweep run' command (finished runs are verified and kept)"
    )


class SweepFolder:
    """A sweep folder on disk (see the module docstring)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def run(self, run_id: str) -> RunFolder:
        return RunFolder.of(self.path, run_id)

    @property
    def stop_file(self) -> Path:
        return self.path / STOP

    @property
    def store_verified(self) -> Path:
        """Where the sweep remembers a read-only store's passed verification."""
        return self.path / STORE_VERIFIED

    # ------------------------------------------------------------------------- manifest

    def manifest(self) -> dict:
        """The manifest ({} before the first ``sweep run``); a damaged one is a one-line error."""
        path = self.path / MANIFEST
        if not path.is_file():
            return {}
        try:
            manifest = read_json(path)
        except (OSError, ValueError) as err:
            raise _damaged(path, err) from err
        self._refuse_store(manifest)
        return manifest if isinstance(manifest, dict) else {}

    def refuse_store(self) -> None:
        """A chunk store's folder, complete or being made, is no sweep folder (a sweep there
        would overwrite its manifest), nor is a folder among another sweep's runs (its runs/, a
        run folder), nor a folder of sweeps, nor a home or root folder: one line, before
        anything is written."""
        if _is_store(self.path):
            self._refuse_store({"format": STORE_FORMAT})
        manifest = (self.path / MANIFEST).is_file()
        if manifest:
            self.manifest()
        within = within_sweep(self.path)
        if within is not None and within[1] in (RUNS, REPORT, STORE):
            sweep, part = within
            where = "the runs" if part == RUNS else f"the {part}/ folder"
            raise SweepError(
                f"{self.path} is inside {where} of the sweep {sweep}; pass a sweep_dir outside it"
            )
        if not manifest:
            self._refuse_foreign()

    def _refuse_foreign(self) -> None:
        """A folder that is no sweep's yet (no manifest, no runs/) but holds sweep folders
        (``sweep_dir=outputs`` meant for ``outputs/new``), or a home or root folder, is
        refused; any other folder a sweep may take (files, notes, a job's log beside)."""
        if (self.path / RUNS).is_dir() or not self.path.is_dir():
            return
        try:
            sweeps = sorted(e.name for e in self.path.iterdir() if e.is_dir() and _sweep_like(e))
            here, home = self.path.resolve(), Path(os.path.expanduser("~")).resolve()
        except (OSError, RuntimeError):  # (unreadable: the writes that follow say so)
            return
        if sweeps:
            shown = ", ".join(sweeps[:3]) + (", ..." if len(sweeps) > 3 else "")
            what = f"holds the sweeps {shown}"
        elif here in (home, Path(here.anchor)):
            what = "is a home or root folder"
        else:
            return
        raise SweepError(
            f"sweep_dir {self.path} {what}; pass a new or empty folder for a new sweep (or an "
            "existing sweep's folder)"
        )

    def _refuse_store(self, manifest: object) -> None:
        """A chunk store's folder is no sweep folder (and must never get a sweep's manifest)."""
        if isinstance(manifest, dict) and manifest.get("format") == STORE_FORMAT:
            raise SweepError(
                f"{self.path} is a chunk store, not a sweep folder; pass a sweep's sweep_dir "
                "(a store goes in data.path)"
            )

    def finished_digest(self) -> str:
        """A stamp of which runs have finished, and when: it changes whenever a run finishes
        (again), or a finished one is damaged (cheap checks: its files parse and its weights
        have their size), so values computed across runs can tell they are out of date."""
        stamps = ((rid, self.run(rid)) for rid in self.run_ids())
        done = sorted(f"{rid}|{run.finished_stamp()}" for rid, run in stamps if _done(run))
        return hashlib.sha256("\n".join(done).encode()).hexdigest()[:16]

    def _no_manifest(self) -> SweepError:
        """What a folder without a manifest is, as the one-line error a reader raises (one
        made a moment ago is given :data:`JUST_MADE_WAIT` for its driver's lock)."""
        if self._just_made() and not self.driver_alive():
            time.sleep(JUST_MADE_WAIT)
        chunks = self._store_chunks()
        where = self._store_progress(chunks)
        if self.driver_alive():
            return Preparing(
                f"{self.path}: its sweep is starting: preparing its data{where}; its runs are "
                "listed once it has planned them"
            )
        if self._stopped_preparing(chunks):
            complete = self._store_complete(chunks)
            doing = "after making" if complete else "while preparing"
            then = "its store is kept" if complete else "a store is continued where it stopped"
            return StoppedPreparing(
                f"{self.path}: its sweep stopped {doing} its data{where}, before it planned any run; "
                f"re-run its 'sweep run' command (corrected, if it was refused) to continue: {then}"
            )
        if _sweep_files(self.path) or (self.path / RUNS).is_dir():
            resume = f" (or 'sweep resume {self.path}')" if (self.path / CONFIG).is_file() else ""
            return SweepError(
                f"{self.path} has no {MANIFEST} (deleted?); re-run the same 'sweep run' command"
                f"{resume} to write it"
            )
        outer = enclosing_sweep(self.path)
        if outer is not None:
            return SweepError(
                f"{self.path} is not a sweep folder but inside the runs of the sweep {outer}; "
                "pass that sweep folder"
            )
        return SweepError(
            f"{self.path} is not a sweep folder (no {MANIFEST}); pass the sweep_dir of a sweep run"
        )

    def _just_made(self) -> bool:
        """Whether the folder changed in the last :data:`JUST_MADE` seconds (a ``sweep run``
        started then may not hold its lock yet)."""
        try:
            return abs(time.time() - self.path.stat().st_mtime) < JUST_MADE  # (NFS: skewed)
        except OSError:
            return False

    def run_ids(self) -> list[str]:
        """Runs listed in the manifest (grid order); a one-line error if this is no sweep."""
        if not self.path.is_dir():
            raise SweepError(
                f"{self.path} does not exist or is not a folder; pass the sweep_dir of a sweep run"
            )
        manifest = self.path / MANIFEST
        if not manifest.is_file():
            raise self._no_manifest()
        try:
            content = read_json(manifest)
            self._refuse_store(content)
            runs = content["runs"]
            return sorted(runs, key=lambda rid: grid_order(rid, runs[rid]))
        except (ValueError, KeyError, TypeError) as err:
            raise _damaged(manifest, err) from err

    def previous_ensembles(self) -> dict[str, str]:
        """run_id -> the ensemble it last trained in (runs never planned are absent); from the
        manifest, else (it was deleted) from what the run recorded when it started."""
        runs = self.manifest().get("runs", {})
        out = _agreed_ensembles(self.recorded_specs()) if not runs else {}
        out.update({rid: e["ensemble"] for rid, e in runs.items() if "ensemble" in e})
        return out

    def recorded_specs(self) -> dict[str, dict]:
        """run_id -> ``spec.json`` of every run folder that has one: what each started run
        trained with (what a re-run is checked against when config.yaml or the manifest
        is gone)."""
        return dict(self._specs())

    def first_spec(self) -> dict | None:
        """One started run's ``spec.json`` (the settings every run of the sweep shares)."""
        return next((spec for _, spec in self._specs()), None)

    def _specs(self) -> Iterator[tuple[str, dict]]:
        root = self.path / "runs"
        for f in sorted(root.iterdir()) if root.is_dir() else []:
            spec = RunFolder(f).spec() if f.is_dir() else {}
            if spec:
                yield f.name, spec

    def recorded_width(self) -> int | None:
        return self.manifest().get("width")

    def write_manifest(
        self,
        runs: list[dict],
        ensemble_of: dict[str, str],
        store: ChunkStore | None,
        grid: bool = False,
    ) -> None:
        """Record every run (``runs``: their specs), the ensemble each is planned in, and the
        store they train on (:meth:`ChunkStore.facts`; None: as recorded, for a grid with
        nothing to train); ``grid``: ``runs`` are the command's whole grid
        (:meth:`last_grid`), not some of its runs planned again."""
        old = self.manifest()
        known = old.get("runs", {})
        for spec in runs:
            entry = known.get(spec["run_id"], {})
            entry.update(spec)
            if spec["run_id"] in ensemble_of:
                entry["ensemble"] = ensemble_of[spec["run_id"]]
            known[spec["run_id"]] = entry
        manifest: dict = {"runs": known}
        if store is not None:
            manifest.update(store=store.facts(), width=store.width)
        if grid:
            manifest[GRID] = [spec["run_id"] for spec in runs]
        for kept in (GRID, LIMITS, STARTUP, "store", "width"):
            if kept in old and kept not in manifest:
                manifest[kept] = old[kept]
        manifest["updated"] = time.time()
        atomic_write_json(self.path / MANIFEST, manifest)

    def member_limits(self) -> dict[float, int]:
        """dict ratio -> the most members one ensemble of it may hold, learned when a larger
        one ran out of GPU memory in this sweep (planning caps at it unless
        ``grid.max_members`` is set)."""
        limits = self.manifest().get(LIMITS, {})
        try:
            out = {float(ratio): n for ratio, n in limits.items()}
        except (AttributeError, TypeError, ValueError) as err:
            raise SweepError(
                f"{self.path / MANIFEST}'s {LIMITS!r} is damaged ({type(err).__name__}); delete "
                f"that key (the limits are learned again) or set each to a member count"
            ) from err
        counts = all(type(n) is int and n >= 1 for n in out.values())  # not bool, 2.7, inf
        if not counts:
            raise SweepError(
                f"{self.path / MANIFEST}'s {LIMITS!r} holds a value that is no member count "
                "(a whole number >= 1); delete that key (the limits are learned again) or set "
                "each to a member count"
            )
        return out

    def record_member_limit(self, dict_ratio: float, members: int) -> None:
        manifest = self.manifest()
        limits = manifest.setdefault(LIMITS, {})
        key = repr(float(dict_ratio))
        limits[key] = min(members, limits.get(key, members))
        manifest["updated"] = time.time()
        atomic_write_json(self.path / MANIFEST, manifest)

    def record_startup(self, phases: dict[str, float]) -> None:
        """The latest driver's start-up (:mod:`sweep.startup`)."""
        self._record({STARTUP: phases})

    def record_state(self, state: str) -> None:
        """The sweep's own outcome: ``done``, ``failed`` or ``interrupted``."""
        self._record({"state": state})

    def _record(self, fields: dict) -> None:
        """Set ``fields`` in the manifest (and when it was updated), written atomically."""
        manifest = self.manifest()
        manifest.update(fields, updated=time.time())
        atomic_write_json(self.path / MANIFEST, manifest)

    # ------------------------------------------------------------------------- config

    def saved_config(self) -> Path | None:
        path = self.path / CONFIG
        return path if path.is_file() else None

    def load_config(self) -> dict | None:
        """The saved config as a plain dict (None before the first run); damaged: one line."""
        from omegaconf import OmegaConf

        path = self.saved_config()
        if path is None:
            return None
        try:
            loaded = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
        except Exception as err:  # yaml and omegaconf errors alike
            if unreadable(err):
                raise _damaged(path, err) from err  # (it could not be read: proves nothing)
            raise RunDirError(f"{path} is damaged ({type(err).__name__}); {_RESTORE}") from err
        groups = isinstance(loaded, dict) and all(
            isinstance(loaded.get(g), dict) and loaded[g].get("name") for g in ("data", "sae")
        )
        if groups:
            return loaded  # type: ignore[return-value]
        if not (self.path / MANIFEST).is_file():  # (no sweep ever planned here)
            raise RunDirError(
                f"{path} is not a sweep's config (no data and sae groups): {self.path} holds "
                "another tool's files; choose another sweep_dir"
            )
        raise RunDirError(f"{path} is damaged (its data or sae group is gone); {_RESTORE}")

    def write_config(self, yaml_text: str) -> None:
        atomic_write_bytes(self.path / CONFIG, yaml_text.encode())

    # ------------------------------------------------------------------------- activity

    def request_stop(self, signum: int) -> None:
        atomic_write_json(self.stop_file, {"time": time.time(), "signal": signum})

    def clear_stop(self) -> None:
        self.stop_file.unlink(missing_ok=True)

    def _stopped_preparing(self, chunks: list[Path]) -> bool:
        """A sweep that never planned: its ``sweep.log`` or store (``chunks``) exist, but no
        config."""
        started = (self.path / LOG).is_file() or bool(chunks)
        planned = (self.path / CONFIG, self.path / MANIFEST, self.path / RUNS)
        return started and not any(p.exists() for p in planned)

    def _store_chunks(self) -> list[Path]:
        """Chunk files written so far into a store in its default place (``SWEEP_DIR/store``)."""
        store = default_store_path(self.path)
        return list(store.rglob(STORE_CHUNKS)) if store.is_dir() else []

    @staticmethod
    def _store_complete(chunks: list[Path]) -> bool:
        """Every folder that holds ``chunks`` has its manifest (written last; a harvest's
        store has a folder per hook)."""
        return bool(chunks) and all((c.parent / STORE_MANIFEST).is_file() for c in chunks)

    def _store_progress(self, chunks: list[Path]) -> str:
        """The store's progress, for a message."""
        if not chunks:
            return ""
        if self._store_complete(chunks):
            return f" (store: complete, {len(chunks)} chunks)"
        return f" (store: {len(chunks)} chunks so far)"

    def driver_alive(self) -> bool:
        return self.driver_since() is not None

    def driver(self) -> dict | None:
        """The lock of the live driver holding the sweep (None: none)."""
        from sweep.lock import holder_alive, read_lock

        held = read_lock(self.path, strict=True)
        return held if held is not None and holder_alive(held, self.path / LOCK) else None

    def driver_since(self, training: bool = False) -> float | None:
        """When the live driver holding the sweep started (0 if it did not say); None: none
        (``training``: none that trains; a ``sweep evaluate`` trains nothing)."""
        from sweep.lock import activity

        held = self.driver()
        if held is None or (training and activity(held) != "running"):
            return None
        started = held.get("started", 0)
        return float(started) if isinstance(started, (int, float)) else 0.0

    def last_grid(self) -> set[str] | None:
        """The run ids of the last command's grid (None: a manifest from before it was kept)."""
        ids = self.manifest().get(GRID)
        return set(ids) if isinstance(ids, list) else None

    def activity(self) -> str:
        """``running`` when a live driver holds the lock (``evaluating``: a ``sweep evaluate``;
        ``stopping``: it was asked to stop), else the state the manifest recorded (each plan
        drops it: none means the last driver died before recording its outcome)."""
        from sweep.lock import activity

        held = self.driver()
        if held is not None:
            return "stopping" if self._stop_asked(held) else activity(held)
        return self.manifest().get("state", NO_OUTCOME)

    def _stop_asked(self, held: dict) -> bool:
        """Whether the driver of lock ``held`` has been asked to stop: it wrote the stop file,
        or a ``sweep stop`` request naming it waits for it (polled every second)."""
        from sweep.stop_request import request_for

        if request_for(self.path, held) is not None:
            return True
        try:
            return self.stop_file.stat().st_mtime >= float(held.get("started", 0.0))
        except (OSError, TypeError, ValueError):
            return False

    # ------------------------------------------------------------------------- runs

    def _sound_weights(self, ids: list[str]) -> set[str]:
        """Those of ``ids`` that are finished and whose final files verify, weights hashed,
        in parallel (hashing frees the GIL: a finished 64k x 2304 fp32 dictionary takes ~1 s)."""
        if not ids:
            return set()
        done = hashing_map(lambda rid: _done(self.run(rid), deep=True), ids)
        return {rid for rid, ok in zip(ids, done, strict=True) if ok}

    def read_runs(
        self,
        ids: list[str] | None = None,
        live: bool | None = None,
        deep: bool = False,
        trusted: Collection[str] = (),
    ) -> list[RunRecord]:
        """Every run of the manifest (or ``ids``), in grid order. Resumable runs count as
        ``running`` while a live driver trains the sweep (``live``: None = look at the lock;
        the driver itself passes False), and so do runs whose attempt began under that
        driver. ``deep``: a finished run's weights must match their checksum too (else only
        their size), but those of ``trusted`` (the caller has just verified or written them)."""
        since = self.driver_since(training=True) if live is None else (0.0 if live else None)
        points = self.manifest().get("runs")
        points = points if isinstance(points, dict) else {}
        records = []
        digest = functools.cache(self.finished_digest)  # (once, if a run has MMCS values)
        ids = self.run_ids() if ids is None else ids
        hash_ids = [r for r in ids if r not in trusted] if deep else []
        sound = self._sound_weights(hash_ids)
        for rid in ids:
            point = points.get(rid) if isinstance(points.get(rid), dict) else {}
            hashed = deep and rid not in trusted and rid not in sound
            try:
                records.append(self._run_record(rid, point, hashed, since, digest))
            except RunDirError as err:  # a file of it could not be read: said, not judged
                folder, note = self.run(rid), str(err)
                records.append(
                    RunRecord(
                        rid, folder, RunState.PENDING, {}, {}, note=note, point=point, unread=True
                    )
                )
        return records

    def _run_record(
        self, rid: str, point: dict, hashed: bool, since: float | None, digest: Callable[[], str]
    ) -> RunRecord:
        """Run ``rid`` as :meth:`read_runs` reads it (``since``: when the live driver that
        trains the sweep started, None: there is none)."""
        folder, live = self.run(rid), since is not None
        state = folder.state(hashed)
        # with no driver, a pending run's curve is of work it will redo (no checkpoint kept it)
        stale = state is RunState.PENDING and not live
        last = {} if state.final or stale else folder.last_curve()
        if live and (state.resumable or _began_under(folder, state, since)):
            state = RunState.RUNNING
        metrics = folder.recorded_metrics() if state.final else {}  # (checked by state)
        metrics = _current_mmcs(metrics, digest)
        note = folder.failure() if state is RunState.FAILED else metrics.get("note", "")
        why, kept = ("", False) if note else _why_unfinished(folder, state, hashed)
        return RunRecord(rid, folder, state, folder.spec(), metrics, last, note or why, point, kept)
