"""The console tables are printed to: as wide as the terminal, or wide lines in a file."""

from __future__ import annotations

from rich.console import Console

FILE_WIDTH = 200
"""Lines printed to a file or a pipe (no terminal to fit) are up to this wide: rich's 80
would fold a run table's columns for no reader."""


def table_console() -> Console:
    """A console for tables: the terminal's width on a terminal (rich shrinks the wrappable
    columns to fit), :data:`FILE_WIDTH` elsewhere."""
    console = Console()
    return console if console.is_terminal else Console(width=FILE_WIDTH)
