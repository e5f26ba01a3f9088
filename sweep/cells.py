"""How the run tables (the terminal's, ``sweep status``'s, the report page's) write numbers:
a column's floats with one number of decimals, so that they line up and ``58.00`` stands
beside ``57.75`` (not ``58``). ``summary.csv`` keeps every digit."""

from __future__ import annotations

import math

DIGITS = 4
"""Significant digits of the float that needs most decimals in its column (up to
:data:`MAX_DECIMALS`)."""

MAX_DECIMALS = 4
"""At most this many decimals (0.09766 reads ``0.0977`` beside ``0.4961``)."""

KEPT_DIGITS = 3
"""A value that the shared decimals would leave fewer of its significant digits than this (a
small one: ``0.000123``, ``0.00015`` beside ``0.0001``, one that would read 0) is written
with :data:`DIGITS` of its own."""

HUGE = 1e9
"""A value this large or larger is written with :data:`DIGITS` significant digits and an
exponent (``1e+38``, a grid's l1 meant to break a run: not 39 digits)."""

MAX_WHOLE_DECIMALS = 9
"""A value just short of a whole number takes up to this many decimals, so that it does not
read as that number (``0.99997``, not ``1.0000``)."""


def column_texts(rows: list[dict], cols: list[str]) -> list[dict[str, str]]:
    """Each row's cells as text, by column (``""`` for a missing value)."""
    by_col = {c: _texts([r.get(c) for r in rows]) for c in cols}
    return [{c: by_col[c][i] for c in cols} for i in range(len(rows))]


def _texts(values: list[object]) -> list[str]:
    if any(isinstance(v, float) for v in values):  # (an int among floats is one of them)
        values = [float(v) if _is_int(v) else v for v in values]
    floats = [v for v in values if isinstance(v, float) and math.isfinite(v)]
    decimals = min(MAX_DECIMALS, max(map(_decimals, floats), default=0))
    return [_text(v, decimals) for v in values]


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _decimals(v: float) -> int:
    """The decimals ``v`` needs for :data:`DIGITS` significant digits (trailing zeros
    dropped: 0.5 needs 1)."""
    mantissa, _, exponent = f"{v:.{DIGITS}g}".partition("e")  # (1.5e-05: 6)
    return max(0, len(mantissa.partition(".")[2]) - int(exponent or 0))


def _text(v: object, decimals: int) -> str:
    if v is None:
        return ""
    if not isinstance(v, float):
        return str(v)
    if not math.isfinite(v) or abs(v) >= HUGE or _cut_short(v, decimals):
        return f"{v:.{DIGITS}g}"
    while decimals < MAX_WHOLE_DECIMALS and _reads_whole(v, decimals):
        decimals += 1
    return f"{v + 0.0:.{decimals}f}"  # (+ 0.0: -0.0 reads 0)


def _reads_whole(v: float, decimals: int) -> bool:
    """Whether ``v``, not a whole number, would read as one (0.99997 as ``1.0000``: all of
    the latents dead, when one of 32768 lives)."""
    return v != round(v) and round(v, decimals) == round(v)


def _cut_short(v: float, decimals: int) -> bool:
    """Whether ``decimals`` would leave ``v`` fewer than :data:`KEPT_DIGITS` significant
    digits of those it has (0.5 at 2 decimals keeps all it has)."""
    return _decimals(v) > decimals and abs(v) < 10.0 ** (KEPT_DIGITS - 1 - decimals)
