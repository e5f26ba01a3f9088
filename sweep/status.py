"""``sweep status``: each run's state, progress and latest training metrics.

States: ``pending`` (nothing trained), ``running`` (has a checkpoint and a live driver holds the
sweep's lock), ``interrupted`` (has a checkpoint; the sweep was stopped by a signal),
``partial`` (has a checkpoint, no driver), ``done``, ``diverged``, ``failed``.
Works while a sweep runs (read-only: it never takes the lock) and after it ended.
"""

from __future__ import annotations

import json
from pathlib import Path

from sweep import rundir
from sweep.lock import LOCK, holder_alive, read_lock
from sweep.report import run_ids
from sweep.worker import run_state


def _last_curve(folder: Path) -> dict:
    path = folder / rundir.CURVE
    if not path.is_file():
        return {}
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    return json.loads(lines[-1]) if lines else {}


def sweep_activity(sweep_dir: Path) -> str:
    """``running`` when a live driver holds the lock, else the state the manifest recorded."""
    held = read_lock(sweep_dir)
    if held is not None and holder_alive(held, sweep_dir / LOCK):
        return "running"
    manifest = sweep_dir / "manifest.json"
    return rundir.read_json(manifest).get("state", "unknown") if manifest.exists() else "unknown"


def status_rows(sweep_dir: Path) -> list[dict]:
    activity = sweep_activity(sweep_dir)
    rows = []
    for rid in run_ids(sweep_dir):
        folder = rundir.run_dir(sweep_dir, rid)
        state = run_state(folder)
        if state == "partial" and activity in ("running", "interrupted"):
            state = activity
        spec = rundir.read_json(folder / rundir.SPEC) if (folder / rundir.SPEC).exists() else {}
        batch = spec.get("train", {}).get("batch_size", 0)
        row = {
            "run_id": rid,
            "state": state,
            "rows_total": spec.get("total_steps", 0) * batch or None,
        }
        last = _last_curve(folder)
        if rundir.is_done(folder) and (folder / rundir.METRICS).exists():
            final = rundir.read_json(folder / rundir.METRICS)
            row.update(
                rows_trained=final.get("rows_trained"), l0=final.get("l0"), fvu=final.get("fvu")
            )
            row["rows_total"] = row["rows_total"] or row["rows_trained"]
        else:
            row.update(
                rows_trained=last.get("rows", 0 if spec else None),
                l0=last.get("l0"),
                fvu=last.get("fvu"),
            )
        if (folder / rundir.FAILED).exists():
            row["note"] = rundir.read_json(folder / rundir.FAILED).get("reason", "")
        rows.append(row)
    return rows


def _cell(v: object) -> str:
    if v is None:
        return ""
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def print_status(sweep_dir: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    rows = status_rows(sweep_dir)
    table = Table(title=f"sweep status: {sweep_dir} ({sweep_activity(sweep_dir)})")
    cols = ["run_id", "state", "progress", "rows_trained", "l0", "fvu", "note"]
    for c in cols:
        table.add_column(c)
    for r in rows:
        done, total = r.get("rows_trained"), r.get("rows_total")
        r["progress"] = f"{100 * done / total:.0f}%" if done is not None and total else ""
        table.add_row(*(_cell(r.get(c)) for c in cols))
    console = Console(width=200)
    console.print(table)
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["state"]] = counts.get(r["state"], 0) + 1
    trained = sum(r.get("rows_trained") or 0 for r in rows)
    total = sum(r.get("rows_total") or 0 for r in rows)
    summary = "  ".join(f"{k}: {v}" for k, v in sorted(counts.items()))
    console.print(f"{summary}  total: {len(rows)}  rows: {trained:,}/{total:,}")
