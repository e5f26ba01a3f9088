"""The console tables are printed to: as wide as the terminal, or wide lines in a file."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

from rich.console import Console
from rich.table import Table

FILE_WIDTH = 200
"""Lines printed to a file or a pipe (no terminal to fit) are up to this wide: rich's 80
would fold a run table's columns for no reader."""


def table_console() -> Console:
    """A console for tables: the terminal's width on a terminal, elsewhere ``COLUMNS`` when
    set (``COLUMNS=100 sweep status DIR | less``), else :data:`FILE_WIDTH`."""
    console = Console()
    if console.is_terminal:
        return console
    columns = os.environ.get("COLUMNS", "")
    return Console(width=int(columns) if columns.isdigit() and int(columns) > 0 else FILE_WIDTH)


@dataclass(frozen=True)
class Fitted:
    table: Table
    left_out: list[str]
    """Columns not shown: the terminal is too narrow for them."""

    def print(self, console: Console, see: str = "") -> None:
        """The table, then which columns it left out (and ``see``: where they are)."""
        console.print(self.table)
        if self.left_out:
            where = f": see {see}" if see else ""
            console.print(f"(too narrow for {', '.join(self.left_out)}{where})")


def fit_table(
    console: Console,
    title: str,
    columns: Sequence[str],
    rows: Sequence[Sequence[str]],
    drop: Sequence[str] = (),
    text: Sequence[str] = (),
) -> Fitted:
    """``rows`` as a table no wider than ``console``, no cell broken (a number, a run id):
    boxed if it fits; else compact (no rules, headers wrapping at ``_``); else also without
    the columns of ``drop``, first ones first, until it fits. Only the ``text`` columns (a
    note) wrap, at spaces."""
    shown, probe = list(columns), _probe(rows, len(columns))

    def fits(compact: bool) -> bool:
        table = _table(title, shown, probe, columns, compact, text)
        return _min_width(console, table) <= console.width

    compact = not fits(False)
    for name in (d for d in drop if d in shown):
        if not compact or fits(True):
            break
        shown.remove(name)
    table = _table(title, shown, rows, columns, compact, text)
    return Fitted(table, [c for c in columns if c not in shown])


def _probe(rows: Sequence[Sequence[str]], n: int) -> list[list[str]]:
    """Two rows that measure as the whole table does (rich measures thousands of rows
    slowly): each column's cell with the longest word, and its longest cell."""

    from rich.cells import cell_len

    def word(cell: str) -> int:
        return max(map(cell_len, cell.split()), default=0)

    cols = [[r[i] for r in rows] or [""] for i in range(n)]
    return [[max(c, key=word) for c in cols], [max(c, key=cell_len) for c in cols]]


LEFT = ("run_id", "state", "ensemble")
"""Columns of names: left-aligned (numbers align right)."""


def _table(title, shown, rows, columns, compact: bool, text) -> Table:
    """The table of the ``shown`` columns. Compact: each column fixed at its widest cell or
    its header's longest word (rich would otherwise narrow the widest first, mid-number)."""
    from rich import box
    from rich.cells import cell_len

    if compact:
        table = Table(title=title, box=box.SIMPLE_HEAD, collapse_padding=True, pad_edge=False)
    else:
        table = Table(title=title)
    at = [list(columns).index(c) for c in shown]
    for c, i in zip(shown, at, strict=True):
        justify = "left" if c in LEFT or c in text else "right"
        if not compact or c in text:  # (rich narrows the widest wrappable column first)
            # (rich measures an unwrapped cell by its longest word: "52.31 GiB" as 5, which
            # let a table pass as fitting that then broke the run ids of its text column)
            least = None if c in text else max((cell_len(r[i]) for r in rows), default=None)
            table.add_column(
                c, justify=justify, overflow="fold", no_wrap=c not in text, min_width=least
            )
            continue
        header = c.replace("_", " ")
        width = max([cell_len(r[i]) for r in rows] + [cell_len(w) for w in header.split()])
        table.add_column(header, justify=justify, width=width)
    for r in rows:
        table.add_row(*(r[i] for i in at))
    return table


def _min_width(console: Console, table: Table) -> int:
    """The narrowest ``table`` renders without breaking a word (rich's own measure)."""
    from rich.measure import Measurement

    return Measurement.get(console, console.options.update_width(10**5), table).minimum
