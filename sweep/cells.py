"""How the run tables (the terminal's, ``sweep status``'s, the report page's) write numbers:
a column's floats with one number of decimals, so that they line up and ``58.00`` stands
beside ``57.75`` (not ``58``). ``summary.csv`` keeps every digit."""

from __future__ import annotations

import math

DIGITS = 4
"""Significant digits of the float that needs most decimals in its column."""

MAX_DECIMALS = 4
"""A column whose floats would need more decimals (or scientific notation) writes each
with :data:`DIGITS` significant digits instead: ``0.000123`` beside ``0.5`` is not lined up
at six decimals."""


def column_texts(rows: list[dict], cols: list[str]) -> list[dict[str, str]]:
    """Each row's cells as text, by column (``""`` for a missing value)."""
    by_col = {c: _texts([r.get(c) for r in rows]) for c in cols}
    return [{c: by_col[c][i] for c in cols} for i in range(len(rows))]


def _texts(values: list[object]) -> list[str]:
    decimals = _decimals([v for v in values if isinstance(v, float) and math.isfinite(v)])
    return [_text(v, decimals) for v in values]


def _decimals(floats: list[float]) -> int | None:
    """The decimals the column's floats share, or None where they cannot share them."""
    texts = [f"{v:.{DIGITS}g}" for v in floats]
    if any("e" in t for t in texts):
        return None
    need = max((len(t.partition(".")[2]) for t in texts), default=0)
    return need if need <= MAX_DECIMALS else None


def _text(v: object, decimals: int | None) -> str:
    if v is None:
        return ""
    if not isinstance(v, float):
        return str(v)
    if decimals is None or not math.isfinite(v):
        return f"{v:.{DIGITS}g}"
    return f"{v:.{decimals}f}"
