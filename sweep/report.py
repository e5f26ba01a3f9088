"""Summaries of a finished or running sweep: the table, cross-dictionary MMCS, plots, HTML.

:func:`build_report` writes ``SWEEP_DIR/report/``:

- ``summary.csv``   one row per run (spec, state, final metrics, MMCS values)
- ``mmcs.csv``      MMCS matrix over finished runs; cell (A, B) = mean over A's atoms of the
                    max cosine to B's atoms; blank between runs of different dict ratios
- ``frontier.png``, ``curves.png``, ``mmcs_vs_l1.png``, ``mmcs_heatmap.png``,
  ``dead_vs_l1.png``, ``density.png``; ``lm_vs_l0.png`` when runs have language-model
  metrics (harvested stores)
- ``index.html``    settings, best runs, the sortable run table, definitions, then the plots;
                    openable from disk (:mod:`sweep.report_html`)

It only reads runs that are DONE, so it works while a sweep is still running.
"""

from __future__ import annotations

import csv
import io
import logging
from pathlib import Path

import yaml

from sweep import crossdict, plots
from sweep.devices import resolve_device
from sweep.errors import SweepError
from sweep.io import atomic_write_bytes, ensure_writable
from sweep.report_html import Page, write_html
from sweep.sweepdir import (
    REPORT,
    SUMMARY,
    SUMMARY_COLUMNS,
    RunRecord,
    SweepFolder,
    write_summary,
)

log = logging.getLogger(__name__)

COLUMNS = SUMMARY_COLUMNS
MMCS_FILE = "mmcs.csv"
PLOTS = (
    "frontier",
    "curves",
    "lm_vs_l0",
    "mmcs_vs_l1",
    "mmcs_heatmap",
    "dead_vs_l1",
    "density",
)
"""Every plot, in page order (``lm_vs_l0`` only for runs with language-model metrics)."""
SETTINGS = ("data", "grid", "train")


def summary_rows(records: list[RunRecord]) -> list[dict]:
    """One dict per run: its grid point, state and (when final) metrics."""
    return [r.row() for r in records]


def _fmt(v: object) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


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
    atomic_write_bytes(path, buf.getvalue().encode())
    return path


def sweep_settings(folder: SweepFolder, records: list[RunRecord]) -> tuple[str, dict[str, dict]]:
    """The sweep's data, grid and train settings, and where they came from: ``config.yaml``
    (the resolved config) or, for a sweep folder without one, the runs' specs."""
    path = folder.saved_config()
    cfg: dict = {}
    if path is not None:
        try:
            cfg = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as err:
            log.warning("%s is unreadable (%s); showing settings from the run specs", path, err)
    spec = next((r.spec for r in records if r.spec), {})
    if isinstance(cfg, dict) and all(isinstance(cfg.get(k), dict) for k in SETTINGS):
        sections = {k: dict(cfg[k]) for k in SETTINGS}
        if isinstance(cfg.get("sae"), dict) and "name" in cfg["sae"]:
            sections["grid"]["sae"] = cfg["sae"]["name"]
        source = path.name  # type: ignore[union-attr]
    else:
        sections = {"data": dict(spec.get("data", {})), "grid": _grid_of(records, spec)}
        if spec.get("width"):
            sections["data"].setdefault("width", spec["width"])
        sections["train"] = dict(spec.get("train", {}))
        source = "the run specs (no readable config.yaml)"
    if spec.get("store"):
        sections["data"]["store"] = spec["store"]
    return source, sections


def _grid_of(records: list[RunRecord], spec: dict) -> dict:
    def values(key: str) -> list:
        return sorted({r.spec[key] for r in records if r.spec.get(key) is not None})

    grid = {"l1": values("l1"), "dict_ratio": values("dict_ratio"), "seeds": len(values("seed"))}
    if spec.get("sae"):
        grid["sae"] = spec["sae"]
    return grid


def _grid_order(row: dict) -> tuple:
    """Dict ratio, L1, seed (runs without a spec last), then run id."""
    point = [row.get(k) for k in ("dict_ratio", "l1", "seed")]
    known = all(isinstance(v, (int, float)) for v in point)
    return (0, *point, row["run_id"]) if known else (1, 0, 0, 0, row["run_id"])


def draw_plots(
    sweep_dir: Path,
    out: Path,
    records: list[RunRecord],
    rows: list[dict],
    cross: crossdict.CrossDict,
) -> dict[str, Path]:
    """Every plot of the report, in page order (see :data:`PLOTS`)."""
    curves = [(row, rec.folder.curve()) for row, rec in zip(rows, records, strict=True)]
    images = {
        "frontier": plots.frontier(rows, out / "frontier.png"),
        "curves": plots.training_curves(curves, out / "curves.png"),
    }
    if plots.has_lm_metrics(rows):
        images["lm_vs_l0"] = plots.lm_vs_l0(rows, out / "lm_vs_l0.png")
    images.update(
        mmcs_vs_l1=plots.mmcs_next_vs_l1(rows, out / "mmcs_vs_l1.png"),
        mmcs_heatmap=plots.mmcs_heatmap(cross, out / "mmcs_heatmap.png"),
        dead_vs_l1=plots.dead_vs_l1(rows, out / "dead_vs_l1.png"),
        density=plots.density(sweep_dir, rows, out / "density.png"),
    )
    return images


def build_report(
    sweep_dir: str | Path, device: str = "auto", log_media: bool = True
) -> tuple[Path, list[dict]]:
    """Write ``SWEEP_DIR/report/`` (see the module docstring); returns it and the summary rows.

    Also writes each finished run's cross-dictionary MMCS into its ``metrics.json``, refreshes
    ``SWEEP_DIR/summary.csv``, and, for sweeps run with ``logger=wandb``, sends the plots to a
    ``report`` wandb run (best-effort).
    """
    sweep_dir = Path(sweep_dir)
    folder = SweepFolder(sweep_dir)
    if not folder.run_ids():
        raise SweepError(
            f"{sweep_dir}/manifest.json lists no runs; start the sweep with 'sweep run'"
        )
    dev = resolve_device(device, "--device")
    out = ensure_writable(sweep_dir / REPORT, "report folder")
    records = folder.read_runs()
    rows = summary_rows(records)
    cross = crossdict.compute(records, dev, out / crossdict.CACHE)
    crossdict.annotate_runs(records, cross)
    for r in rows:
        r.update(cross.per_run.get(r["run_id"], {}))
    write_summary(out, rows)
    write_summary(sweep_dir, rows)
    write_mmcs(out / MMCS_FILE, cross)
    images = draw_plots(sweep_dir, out, records, rows, cross)
    source, settings = sweep_settings(folder, records)
    page = Page(
        sweep_dir=sweep_dir,
        rows=sorted(rows, key=_grid_order),
        columns=[c for c in COLUMNS if any(r.get(c) is not None for r in rows)],
        images=images,
        settings=settings,
        settings_source=source,
        best=plots.frontier_ids(rows),
        run_dirs={rec.run_id: rec.folder.path for rec in records},
        files={"summary": SUMMARY, "mmcs": MMCS_FILE},
    )
    write_html(out, page)
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
