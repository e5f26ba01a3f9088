"""How the run tables (the terminal's, ``sweep status``'s, the report page's) write numbers:
a column's floats with one number of decimals, so that they line up and ``58.00`` stands
beside ``57.75`` (not ``58``). ``summary.csv`` keeps every digit."""

from __future__ import annotations

import math

DIGITS = 4
"""Significant digits of the float that needs most decimals in its column (up to
:data:`MAX_DECIMALS`)."""

MAX_DECIMALS = 4
"""At most this many decimals: ``0.000123`` beside ``0.5`` reads ``0.0001``. A value that
would read 0 (or needs no decimals to be written at all, NaN) keeps :data:`DIGITS`
significant digits of its own (``3e-05``): a small value never reads as zero."""


def column_texts(rows: list[dict], cols: list[str]) -> list[dict[str, str]]:
    """Each row's cells as text, by column (``""`` for a missing value)."""
    by_col = {c: _texts([r.get(c) for r in rows]) for c in cols}
    return [{c: by_col[c][i] for c in cols} for i in range(len(rows))]


def _texts(values: list[object]) -> list[str]:
    floats = [v for v in values if isinstance(v, float) and math.isfinite(v)]
    decimals = min(MAX_DECIMALS, max(map(_decimals, floats), default=0))
    return [_text(v, decimals) for v in values]


def _decimals(v: float) -> int:
    """The decimals ``v`` needs for :data:`DIGITS` significant digits (trailing zeros
    dropped: 0.5 needs 1)."""
    text = f"{v:.{DIGITS}g}"
    if "e" in text:  # far from 1: none for a large value, too many for a small one
        return 0 if abs(v) >= 1 else MAX_DECIMALS
    return len(text.partition(".")[2])


def _text(v: object, decimals: int) -> str:
    if v is None:
        return ""
    if not isinstance(v, float):
        return str(v)
    if not math.isfinite(v) or (v != 0 and abs(v) < 0.5 * 10.0**-decimals):
        return f"{v:.{DIGITS}g}"
    return f"{v:.{decimals}f}"
