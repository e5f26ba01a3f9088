"""Summaries of a finished or running sweep: the table, cross-dictionary MMCS, plots, HTML.

:func:`build_report` writes ``SWEEP_DIR/report/``:

- ``summary.csv``   one row per run (spec, state, final metrics, MMCS values)
- ``mmcs.csv``      MMCS matrix over finished runs; cell (A, B) = mean over A's atoms of the
                    max cosine to B's atoms; blank between runs of different dict ratios
- ``frontier.png``, ``mmcs_heatmap.png``, ``dead_vs_l1.png``, ``density.png``
- ``index.html``    all of the above, openable from disk

It only reads runs that are DONE, so it works while a sweep is still running.
"""

from __future__ import annotations

import csv
import html
import io
import json
import logging
import time
from pathlib import Path

import torch

from sweep import crossdict, plots, rundir
from sweep.errors import SweepError
from sweep.worker import run_state

log = logging.getLogger(__name__)

COLUMNS = [
    "run_id",
    "l1",
    "dict_ratio",
    "seed",
    "state",
    "l0",
    "fvu",
    "mse",
    "dead_fraction",
    "dense_fraction",
    "gt_mmcs",
    "gt_recovered",
    "loss_recovered",
    "mmcs_next_ratio",
    "mmcs_seeds",
]
SUMMARY_FILE = "summary.csv"
REPORT_DIR = "report"
MMCS_FILE = "mmcs.csv"
PLOTS = ("frontier", "mmcs_heatmap", "dead_vs_l1", "density")


def run_ids(sweep_dir: Path) -> list[str]:
    """Runs listed in the sweep manifest (in grid order)."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise SweepError(
            f"{sweep_dir} does not exist or is not a folder; pass the sweep_dir of a sweep run"
        )
    manifest = sweep_dir / "manifest.json"
    if not manifest.is_file():
        raise SweepError(
            f"{sweep_dir} is not a sweep folder (no manifest.json); pass the sweep_dir of a sweep run"
        )
    try:
        runs = json.loads(manifest.read_text())["runs"]
    except (ValueError, KeyError, TypeError) as err:
        raise SweepError(
            f"{manifest} is damaged ({type(err).__name__}); re-run 'sweep run' with the same sweep_dir to rewrite it"
        ) from err
    return list(runs)


def summary_rows(sweep_dir: str | Path, ids: list[str]) -> list[dict]:
    """One dict per run: its spec, state and (when final) metrics."""
    rows = []
    for rid in ids:
        folder = rundir.run_dir(sweep_dir, rid)
        spec = rundir.read_json(folder / rundir.SPEC) if (folder / rundir.SPEC).exists() else {}
        row: dict = {
            "run_id": rid,
            "l1": spec.get("l1"),
            "dict_ratio": spec.get("dict_ratio"),
            "seed": spec.get("seed"),
        }
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


def _columns(rows: list[dict]) -> list[str]:
    return COLUMNS + sorted({k for r in rows for k in r} - set(COLUMNS))


def write_summary(sweep_dir: str | Path, rows: list[dict]) -> Path:
    """``summary.csv`` in ``sweep_dir`` (the report calls it with the report folder)."""
    cols = _columns(rows)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: r.get(k, "") for k in cols})
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


def write_mmcs(path: Path, cross: crossdict.CrossDict) -> Path:
    ids, mat = crossdict.matrix_rows(cross)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["run_id", *ids])
    for rid, row in zip(ids, mat, strict=True):
        w.writerow([rid, *("" if v is None else f"{v:.6f}" for v in row)])
    rundir.atomic_write_bytes(path, buf.getvalue().encode())
    return path


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except RuntimeError as err:
        raise SweepError(f"unknown device {name!r} for the report; use auto, cpu or cuda") from err


def build_report(
    sweep_dir: str | Path, device: str = "auto", log_media: bool = True
) -> tuple[Path, list[dict]]:
    """Write ``SWEEP_DIR/report/`` (see the module docstring); returns it and the summary rows.

    Also writes each finished run's cross-dictionary MMCS into its ``metrics.json``, refreshes
    ``SWEEP_DIR/summary.csv``, and, for sweeps run with ``logger=wandb``, sends the plots to a
    ``report`` wandb run (best-effort).
    """
    sweep_dir = Path(sweep_dir)
    ids = run_ids(sweep_dir)
    if not ids:
        raise SweepError(
            f"{sweep_dir}/manifest.json lists no runs; start the sweep with 'sweep run'"
        )
    out = rundir.ensure_writable(sweep_dir / REPORT_DIR, "report folder")
    rows = summary_rows(sweep_dir, ids)
    cross = crossdict.compute(sweep_dir, rows, _device(device), out / crossdict.CACHE)
    crossdict.annotate_runs(sweep_dir, cross)
    for r in rows:
        r.update(cross.per_run.get(r["run_id"], {}))
    write_summary(out, rows)
    write_summary(sweep_dir, rows)
    write_mmcs(out / MMCS_FILE, cross)
    images = {
        "frontier": plots.frontier(rows, out / "frontier.png"),
        "mmcs_heatmap": plots.mmcs_heatmap(cross, out / "mmcs_heatmap.png"),
        "dead_vs_l1": plots.dead_vs_l1(rows, out / "dead_vs_l1.png"),
        "density": plots.density(sweep_dir, rows, out / "density.png"),
    }
    write_html(out, sweep_dir, rows, images)
    if log_media:
        _log_media(sweep_dir, rows, images)
    return out, rows


def _log_media(sweep_dir: Path, rows: list[dict], images: dict[str, Path]) -> None:
    from sweep.logger import log_report

    cols = [c for c in COLUMNS if any(r.get(c) is not None for r in rows)]
    data = [[_fmt(r.get(c)) for c in cols] for r in rows]
    try:
        log_report(sweep_dir, {k: str(v) for k, v in images.items()}, cols, data)
    except Exception as err:  # tracking is best-effort
        log.warning("could not send the report to wandb (%s); the report on disk is complete", err)


CAPTIONS = {
    "frontier": "FVU against L0 (log-log). One colour per dict ratio; labels are L1; dashed: Pareto frontier.",
    "mmcs_heatmap": "MMCS between dictionaries of one dict ratio, ordered by L1 (row: from, column: to).",
    "dead_vs_l1": "Dead and dense feature fractions against L1.",
    "density": "Histograms of log10 feature firing frequency on the evaluation rows.",
}


def write_html(out: Path, sweep_dir: Path, rows: list[dict], images: dict[str, Path]) -> Path:
    """``index.html``: the plots and the table, with relative links (openable from disk)."""
    cols = [c for c in COLUMNS if any(r.get(c) is not None for r in rows)]
    states: dict[str, int] = {}
    for r in rows:
        states[r["state"]] = states.get(r["state"], 0) + 1
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "\n".join(
        f'<tr class="{html.escape(str(r.get("state")))}">'
        + "".join(f"<td>{html.escape(_fmt(r.get(c)))}</td>" for c in cols)
        + "</tr>"
        for r in rows
    )
    figs = "\n".join(
        f'<figure><img src="{html.escape(p.name)}" alt="{name}"><figcaption>{html.escape(CAPTIONS[name])}</figcaption></figure>'
        for name, p in images.items()
    )
    counts = ", ".join(f"{k}: {v}" for k, v in sorted(states.items()))
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>sweep report: {html.escape(sweep_dir.name)}</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; }} figure {{ display: inline-block; margin: 0.5em; max-width: 100%; }}
img {{ max-width: 100%; border: 1px solid #ddd; }} figcaption {{ font-size: 0.85em; color: #444; }}
table {{ border-collapse: collapse; font-size: 0.85em; }} th, td {{ border: 1px solid #ccc; padding: 2px 6px; text-align: right; }}
th {{ background: #f3f3f3; }} tr.diverged, tr.failed {{ background: #fde8e8; }} tr.partial, tr.pending {{ color: #888; }}
</style></head><body>
<h1>sweep report: {html.escape(str(sweep_dir))}</h1>
<p>{len(rows)} runs ({html.escape(counts)}); generated {time.strftime("%Y-%m-%d %H:%M:%S")}.
Data: <a href="{SUMMARY_FILE}">{SUMMARY_FILE}</a>, <a href="{MMCS_FILE}">{MMCS_FILE}</a>.</p>
{figs}
<h2>Runs</h2>
<table><thead><tr>{head}</tr></thead><tbody>
{body}
</tbody></table>
</body></html>
"""
    path = out / "index.html"
    rundir.atomic_write_bytes(path, page.encode())
    return path
