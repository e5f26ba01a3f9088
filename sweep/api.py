"""A stable Python API for notebooks.

    import sweep
    sae = sweep.load_run("outputs/x/runs/r4-l1_1e-02-s0")     # one dictionary (raw activations in)
    sw = sweep.load_sweep("outputs/x")
    sw.table                                                   # pandas DataFrame, one row per run
    front = sw.table[sw.table.frontier].sort_values("l0")      # the FVU-L0 frontier's runs
    sw.sae(front.index[0])                                     # loaded on first use, then cached
    x = sw.heldout()                                           # the rows the metrics measured

Loading a sweep reads only JSON (specs, metrics, DONE markers); weights are read when a
dictionary is first asked for.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch

from sweep import crossdict, rundir
from sweep.activations.layout import MANIFEST as STORE_MANIFEST
from sweep.activations.store import ChunkStore
from sweep.errors import SweepError
from sweep.sae import SAE, as_device, load_run
from sweep.sweepdir import SweepFolder, default_store_path, summary_columns, with_frontier

log = logging.getLogger(__name__)


@dataclass
class Sweep:
    """One sweep folder: its table and its dictionaries (loaded lazily)."""

    path: Path
    table: pd.DataFrame
    """One row per run (index: run_id): l1 (or k, for TopK-style sweeps), dict_ratio, seed,
    state, final metrics, ``frontier`` (on the FVU–L0 Pareto frontier of the finished runs, as
    the report draws it) and ``arch``."""
    device: str | torch.device = "cpu"
    _cache: dict[str, SAE] = field(default_factory=dict, repr=False)

    @property
    def run_ids(self) -> list[str]:
        return list(self.table.index)

    def run_dir(self, run_id: str) -> Path:
        """The run folder of ``run_id`` (one of :attr:`run_ids`)."""
        if run_id not in self.table.index:
            raise SweepError(f"no run {run_id!r} in {self.path}; see sweep.table.index for run ids")
        return rundir.run_dir(self.path, run_id)

    def sae(self, run_id: str) -> SAE:
        """The dictionary of one finished run (loaded on first call, then cached)."""
        if run_id not in self._cache:
            self._cache[run_id] = self._load(run_id)
        return self._cache[run_id]

    def _load(self, run_id: str) -> SAE:
        """(A finished run whose files fail their checks: :func:`load_run` names what failed.)"""
        if not (self.run_dir(run_id) / rundir.DONE).is_file():
            raise SweepError(
                f"run {run_id} is not finished yet (no DONE); pick a run whose state is done"
            )
        return load_run(str(self.run_dir(run_id)), device=self.device)

    def saes(self, state: str = "done") -> Iterator[tuple[str, SAE]]:
        """(run_id, SAE) for every run in ``state`` (``done``, or ``diverged``: frozen weights),
        loaded one at a time and not kept (memory holds the one in hand; ``sae(run_id)``
        keeps what it loads). A run that cannot be loaded (its weights fail their checksum,
        ...) is skipped with a warning naming why; ``sae(run_id)`` raises."""
        if state not in rundir.FINAL_STATES:
            raise SweepError(
                f"runs in state {state!r} have no dictionary to load yet; pass one of: "
                f"{', '.join(rundir.FINAL_STATES)}"
            )
        for rid in self.table.index[self.table["state"] == state]:
            try:
                sae = self._cache.get(rid) or self._load(rid)
            except SweepError as err:
                log.warning("skipped run %s: %s", rid, err)
                continue
            yield rid, sae

    def snapshots(self, run_id: str) -> Iterator[tuple[int, SAE]]:
        """(step, SAE) of each snapshot of one run (``train.snapshots``: its weights as they
        were after that step), in step order, loaded one at a time; a snapshot still being
        written (no ``cfg.json`` yet) is passed over, one whose weights fail their checksum
        raises (:func:`load_run`)."""
        for step, folder in rundir.RunFolder(self.run_dir(run_id)).snapshots():
            yield step, load_run(str(folder), device=self.device)

    def __getitem__(self, run_id: str) -> SAE:
        if not isinstance(run_id, str):
            raise SweepError(
                f"a sweep is indexed by run id (a str), not {type(run_id).__name__}; "
                "s.run_ids lists them (s.saes() iterates the dictionaries)"
            )
        return self.sae(run_id)

    def __iter__(self) -> Iterator[str]:
        """The run ids, in grid order (``for rid in sweep``; ``sweep[rid]`` its dictionary)."""
        return iter(self.run_ids)

    def __contains__(self, run_id: object) -> bool:
        return isinstance(run_id, str) and run_id in self.table.index

    def __len__(self) -> int:
        return len(self.table)

    def heldout(self, store: str | Path | None = None) -> torch.Tensor:
        """The held-out rows every run's metrics measured, raw, float32, on this sweep's
        device: the last ``data.eval_rows`` rows of the store the runs trained on (``store``:
        where that store lies now, if it moved). Another store is refused."""
        folder = SweepFolder(self.path)
        recorded = folder.manifest().get("store") or {}
        chunks = self._store(store, recorded)
        if recorded.get("id") not in (None, *chunks.identities) or (
            recorded.get("width") not in (None, chunks.width)
        ):
            raise SweepError(
                f"{chunks.path} is not the store sweep {self.path} trained on (another "
                "content); pass the path of that store"
            )
        return chunks.tail_rows(_eval_rows(folder)).float().to(self.device)

    def _store(self, store: str | Path | None, recorded: dict) -> ChunkStore:
        """The sweep's store: at ``store``, else where it was recorded, else in the sweep's
        own ``store/`` (a sweep folder moved with its store inside): the first of these that
        holds the recorded store (or, none does, the first that holds a store)."""
        if store is not None:
            found = [Path(store).expanduser()]
        else:
            found = [Path(p) for p in (recorded.get("path"),) if p]
            found.append(default_store_path(self.path))
        there = [path for path in found if (path / STORE_MANIFEST).is_file()]
        for path in there:
            chunks = ChunkStore(path)
            if recorded.get("id") in (None, *chunks.identities):
                return chunks
        if there:  # (refused by the caller, naming it)
            return ChunkStore(there[0])
        raise SweepError(
            f"no chunk store at {found[0]} (the store sweep {self.path} trained on); pass "
            "where it lies now: heldout(store=...)"
        )


def _eval_rows(folder: SweepFolder) -> int:
    """``data.eval_rows`` of the sweep: from its config.yaml, else a started run's spec."""
    data = (folder.load_config() or {}).get("data") or (folder.first_spec() or {}).get("data")
    if not isinstance(data, dict) or not isinstance(data.get("eval_rows"), int):
        raise SweepError(
            f"{folder.path} records no data.eval_rows (no config.yaml, and no run has a "
            "spec.json yet): nothing says which rows were held out"
        )
    return data["eval_rows"]


def load_sweep(path: str | Path, device: str | torch.device = "cpu") -> Sweep:
    """Open a sweep folder (finished or running) as a table plus lazily loaded SAEs. The table
    has the sweep's sparsity column: ``l1``, or ``k`` for TopK-style sweeps (whose ``l1`` is
    unused and left out)."""
    path, device = Path(path).expanduser().absolute(), as_device(device)  # (a later chdir)
    rows = with_frontier([r.row() for r in SweepFolder(path).read_runs()])
    cols = [c for c in summary_columns(rows) if c not in _unused_knobs(rows)]
    table = pd.DataFrame(rows, columns=[*cols, "arch"]).set_index("run_id")
    return Sweep(path, table, device)


def _unused_knobs(rows: list[dict]) -> set[str]:
    """``k`` in a sweep without k values; ``l1`` in a TopK-style sweep (no run has an l1)."""
    if crossdict.sweep_knob(rows) == "l1":
        return {"k"}
    return {"l1"} if all(r.get("l1") is None for r in rows) else set()
