"""Summaries of a finished or running sweep: one row per run, to stdout and ``summary.csv``."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from sweep import rundir
from sweep.errors import SweepError
from sweep.worker import run_state

COLUMNS = [
    "run_id", "l1", "dict_ratio", "seed", "state", "l0", "fvu", "mse", "dead_fraction",
    "dense_fraction", "gt_mmcs", "gt_recovered",
]
SUMMARY_FILE = "summary.csv"


def run_ids(sweep_dir: Path) -> list[str]:
    """Runs listed in the sweep manifest (in grid order)."""
    manifest = sweep_dir / "manifest.json"
    if not manifest.is_file():
        raise SweepError(f"{sweep_dir} is not a sweep folder (no manifest.json); pass the sweep_dir of a sweep run")
    return list(json.loads(manifest.read_text())["runs"])


def summary_rows(sweep_dir: str | Path, ids: list[str]) -> list[dict]:
    """One dict per run: its spec, state and (when final) metrics."""
    rows = []
    for rid in ids:
        folder = rundir.run_dir(sweep_dir, rid)
        spec = rundir.read_json(folder / rundir.SPEC) if (folder / rundir.SPEC).exists() else {}
        row: dict = {"run_id": rid, "l1": spec.get("l1"), "dict_ratio": spec.get("dict_ratio"), "seed": spec.get("seed")}
        row["state"] = run_state(folder)
        if (folder / rundir.METRICS).exists() and rundir.is_done(folder):
            row.update(rundir.read_json(folder / rundir.METRICS))
            row["state"] = run_state(folder)
        rows.append(row)
    return rows


def _fmt(v: object) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def write_summary(sweep_dir: str | Path, rows: list[dict]) -> Path:
    extra = sorted({k for r in rows for k in r} - set(COLUMNS))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS + extra, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: r.get(k, "") for k in COLUMNS + extra})
    path = Path(sweep_dir) / SUMMARY_FILE
    rundir.atomic_write_bytes(path, buf.getvalue().encode())
    return path


def print_table(rows: list[dict], title: str = "sweep summary") -> None:
    """A readable table on stdout (rich)."""
    from rich.console import Console
    from rich.table import Table

    cols = [c for c in COLUMNS if any(r.get(c) is not None for r in rows)]
    table = Table(title=title)
    for c in cols:
        table.add_column(c, justify="left" if c in ("run_id", "state") else "right")
    for r in rows:
        table.add_row(*(_fmt(r.get(c)) for c in cols))
    Console(width=200).print(table)
