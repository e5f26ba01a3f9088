"""Facts about a sweep's runs that the terminal table, the report page and the plots share:
which values count (finite, of finished runs), the FVU–L0 Pareto frontier, and when a
``loss_recovered`` divides by noise. No plotting here (the table must not pay for matplotlib).
"""

from __future__ import annotations

import math

from sweep.crossdict import knob_value

MIN_ABLATION_GAP = 0.1
"""nats. Below this ``ce_loss_ablated - ce_loss_clean``, ``loss_recovered`` (a ratio over
that gap) is noise: a tiny model can score 1.37 when zero-ablation costs 0.018 nats."""


def finite(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def finished(rows: list[dict], *keys: str) -> list[dict]:
    return [r for r in rows if r.get("state") == "done" and all(finite(r.get(k)) for k in keys)]


def with_knob(rows: list[dict], *keys: str) -> list[dict]:
    """Finished runs with a finite knob value (L1 or k) and finite ``keys``."""
    return [r for r in finished(rows, *keys) if finite(knob_value(r))]


def frontier_candidates(rows: list[dict]) -> list[dict]:
    """Finished runs that can sit on log FVU–L0 axes (both finite and positive, a knob value)."""
    return [r for r in with_knob(rows, "l0", "fvu") if r["l0"] > 0 and r["fvu"] > 0]


L0_TOLERANCE = 0.01
"""L0s this close (relative) count as equal on the frontier: TopK runs of one k at several dict
ratios all have L0 about k, and the one of them 0.5% lower was a "best run" beside one of far
lower FVU."""


def pareto(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points (l0, fvu) on the frontier, by l0: taken from the lowest fvu up, each one no
    frontier point beats — one of lower l0 and lower or equal fvu, or of an l0 at most
    :data:`L0_TOLERANCE` higher and lower fvu (only frontier points beat: near L0s do not
    chain) — nor the empty dictionary that predicts the mean (l0 0, fvu 1): a run
    reconstructing no better than that is never a best run."""
    front: list[tuple[float, float]] = []
    for x, y in sorted({p for p in points if p[1] < 1}, key=lambda p: (p[1], p[0])):
        if not any(_beats(a, b, x, y) for a, b in front):
            front.append((x, y))
    return sorted(front)


def _beats(a: float, b: float, x: float, y: float) -> bool:
    """Whether the run at (l0 a, fvu b) beats the one at (x, y)."""
    return (a < x and b <= y) or (a <= x * (1 + L0_TOLERANCE) and b < y)


def frontier_ids(rows: list[dict]) -> set[str]:
    """Run ids of the finished runs on the FVU–L0 Pareto frontier (the frontier plot's line)."""
    pts = frontier_candidates(rows)
    front = set(pareto([(r["l0"], r["fvu"]) for r in pts]))
    return {r["run_id"] for r in pts if (r["l0"], r["fvu"]) in front}


def ablation_gap(row: dict) -> float | None:
    """``ce_loss_ablated - ce_loss_clean`` in nats, when the run has both."""
    clean, ablated = row.get("ce_loss_clean"), row.get("ce_loss_ablated")
    return ablated - clean if finite(clean) and finite(ablated) else None  # type: ignore[operator]


def weak_loss_recovered(row: dict) -> bool:
    """True when the run's ``loss_recovered`` rests on an ablation gap < MIN_ABLATION_GAP."""
    gap = ablation_gap(row)
    return gap is not None and gap < MIN_ABLATION_GAP and row.get("loss_recovered") is not None
