"""Reading append-only JSON-lines files that grow all through a run (``metrics.jsonl``: ~160
bytes a logged step, millions of lines after a day) without holding them in memory: the last
record from the file's end, an evenly thinned copy for plots, and cutting records past a
step by streaming. A torn or damaged line (power loss, a full disk) is skipped everywhere.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

from sweep.io import atomic_write

log = logging.getLogger(__name__)

BLOCK = 1 << 16


def record(line: bytes | str) -> dict | None:
    """The line's record; None for an empty, damaged or non-object line."""
    if not line.strip():
        return None
    try:
        got = json.loads(line)
    except ValueError:
        return None
    return got if isinstance(got, dict) else None


def records(path: Path) -> list[dict]:
    """Every record of ``path`` ([] without the file)."""
    return list(_lines(path))


def _lines(path: Path, keep: set[int] | None = None) -> Iterator[dict]:
    """The records of ``path`` in order (only the lines numbered in ``keep``, if given)."""
    if not path.is_file():
        return
    with open(path, "rb") as f:
        for i, line in enumerate(f):
            if keep is not None and i not in keep:
                continue
            rec = record(line)
            if rec is None:
                if line.strip():
                    log.warning("%s: skipping a damaged line", path)
                continue
            yield rec


def last(path: Path) -> dict:
    """The last record of ``path``, read from its end ({} without one)."""
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        return {}
    with f:
        end = f.seek(0, os.SEEK_END)
        tail = b""
        while end > 0:
            start = max(0, end - BLOCK)
            f.seek(start)
            tail = f.read(end - start) + tail
            lines = tail.split(b"\n")
            for line in reversed(lines[1:] if start > 0 else lines):  # (lines[0] may be cut)
                rec = record(line)
                if rec is not None:
                    return rec
            tail, end = lines[0] if start > 0 else b"", start
    return {}


def thinned(path: Path, most: int) -> list[dict]:
    """At most about ``most`` records of ``path``, evenly spaced, the first and last included
    (what a plot of the whole run needs)."""
    if not path.is_file():
        return []
    with open(path, "rb") as f:
        n = sum(block.count(b"\n") for block in iter(lambda: f.read(1 << 20), b""))
    n += 1  # (a last line without its newline)
    if n <= most:
        return records(path)
    stride = -(-n // most)
    return list(_lines(path, keep={*range(0, n, stride), n - 2, n - 1}))


def keep_through(path: Path, step: int) -> None:
    """Drop the records whose ``step`` is past ``step`` (and damaged lines); a file whose last
    record is not past it and whose last line is whole is left as it is (the usual resume:
    no rewrite; a torn last line is dropped, or the next record appended would join it)."""
    if not path.is_file() or (last(path).get("step", step + 1) <= step and _whole(path)):
        return

    def kept() -> Iterator[bytes]:
        for rec in _lines(path):
            if rec.get("step", step + 1) <= step:
                yield (json.dumps(rec) + "\n").encode()

    atomic_write(path, lambda f: f.writelines(kept()))


def _whole(path: Path) -> bool:
    """Whether ``path`` is empty or ends with a newline."""
    with open(path, "rb") as f:
        if f.seek(0, os.SEEK_END) == 0:
            return True
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"
