"""Metrics across dictionaries (MMCS between runs) and per-run feature-density data.

MMCS from dictionary A to dictionary B is the mean over A's decoder atoms of the largest
cosine similarity to any atom of B (the signal Cunningham et al. read: atoms that reappear
in a larger dictionary, or under another seed, are more likely real features). It is not
symmetric; :func:`max_cos_both` gets both directions from one similarity matrix.

Per run (written into ``metrics.json`` of finished runs by :func:`annotate_runs`):

- ``mmcs_next_ratio``: A = this run, B = the run with the same L1 and seed at the next
  larger dict ratio of the sweep (``mmcs_next_ratio_run`` names it);
- ``mmcs_seeds``: mean MMCS from this run to the other seeds at the same (L1, ratio).

Density: ``feature_density.safetensors`` in a run folder holds each feature's firing
frequency on the evaluation rows and a histogram of log10 frequency on fixed bins, so the
histograms of all runs are comparable.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save

from sweep import rundir, sae

log = logging.getLogger(__name__)

DENSITY = "feature_density.safetensors"
HIST_EDGES = torch.linspace(-8.0, 0.0, 41, dtype=torch.float64)
"""Fixed log10-frequency bin edges (0.2 decades); dead features are counted separately."""
CACHE = "mmcs_cache.json"


# ----------------------------------------------------------------------------- density


def density_tensors(freq_F: torch.Tensor) -> dict[str, torch.Tensor]:
    """Frequency (F,), log10 histogram counts (B,) over :data:`HIST_EDGES` (B+1,), dead count."""
    freq = freq_F.detach().double().cpu()
    alive = freq[freq > 0]
    logf = alive.log10().clamp(float(HIST_EDGES[0]), float(HIST_EDGES[-1]))
    counts = (
        torch.histogram(logf, bins=HIST_EDGES).hist.long()
        if alive.numel()
        else torch.zeros(len(HIST_EDGES) - 1, dtype=torch.long)
    )
    return {
        "frequency": freq,
        "log10_hist_counts": counts,
        "log10_hist_edges": HIST_EDGES.clone(),
        "dead_count": torch.tensor([int((freq == 0).sum())]),
    }


def save_density(folder: Path, freq_F: torch.Tensor, eval_rows: int) -> None:
    """Write ``feature_density.safetensors`` into a run folder (atomically)."""
    data = save(density_tensors(freq_F), metadata={"eval_rows": str(eval_rows)})
    rundir.atomic_write_bytes(Path(folder) / DENSITY, data)


def load_density(folder: Path) -> dict[str, torch.Tensor] | None:
    """A run's density tensors, or None when it has none (older or unfinished runs)."""
    path = Path(folder) / DENSITY
    if not path.is_file():
        return None
    try:
        return load_file(str(path))
    except Exception as err:  # a damaged file must not sink the report
        log.warning("%s: unreadable (%s); skipping its density", path, err)
        return None


# ----------------------------------------------------------------------------- MMCS


def unit_atoms(folder: Path, device: torch.device) -> torch.Tensor:
    """The run's decoder atoms as unit rows: (F, D) float32 on ``device``."""
    params = load_file(str(Path(folder) / rundir.WEIGHTS))
    dec = sae.decoder(params).float().to(device)  # (F, D)
    return dec / dec.norm(dim=1, keepdim=True).clamp_min(1e-12)


@torch.no_grad()
def max_cos_both(
    a_FD: torch.Tensor, b_GD: torch.Tensor, chunk: int = 4096
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit rows in; per row of ``a`` the max cosine to ``b`` (F,), and per row of ``b`` to ``a`` (G,).

    Works in row blocks of ``a`` so the (F, G) similarity matrix is never held whole.
    """
    best_a = torch.empty(a_FD.shape[0], device=a_FD.device)
    best_b = torch.full((b_GD.shape[0],), -1.0, device=a_FD.device)
    for at in range(0, a_FD.shape[0], chunk):
        sim = a_FD[at : at + chunk] @ b_GD.T  # (f, D) @ (D, G) -> (f, G)
        best_a[at : at + chunk] = sim.max(dim=1).values
        best_b = torch.maximum(best_b, sim.max(dim=0).values)
    return best_a, best_b


@dataclass
class RunRef:
    """A finished run, as the cross-dictionary code needs it."""

    run_id: str
    l1: float
    dict_ratio: float
    seed: int
    folder: Path
    stamp: str
    """Changes whenever the run is re-finished (its DONE time): invalidates cached values."""


def finished_runs(sweep_dir: Path, rows: Iterable[dict]) -> list[RunRef]:
    """Runs whose state is ``done`` and whose weights exist, ordered by ratio, L1, seed."""
    out = []
    for r in rows:
        folder = rundir.run_dir(sweep_dir, r["run_id"])
        if r.get("state") != "done" or not (folder / rundir.WEIGHTS).is_file():
            continue
        stamp = str(rundir.read_json(folder / rundir.DONE).get("finished", ""))
        out.append(
            RunRef(
                r["run_id"], float(r["l1"]), float(r["dict_ratio"]), int(r["seed"]), folder, stamp
            )
        )
    return sorted(out, key=lambda x: (x.dict_ratio, x.l1, x.seed))


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
            rundir.atomic_write_json(self.path, self.values)


class PairMMCS:
    """MMCS between finished runs, with atoms loaded once and results cached on disk."""

    def __init__(self, device: torch.device, cache: PairCache) -> None:
        self.device, self.cache = device, cache
        self._atoms: dict[str, torch.Tensor] = {}

    def _unit(self, r: RunRef) -> torch.Tensor:
        if r.run_id not in self._atoms:
            self._atoms[r.run_id] = unit_atoms(r.folder, self.device)
        return self._atoms[r.run_id]

    def __call__(self, a: RunRef, b: RunRef) -> float:
        """MMCS from ``a`` to ``b`` (computes and caches both directions)."""
        hit = self.cache.get(a, b)
        if hit is not None:
            return hit
        ab, ba = max_cos_both(self._unit(a), self._unit(b))
        self.cache.put(a, b, float(ab.mean()))
        self.cache.put(b, a, float(ba.mean()))
        return self.cache.get(a, b)  # type: ignore[return-value]

    def release(self, keep: set[str]) -> None:
        """Drop loaded atoms not in ``keep`` (bounded memory across ratios)."""
        self._atoms = {k: v for k, v in self._atoms.items() if k in keep}


@dataclass
class CrossDict:
    """Cross-dictionary results of one sweep."""

    matrices: dict[float, tuple[list[RunRef], list[list[float]]]]
    """dict ratio -> (runs ordered by L1 then seed, MMCS matrix [i][j] = mmcs(run i -> run j))."""
    per_run: dict[str, dict[str, float | str]]
    """run_id -> {mmcs_next_ratio, mmcs_next_ratio_run, mmcs_seeds} (keys present when defined)."""


def compute(
    sweep_dir: Path, rows: list[dict], device: torch.device, cache_path: Path | None = None
) -> CrossDict:
    """All cross-dictionary MMCS values over the sweep's finished runs."""
    runs = finished_runs(sweep_dir, rows)
    pair = PairMMCS(device, PairCache.load(cache_path))
    ratios = sorted({r.dict_ratio for r in runs})
    matrices: dict[float, tuple[list[RunRef], list[list[float]]]] = {}
    per_run: dict[str, dict[str, float | str]] = {r.run_id: {} for r in runs}
    for k, ratio in enumerate(ratios):
        group = [r for r in runs if r.dict_ratio == ratio]
        mat = [[1.0 if a is b else pair(a, b) for b in group] for a in group]
        matrices[ratio] = (group, mat)
        _seed_values(group, mat, per_run)
        if k + 1 < len(ratios):
            _next_ratio_values(
                group, [r for r in runs if r.dict_ratio == ratios[k + 1]], pair, per_run
            )
        pair.release(
            {r.run_id for r in runs if k + 1 < len(ratios) and r.dict_ratio == ratios[k + 1]}
        )
    pair.cache.save()
    return CrossDict(matrices, per_run)


def _seed_values(group: list[RunRef], mat: list[list[float]], per_run: dict) -> None:
    for i, a in enumerate(group):
        others = [mat[i][j] for j, b in enumerate(group) if b.l1 == a.l1 and b.seed != a.seed]
        if others:
            per_run[a.run_id]["mmcs_seeds"] = sum(others) / len(others)


def _next_ratio_values(
    group: list[RunRef], larger: list[RunRef], pair: PairMMCS, per_run: dict
) -> None:
    by_point = {(r.l1, r.seed): r for r in larger}
    for a in group:
        b = by_point.get((a.l1, a.seed))
        if b is not None:
            per_run[a.run_id]["mmcs_next_ratio"] = pair(a, b)
            per_run[a.run_id]["mmcs_next_ratio_run"] = b.run_id


MMCS_KEYS = ("mmcs_next_ratio", "mmcs_next_ratio_run", "mmcs_seeds")


def annotate_runs(sweep_dir: Path, cross: CrossDict) -> None:
    """Write each finished run's cross-dictionary values into its ``metrics.json``."""
    for run_id, values in cross.per_run.items():
        path = rundir.run_dir(sweep_dir, run_id) / rundir.METRICS
        if not path.is_file():
            continue
        m = rundir.read_json(path)
        new = {k: v for k, v in m.items() if k not in MMCS_KEYS}
        new.update(values)
        if new != m:
            rundir.atomic_write_json(path, new)


def matrix_rows(cross: CrossDict) -> tuple[list[str], list[list[float | None]]]:
    """All finished runs (by ratio, L1, seed) and one square matrix over them; cells between
    runs of different ratios are None (``mmcs.csv``)."""
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


def finite(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
