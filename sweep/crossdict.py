"""Cross-run bookkeeping: MMCS between the runs of a sweep, cached, and written back.

MMCS from dictionary A to dictionary B is the mean over A's decoder atoms of the largest
cosine similarity to any atom of B (the signal Cunningham et al. read: atoms that reappear
in a larger dictionary, or under another seed, are more likely real features); the math is
:func:`sweep.metrics.max_cos_both`. Which pairs are compared, the cache, and what each run
gets live here.

A grid point's sparsity setting (its *knob*) is ``k`` for TopK-style runs (``sae=topk``,
``batchtopk``, ``matryoshka``: their spec and summary row carry ``k``), the L0 coefficient for JumpReLU
(``grid.l1`` there weighs the L0 penalty: named ``l0``) and the L1 coefficient otherwise;
:func:`knob` reads it, and every reader (report, plots, page, API) goes through it.

Per run (written into ``metrics.json`` of finished runs by :func:`annotate_runs`):

- ``mmcs_next_ratio``: A = this run, B = the run with the same knob value (L1 or k) and seed
  at the next larger dict ratio of the sweep (``mmcs_next_ratio_run`` names it);
- ``mmcs_seeds``: mean MMCS from this run to the other seeds at the same (knob value, ratio).
"""

from __future__ import annotations

import errno
import itertools
import json
import logging
import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sweep import archs, metrics, sae
from sweep.errors import RunDirError
from sweep.io import atomic_write_json, json_number
from sweep.rate import interval
from sweep.rundir import MATRIX_RUNS, RunFolder
from sweep.sweepdir import MMCS_KEYS, MMCS_OVER, RunRecord

log = logging.getLogger(__name__)

CACHE = "mmcs_cache.json"

KNOB_NAMES = {"l1": "L1", "k": "k", "l0": "L0 coeff."}
"""How each knob is written in labels and text."""
KNOB_AXES = {
    "l1": "L1 coefficient",
    "k": "k (active latents per row)",
    "l0": "L0 coefficient (JumpReLU's grid.l1)",
}
"""Each knob as an axis label."""
KNOB_FIELDS = {"l1": "l1", "k": "k", "l0": "l1"}
"""The grid field (and summary column) holding each knob's values (JumpReLU's is grid.l1)."""


def knob(row: Mapping) -> tuple[str, float | None]:
    """A run's sparsity setting as (name, value): ``("k", k)`` for TopK-style runs (a summary
    row or spec with ``k`` >= 1), ``("l0", l1)`` for an L0 penalty (JumpReLU), else
    ``("l1", l1)`` (value None when unknown)."""
    k = row.get("k")
    if json_number(k) and math.isfinite(k) and k >= 1:
        return "k", k
    l1 = row.get("l1")
    name = "l0" if _l0_penalty(row.get("sae") or row.get("arch")) else "l1"
    return name, l1 if json_number(l1) else None


def _l0_penalty(arch: object) -> bool:
    return isinstance(arch, str) and arch in archs.REGISTRY and archs.get(arch).l0_penalty


def knob_value(row: Mapping) -> float | None:
    return knob(row)[1]


def sweep_knob(rows: Iterable[Mapping]) -> str:
    """The knob a sweep's grid varies: ``k`` when any run has one, ``l0`` when every run
    weighs an L0 penalty, else ``l1``."""
    return common_knob(knob(r)[0] for r in rows)


def common_knob(names: Iterable[str]) -> str:
    """The knob of runs whose knobs are ``names``: ``k`` if any is, a name all share, else ``l1``."""
    seen = set(names)
    return "k" if "k" in seen else seen.pop() if len(seen) == 1 else "l1"


def knob_text(name: str, value: float) -> str:
    """A knob value for labels: ``0.01`` (L1, L0 coefficient), ``16`` (k). A coefficient
    written with up to 6 significant digits shows as written (grid values 0.001 and 0.0011
    label apart); one that is not (``0.0031622776...`` from a logspace) shows 2."""
    if name == "k":
        return str(int(value)) if float(value).is_integer() else f"{value:g}"
    for digits in range(2, 7):
        text = f"{value:.{digits}g}"
        if float(text) == value:
            return text
    return f"{value:.2g}"


def load_density(folder: RunFolder) -> dict[str, torch.Tensor] | None:
    """A run's density tensors, or None when it has none (older or unfinished runs)."""
    try:
        return folder.density()
    except Exception as err:  # a damaged file must not sink the report
        log.warning("%s: unreadable density (%s); skipping it", folder.path, err)
        return None


def unit_atoms(folder: RunFolder | Path, device: torch.device) -> torch.Tensor:
    """The run's decoder atoms as unit rows: (F, D) float32 on ``device``."""
    folder = folder if isinstance(folder, RunFolder) else RunFolder(Path(folder))
    arch = folder.cfg().get("architecture", "untied")
    return metrics.unit_rows(sae.decoder(folder.weights(), arch).to(device))


@dataclass
class RunRef:
    """A finished run, as the cross-dictionary code needs it."""

    run_id: str
    knob: str
    """``l1``, ``l0`` or ``k`` (:func:`knob`)."""
    value: float
    """The L1 or L0 coefficient, or k."""
    dict_ratio: float
    seed: int
    folder: RunFolder
    stamp: str
    """Changes whenever the run's final weights do (:meth:`RunFolder.weights_stamp`):
    invalidates the pair values cached from them."""
    lr: float | None = None
    """Its learning rate where the grid has an lr axis (``grid.lr``)."""


def finished_runs(records: Iterable[RunRecord]) -> list[RunRef]:
    """Runs whose state is ``done`` and whose weights exist, ordered by ratio, knob value
    (L1 or k), seed."""
    out = []
    for r in records:
        if r.state != "done" or not r.folder.has_weights():
            continue
        point = r.grid_point
        if not isinstance(point.get("dict_ratio"), (int, float)) or point.get("seed") is None:
            log.warning("%s: its grid point is unknown (spec.json damaged); left out", r.run_id)
            continue
        name, value = knob(point)
        out.append(
            RunRef(
                r.run_id,
                name,
                float(value if value is not None else math.nan),
                float(point["dict_ratio"]),
                int(point["seed"]),
                r.folder,
                r.folder.weights_stamp(),
                point.get("lr") if isinstance(point.get("lr"), (int, float)) else None,
            )
        )
    return sorted(out, key=lambda x: (x.dict_ratio, x.knob, x.value, x.lr or 0, x.seed))


@dataclass
class PairCache:
    """MMCS values already computed, keyed by run pair; stale entries are recomputed."""

    path: Path | None
    values: dict[str, dict] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path | None) -> PairCache:
        if path is None or not path.is_file():
            return cls(path)
        try:
            return cls(path, json.loads(path.read_text()))
        except (OSError, ValueError):
            return cls(path)

    def get(self, a: RunRef, b: RunRef) -> float | None:
        hit = self.values.get(f"{a.run_id}|{b.run_id}")
        return hit["mmcs"] if hit and hit.get("stamp") == f"{a.stamp}|{b.stamp}" else None

    def put(self, a: RunRef, b: RunRef, value: float) -> None:
        self.values[f"{a.run_id}|{b.run_id}"] = {"mmcs": value, "stamp": f"{a.stamp}|{b.stamp}"}

    def save(self) -> None:
        if self.path is not None:
            atomic_write_json(self.path, self.values)


SAVE_EVERY = 30.0
"""Seconds between saves of the pair cache (and progress lines) while pairs are computed: an
interrupted report keeps what it computed."""


def pair_work(a: RunRef, b: RunRef) -> float:
    """What comparing two dictionaries costs, up to a constant: the product of their sizes
    (one sweep's runs share a width)."""
    return a.dict_ratio * b.dict_ratio


class PairMMCS:
    """MMCS between finished runs, with atoms loaded once and results cached on disk (saved
    every :data:`SAVE_EVERY` seconds of computing and at the end)."""

    def __init__(
        self, device: torch.device, cache: PairCache, todo: int = 0, work: float = 0.0
    ) -> None:
        self.device, self.cache = device, cache
        self._atoms: dict[str, torch.Tensor] = {}
        self._saved = self._began = time.monotonic()
        self.todo, self.done = todo, 0
        """Pairs not cached when the report began (for progress lines), and computed since."""
        self.work, self.worked = work, 0.0
        """Their cost (:func:`pair_work`) in all, and of those computed since."""

    def _unit(self, r: RunRef) -> torch.Tensor:
        if r.run_id not in self._atoms:
            self._atoms[r.run_id] = unit_atoms(r.folder, self.device)
        return self._atoms[r.run_id]

    def __call__(self, a: RunRef, b: RunRef) -> float:
        """MMCS from ``a`` to ``b`` (computes and caches both directions)."""
        hit = self.cache.get(a, b)
        if hit is not None:
            return hit
        ab, ba = metrics.max_cos_both(self._unit(a), self._unit(b))
        self.cache.put(a, b, float(ab.mean()))
        self.cache.put(b, a, float(ba.mean()))
        self.done, self.worked = self.done + 1, self.worked + pair_work(a, b)
        if time.monotonic() - self._saved >= SAVE_EVERY:
            self.cache.save()
            self._saved = time.monotonic()
            log.info("MMCS: %d of %d pairs of dictionaries compared%s", self.done, self.todo,
                     self._left())  # fmt: skip
        return self.cache.get(a, b)  # type: ignore[return-value]

    def _left(self) -> str:
        """``; about 00:12:30 left`` at the cost rate so far (pairs of larger dictionaries
        cost more: :func:`pair_work`)."""
        spent = time.monotonic() - self._began
        if not self.worked or self.work <= self.worked:
            return ""
        return f"; about {interval((self.work - self.worked) * spent / self.worked)} left"

    def release(self, keep: set[str]) -> None:
        """Drop loaded atoms not in ``keep`` (bounded memory across ratios)."""
        self._atoms = {k: v for k, v in self._atoms.items() if k in keep}


@dataclass
class CrossDict:
    """Cross-dictionary results of one sweep."""

    matrices: dict[float, tuple[list[RunRef], list[list[float]]]]
    """dict ratio -> (the runs its matrix covers (:func:`matrix_runs`), ordered by knob value
    (L1 or k) then seed, MMCS matrix [i][j] = mmcs(run i -> run j))."""
    per_run: dict[str, dict[str, float | str]]
    """run_id -> {mmcs_next_ratio, mmcs_next_ratio_run, mmcs_seeds} (keys present when defined)."""
    finished: dict[float, int] = field(default_factory=dict)
    """dict ratio -> its finished runs (more than its matrix covers when they exceed
    :data:`MATRIX_RUNS`)."""
    matrix_runs: int = MATRIX_RUNS
    """At most this many runs of a ratio in its matrix (0: no matrices)."""


def compute(
    records: list[RunRecord],
    device: torch.device,
    cache_path: Path | None = None,
    most: int = MATRIX_RUNS,
) -> CrossDict:
    """Cross-dictionary MMCS over the sweep's finished runs: every run's per-run values, and
    a matrix per dict ratio over at most ``most`` of its runs (:func:`matrix_runs`; 0: none,
    and none of the pairs only a matrix needs)."""
    runs = finished_runs(records)
    ratios = sorted({r.dict_ratio for r in runs})
    groups = {ratio: [r for r in runs if r.dict_ratio == ratio] for ratio in ratios}
    larger = _next_ratio_groups(groups, records)
    cache = PairCache.load(cache_path)
    todo = [(a, b) for a, b in _pairs(groups, larger, most) if cache.get(a, b) is None]
    if todo:
        log.info("MMCS: comparing %d pairs of dictionaries", len(todo))
    pair = PairMMCS(device, cache, len(todo), sum(pair_work(a, b) for a, b in todo))
    matrices: dict[float, tuple[list[RunRef], list[list[float]]]] = {}
    per_run: dict[str, dict[str, float | str]] = {r.run_id: {} for r in runs}
    for ratio in ratios:
        group, nxt = groups[ratio], larger[ratio]
        shown = matrix_runs(group, most)
        matrices[ratio] = (shown, [[1.0 if a is b else pair(a, b) for b in shown] for a in shown])
        _seed_values(group, pair, per_run)
        _next_ratio_values(group, nxt, pair, per_run)
        pair.release({r.run_id for r in nxt})
    if pair.done:  # (else the cache on disk holds it all already)
        pair.cache.save()
    return CrossDict(matrices, per_run, {ratio: len(g) for ratio, g in groups.items()}, most)


def matrix_runs(group: list[RunRef], most: int = MATRIX_RUNS) -> list[RunRef]:
    """The runs of one dict ratio (in knob, seed order) that its MMCS matrix covers: all, or
    above ``most`` the first seed's, thinned evenly over the knob values (0: none)."""
    if most <= 0:
        return []
    if len(group) <= most:
        return group
    first = min(r.seed for r in group)
    return spread([r for r in group if r.seed == first], most)


def spread(items: list, n: int) -> list:
    """At most ``n`` items, evenly spread and including the ends."""
    if len(items) <= n or n < 2:
        return list(items[: max(n, 1)])
    idx = sorted({round(i * (len(items) - 1) / (n - 1)) for i in range(n)})
    return [items[i] for i in idx]


def _next_ratio_groups(
    groups: dict[float, list[RunRef]], records: Iterable[RunRecord]
) -> dict[float, list[RunRef]]:
    """Each ratio's finished runs of the next larger dict ratio of the sweep (of all its
    runs: [] while none of that ratio has finished, never the ratio after it)."""
    every = sorted(
        {float(v) for r in records if isinstance(v := r.grid_point.get("dict_ratio"), (int, float))}
        | set(groups)
    )
    nxt = dict(itertools.pairwise(every))
    return {ratio: groups.get(nxt.get(ratio), []) for ratio in groups}


def _pairs(
    groups: dict[float, list[RunRef]], larger: dict[float, list[RunRef]], most: int
) -> list[tuple[RunRef, RunRef]]:
    """Every pair :func:`compute` compares, once each (either direction)."""
    out: dict[frozenset[str], tuple[RunRef, RunRef]] = {}
    for ratio, group in groups.items():
        shown = matrix_runs(group, most)
        found = [(a, b) for a in shown for b in shown if a is not b]
        found += [(a, b) for a in group for b in _seed_mates(a, group)]
        found += list(_next_ratio_partners(group, larger[ratio]))
        for a, b in found:
            out.setdefault(frozenset((a.run_id, b.run_id)), (a, b))
    return list(out.values())


def _point(r: RunRef) -> tuple[str, float, float | None]:
    """The run's grid point within its dict ratio, seeds aside: (knob, value, lr)."""
    return r.knob, r.value, r.lr


def _seed_mates(a: RunRef, group: list[RunRef]) -> list[RunRef]:
    return [b for b in group if _point(b) == _point(a) and b.seed != a.seed]


def _seed_values(group: list[RunRef], pair: PairMMCS, per_run: dict) -> None:
    for a in group:
        others = [pair(a, b) for b in _seed_mates(a, group)]
        if others:
            per_run[a.run_id]["mmcs_seeds"] = sum(others) / len(others)


def _next_ratio_partners(group: list[RunRef], larger: list[RunRef]):
    """(run, the run with its knob value and seed at the next larger ratio) where there is one."""
    by_point = {(*_point(r), r.seed): r for r in larger}
    for a in group:
        b = by_point.get((*_point(a), a.seed))
        if b is not None:
            yield a, b


def _next_ratio_values(
    group: list[RunRef], larger: list[RunRef], pair: PairMMCS, per_run: dict
) -> None:
    for a, b in _next_ratio_partners(group, larger):
        per_run[a.run_id]["mmcs_next_ratio"] = pair(a, b)
        per_run[a.run_id]["mmcs_next_ratio_run"] = b.run_id


def annotate_runs(records: list[RunRecord], cross: CrossDict, digest: str) -> None:
    """Write each finished run's cross-dictionary values into its ``metrics.json``, stamped
    with the sweep's :meth:`~sweep.sweepdir.SweepFolder.finished_digest` they were computed
    at (readers drop them once it changes). A run folder made read-only keeps its values,
    with a warning (the report has the new ones)."""
    kept = []
    for r in records:
        if r.run_id in cross.per_run:
            values = {**cross.per_run[r.run_id], MMCS_OVER: digest}
            try:
                r.folder.update_metrics(values, replace_keys=(*MMCS_KEYS, MMCS_OVER))
            except RunDirError:  # (it could not be read: left as it is)
                kept.append(r.run_id)
            except OSError as err:
                if err.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
                    raise  # (a full disk: one line, as every write of the report)
                kept.append(r.run_id)
    if kept:
        log.warning(
            "could not update the metrics.json of %s (read-only or unreadable): they keep "
            "their MMCS values (the report has the new ones)", ", ".join(kept),
        )  # fmt: skip


def matrix_rows(cross: CrossDict) -> tuple[list[str], list[list[float | None]]]:
    """All finished runs (by ratio, knob value, seed) and one square matrix over them; cells
    between runs of different ratios are None (``mmcs.csv``)."""
    ids: list[str] = []
    where: dict[str, tuple[float, int]] = {}
    for ratio, (group, _) in sorted(cross.matrices.items()):
        for i, r in enumerate(group):
            ids.append(r.run_id)
            where[r.run_id] = (ratio, i)
    out: list[list[float | None]] = []
    for a in ids:
        ra, ia = where[a]
        row: list[float | None] = []
        for b in ids:
            rb, ib = where[b]
            row.append(cross.matrices[ra][1][ia][ib] if ra == rb else None)
        out.append(row)
    return ids, out
