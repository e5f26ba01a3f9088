"""FVU-vs-L0 frontiers: the best reconstruction each method reaches at each sparsity.

A method's frontier is the lower envelope of its (L0, FVU) points over every learning rate
and L1 coefficient: the points no other point beats on both (lower or equal L0 *and* lower
FVU). Between frontier points FVU is interpolated linearly in log L0; outside the frontier's
L0 range there is no value (``None``, printed as n/a).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

TARGET_L0 = (20, 40, 80, 160)


@dataclass(frozen=True)
class Point:
    """One trained dictionary, evaluated on the held-out rows."""

    method: str
    lr: float
    l1: float
    l0: float
    fvu: float
    dead_fraction: float

    def as_dict(self) -> dict:
        return asdict(self)


def frontier(points: Iterable[Point]) -> list[Point]:
    """The Pareto-optimal points by increasing L0 (FVU strictly falls along the list).

    Points with a non-finite FVU or L0 <= 0 are ignored.
    """
    ok = [p for p in points if p.l0 > 0 and math.isfinite(p.fvu) and math.isfinite(p.l0)]
    best: list[Point] = []
    for p in sorted(ok, key=lambda p: (p.l0, p.fvu)):
        if not best or p.fvu < best[-1].fvu:
            best.append(p)
    return best


def fvu_at(front: Sequence[Point], l0: float) -> float | None:
    """FVU of ``front`` at ``l0``, linear in log L0 between its points; None outside its range."""
    if not front or not front[0].l0 <= l0 <= front[-1].l0:
        return None
    for a, b in zip(front, front[1:], strict=False):
        if a.l0 <= l0 <= b.l0:
            if b.l0 == a.l0:
                return min(a.fvu, b.fvu)
            t = (math.log(l0) - math.log(a.l0)) / (math.log(b.l0) - math.log(a.l0))
            return a.fvu + t * (b.fvu - a.fvu)
    return front[0].fvu  # a one-point frontier, l0 equal to it


def comparison(
    fronts: dict[str, Sequence[Point]], base: str, other: str, targets: Sequence[float] = TARGET_L0
) -> list[dict]:
    """Per target L0: each method's interpolated FVU and ``base / other`` (None where n/a)."""
    rows = []
    for l0 in targets:
        a, b = fvu_at(fronts[base], l0), fvu_at(fronts[other], l0)
        ratio = a / b if a is not None and b is not None and b > 0 else None
        rows.append({"l0": l0, base: a, other: b, "ratio": ratio})
    return rows


def _fmt(v: float | None, digits: int = 4) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def markdown_table(rows: list[dict], base: str, other: str) -> str:
    """``L0 | base FVU | other FVU | base ÷ other`` as a markdown table."""
    lines = [
        f"| L0 | {base} FVU | {other} FVU | {base} ÷ {other} |",
        "|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['l0']:g} | {_fmt(r[base])} | {_fmt(r[other])} | {_fmt(r['ratio'], 3)} |"
        )
    return "\n".join(lines)


def points_table(points: Iterable[Point], front: Iterable[Point] = ()) -> str:
    """Every point as a markdown table, sorted by method, lr, l1; ``*`` marks frontier points."""
    on = {(p.method, p.lr, p.l1) for p in front}
    lines = [
        "| method | lr | l1 | L0 | FVU | dead | frontier |",
        "|---|---:|---:|---:|---:|---:|:-:|",
    ]
    for p in sorted(points, key=lambda p: (p.method, p.lr, p.l1)):
        star = "*" if (p.method, p.lr, p.l1) in on else ""
        lines.append(
            f"| {p.method} | {p.lr:g} | {p.l1:.3g} | {p.l0:.1f} | {p.fvu:.4f} | "
            f"{p.dead_fraction:.3f} | {star} |"
        )
    return "\n".join(lines)
