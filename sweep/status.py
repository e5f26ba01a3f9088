"""``sweep status``: each run's state, progress and latest training metrics."""

from __future__ import annotations

import json
from pathlib import Path

from sweep import rundir
from sweep.report import run_ids
from sweep.worker import run_state


def _last_curve(folder: Path) -> dict:
    path = folder / rundir.CURVE
    if not path.is_file():
        return {}
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    return json.loads(lines[-1]) if lines else {}


def status_rows(sweep_dir: Path) -> list[dict]:
    rows = []
    for rid in run_ids(sweep_dir):
        folder = rundir.run_dir(sweep_dir, rid)
        row = {"run_id": rid, "state": run_state(folder)}
        last = _last_curve(folder)
        if rundir.is_done(folder) and (folder / rundir.METRICS).exists():
            final = rundir.read_json(folder / rundir.METRICS)
            row.update(rows_trained=final.get("rows_trained"), l0=final.get("l0"), fvu=final.get("fvu"))
        else:
            row.update(rows_trained=last.get("rows"), l0=last.get("l0"), fvu=last.get("fvu"))
        if (folder / rundir.FAILED).exists():
            row["note"] = rundir.read_json(folder / rundir.FAILED).get("reason", "")
        rows.append(row)
    return rows


def print_status(sweep_dir: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    rows = status_rows(sweep_dir)
    table = Table(title=f"sweep status: {sweep_dir}")
    cols = ["run_id", "state", "rows_trained", "l0", "fvu", "note"]
    for c in cols:
        table.add_column(c)
    for r in rows:
        table.add_row(*("" if r.get(c) is None else (f"{r[c]:.4g}" if isinstance(r[c], float) else str(r[c])) for c in cols))
    console = Console(width=200)
    console.print(table)
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["state"]] = counts.get(r["state"], 0) + 1
    console.print("  ".join(f"{k}: {v}" for k, v in sorted(counts.items())) + f"  total: {len(rows)}")
