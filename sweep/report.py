"""Summaries of a finished or running sweep: the table, cross-dictionary MMCS, plots, HTML.

:func:`build_report` writes ``SWEEP_DIR/report/``:

- ``summary.csv``   one row per run (spec, state, final metrics, MMCS values)
- ``mmcs.csv``      MMCS matrix over finished runs (at most ``matrix_runs``, default
                    ``MATRIX_RUNS``, of each dict ratio; none at 0); cell (A, B) = mean over
                    A's atoms of the max cosine to B's atoms; blank between runs of different
                    dict ratios
- ``frontier.png``, ``curves.png``, ``mmcs_vs_l1.png``, ``mmcs_heatmap.png``,
  ``dead_vs_l1.png``, ``density.png``; ``lr.png`` when the grid has an lr axis
  (``grid.lr``); ``lm_vs_l0.png`` when runs have language-model metrics (harvested stores);
  ``levels.png`` when they have nested levels (Matryoshka)
- ``index.html``    settings, best runs, the sortable run table, definitions, then the plots;
                    openable from disk (:mod:`sweep.report_html`)

It only reads runs that are DONE, so it works while a sweep is still running. The sweep's
sparsity setting is ``l1`` or, for TopK-style sweeps (``sae=topk``, ``batchtopk``, ``matryoshka``), ``k``
(:func:`sweep.crossdict.knob`): plots, grid summary and MMCS pairing follow it.

Several sweeps (``sweep report A B ...``, ``compare=[B, ...]``): the report of A, whose
``frontier.png`` shows the FVU–L0 points of every sweep on one axes, one colour family per
sweep labelled ``<folder name> (<architecture>)``. The other sweeps are only read.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import statistics
from collections.abc import Sequence
from pathlib import Path

import yaml

from sweep import crossdict, planning, plots, runfacts
from sweep.devices import resolve_device
from sweep.errors import SweepError
from sweep.io import STALE_TEMP_SECONDS, atomic_write_bytes, ensure_writable, remove_stale_temps
from sweep.report_html import Compared, Page, comparison_warnings, write_html
from sweep.rundir import RUNS
from sweep.sweepdir import (
    MMCS_KEYS,
    REPORT,
    STORE,
    SUMMARY,
    RunRecord,
    SweepFolder,
    within_sweep,
    write_summary,
)
from sweep.table import COLUMNS

log = logging.getLogger(__name__)

MMCS_FILE = "mmcs.csv"
PLOTS = (
    "frontier",
    "curves",
    "lr",
    "lm_vs_l0",
    "levels",
    "mmcs_vs_l1",
    "mmcs_heatmap",
    "dead_vs_l1",
    "density",
)
"""Every plot, in page order (``lr`` only for a grid with an lr axis, ``lm_vs_l0`` only for
runs with language-model metrics, ``levels`` only for runs with nested levels: Matryoshka's)."""
SETTINGS = ("data", "grid", "train")


def summary_rows(records: list[RunRecord]) -> list[dict]:
    """One dict per run: its grid point, state and (when final) metrics."""
    return [r.row() for r in records]


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
    (the resolved config) or, for a sweep folder without one, the runs' specs. The grid's
    values are the runs' in both: a sweep resumed with other values has trained them all."""
    path = folder.saved_config()
    cfg: dict = {}
    if path is not None:
        try:
            cfg = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as err:
            log.warning("%s is unreadable (%s); showing settings from the run specs", path, err)
    spec = next((r.spec for r in records if r.spec), {})
    if isinstance(cfg, dict) and all(isinstance(cfg.get(k), dict) for k in SETTINGS):
        cfg = planning.with_legacy(cfg)  # (a setting added since: as the sweep trained)
        sections = {k: dict(cfg[k]) for k in SETTINGS}
        if records:  # (config.yaml holds the last command's grid; the report, every run's)
            sections["grid"].update((k, v) for k, v in _grid_of(records, {}).items() if v)
        if isinstance(cfg.get("sae"), dict) and "name" in cfg["sae"]:
            sae = cfg["sae"]
            sections["grid"]["sae"] = sae["name"]
            for field in ("recipe", "levels"):  # (set, or named: what its runs trained with)
                if sae.get(field) is not None:
                    sections["grid"][f"sae.{field}"] = sae[field]
        source = path.name  # type: ignore[union-attr]
    else:
        sections = {"data": dict(spec.get("data", {})), "grid": _grid_of(records, spec)}
        if spec.get("width"):
            sections["data"].setdefault("width", spec["width"])
        sections["train"] = planning.with_legacy({"train": dict(spec.get("train", {}))})["train"]
        source = "the run specs (no readable config.yaml)"
    if sections["grid"].get("lr"):  # (each run's rate is the grid's: train.lr did nothing)
        sections["train"].pop("lr", None)
    if spec.get("store"):  # (where the runs trained: a moved store is elsewhere now)
        sections["data"]["trained on"] = spec["store"]
    return source, sections


SHARED_STARTS = (
    "mmcs_next_ratio is biased upward (strongly after short training): this sweep seeded each "
    "run's initialisation by its seed index alone (train.init_seeding=shared, as sweeps before "
    "that setting did), so a smaller dictionary started as the leading atoms of the next larger "
    "one; train.init_seeding=per_ratio (the default) avoids it"
)


def warnings_of(settings: dict[str, dict], rows: list[dict]) -> list[str]:
    """What the report's reader must know before trusting a figure of it."""
    shared = settings.get("train", {}).get("init_seeding") == "shared"
    if shared and any(r.get("mmcs_next_ratio") is not None for r in rows):
        return [SHARED_STARTS]
    return []


def _grid_of(records: list[RunRecord], spec: dict) -> dict:
    def values(key: str) -> list:
        return sorted({r.grid_point[key] for r in records if r.grid_point.get(key) is not None})

    knob = crossdict.sweep_knob(r.grid_point for r in records)
    points = {crossdict.knob_value(r.grid_point) for r in records} - {None}
    grid = {
        crossdict.KNOB_FIELDS[knob]: sorted(points),
        "dict_ratio": values("dict_ratio"),
        "seeds": len(values("seed")),
    }
    if values("lr"):
        grid["lr"] = values("lr")
    if spec.get("sae"):
        grid["sae"] = spec["sae"]
    return grid


def architecture(folder: SweepFolder, records: list[RunRecord]) -> str:
    """The sweep's architecture (``untied``, ``topk``, ...): from a run's spec or ``cfg.json``,
    else ``config.yaml``; ``?`` when none says."""
    for r in records:
        name = r.spec.get("sae") or r.spec.get("arch")
        if isinstance(name, str) and name:
            return name
    for r in records:
        try:
            name = r.folder.cfg().get("architecture")
        except Exception:  # a missing or damaged cfg.json: try the next run
            continue
        if isinstance(name, str) and name:
            return name
    try:
        cfg = folder.load_config() or {}
    except SweepError:
        cfg = {}
    name = (cfg.get("sae") or {}).get("name") if isinstance(cfg.get("sae"), dict) else None
    return name if isinstance(name, str) and name else "?"


def sweep_labels(folders: list[SweepFolder], archs: list[str]) -> list[str]:
    """``<folder name> (<architecture>)`` for each sweep; folders of the same name are told
    apart by their parent folders."""
    resolved = [f.path.resolve() for f in folders]
    names = [p.name for p in resolved]
    for depth in range(2, 6):
        if len(set(names)) == len(names):
            break
        names = [
            "/".join(p.parts[-depth:]) if names.count(n) > 1 else n
            for p, n in zip(resolved, names, strict=True)
        ]
    return [f"{n} ({a})" for n, a in zip(names, archs, strict=True)]


def _check_sweeps(folders: list[SweepFolder]) -> None:
    """Every folder is a sweep with runs, and none is given twice (one-line errors)."""
    seen: dict[Path, Path] = {}
    for f in folders:
        if not f.run_ids():  # raises for a folder that is not a sweep
            raise SweepError(
                f"{f.path}/manifest.json lists no runs; start the sweep with 'sweep run'"
            )
        key = f.path.resolve()
        if key in seen:
            raise SweepError(
                f"{f.path} is given twice (also as {seen[key]}); pass each sweep folder once"
            )
        seen[key] = f.path


CURVE_POINTS = 2000
"""Training-curve records per run the curves plot draws (a day's curve has millions)."""


def draw_plots(
    sweep_dir: Path,
    out: Path,
    records: list[RunRecord],
    rows: list[dict],
    cross: crossdict.CrossDict,
    compared: list[tuple[str, list[dict]]] | None = None,
) -> dict[str, Path]:
    """Every plot of the report, in page order (see :data:`PLOTS`); with ``compared`` (legend
    label and summary rows of each sweep, this one first) the frontier shows every sweep."""
    curves = [(row, rec.folder.curve(CURVE_POINTS)) for row, rec in zip(rows, records, strict=True)]
    front = (
        plots.frontier_compare(compared, out / "frontier.png")
        if compared
        else plots.frontier(rows, out / "frontier.png")
    )
    images = {
        "frontier": front,
        "curves": plots.training_curves(curves, out / "curves.png"),
    }
    if plots.lr_axis(rows):
        images["lr"] = plots.lr_sweep(rows, out / "lr.png")
    if plots.has_lm_metrics(rows):
        images["lm_vs_l0"] = plots.lm_vs_l0(rows, out / "lm_vs_l0.png")
    if plots.has_levels(rows):
        images["levels"] = plots.nested_levels(rows, out / "levels.png")
    images.update(
        mmcs_vs_l1=plots.mmcs_next_vs_l1(rows, out / "mmcs_vs_l1.png"),
        mmcs_heatmap=plots.mmcs_heatmap(cross, out / "mmcs_heatmap.png"),
        dead_vs_l1=plots.dead_vs_l1(rows, out / "dead_vs_l1.png"),
        density=plots.density(sweep_dir, rows, out / "density.png"),
    )
    return images


def build_report(
    sweep_dir: str | Path,
    device: str = "auto",
    log_media: bool = True,
    out: str | Path | None = None,
    compare: Sequence[str | Path] = (),
    matrix_runs: int = crossdict.MATRIX_RUNS,
) -> tuple[Path, list[dict]]:
    """Write ``SWEEP_DIR/report/`` (or ``out``; see the module docstring); returns it and the
    summary rows. ``compare``: more sweep folders, whose runs join the frontier plot;
    ``matrix_runs``: at most this many runs of a dict ratio in its MMCS matrix (0: none).

    Also writes each finished run's cross-dictionary MMCS into its ``metrics.json``, refreshes
    ``SWEEP_DIR/summary.csv``, and, for sweeps run with ``logger=wandb``, sends the plots to a
    ``report`` wandb run (best-effort). Every folder is checked before anything is written.
    """
    sweep_dir = Path(sweep_dir)
    folder = SweepFolder(sweep_dir)
    others = [SweepFolder(Path(p)) for p in compare]
    _check_sweeps([folder, *others])
    dev = resolve_device(device, "--device")
    out = ensure_writable(
        _check_out(Path(out) if out is not None else sweep_dir / REPORT, sweep_dir),
        "report folder",
        "choose another with --out DIR",
    )
    remove_stale_temps(out, older_than=STALE_TEMP_SECONDS)  # of a report killed midway
    digest = folder.finished_digest()  # (before reading: a run finishing meanwhile outdates it)
    records = folder.read_runs(deep=True)  # (their weights are all read for MMCS anyway)
    cross = crossdict.compute(records, dev, out / crossdict.CACHE, matrix_runs)
    rows = _with_mmcs(summary_rows(records), cross)
    write_summary(out, rows)
    writable = _writes_back(sweep_dir, out)
    if writable:
        crossdict.annotate_runs(records, cross, digest)
        # read again: runs may have finished since (a report during training takes minutes of
        # MMCS), and the sweep's summary must not go back to what they were; those final at
        # the first read were hashed then (a final run's weights are never written again)
        hashed = {r.run_id for r in records if r.state.final}
        _write_back_summary(folder, hashed)
    write_mmcs(out / MMCS_FILE, cross)
    compared = _compared(folder, records, rows, others) if others else []
    images = draw_plots(
        sweep_dir, out, records, rows, cross, [(c.label, r) for c, r in compared] or None
    )
    write_html(out, _page(folder, records, rows, images, [c for c, _ in compared]))
    if log_media and writable:  # (the report's wandb run is kept in the sweep folder)
        _log_media(sweep_dir, rows, images)
    return out, rows


def _write_back_summary(folder: SweepFolder, hashed: set[str]) -> None:
    """The sweep's ``summary.csv`` as its runs are now; left as it is while a run's files
    could not be read (its recorded row would go blank)."""
    records = folder.read_runs(deep=True, trusted=hashed)
    unread = [r.run_id for r in records if r.unread]
    if unread:
        log.warning(
            "%s/summary.csv is left as it was: a file of %s could not be read",
            folder.path, ", ".join(unread),
        )  # fmt: skip
        return
    write_summary(folder.path, summary_rows(records))


def _with_mmcs(rows: list[dict], cross: crossdict.CrossDict) -> list[dict]:
    """``rows`` with this report's MMCS values only (a recorded one may pair a damaged run)."""
    for r in rows:
        for key in MMCS_KEYS:
            r.pop(key, None)
        r.update(cross.per_run.get(r["run_id"], {}))
    return rows


def _page(
    folder: SweepFolder,
    records: list[RunRecord],
    rows: list[dict],
    images: dict[str, Path],
    compared: list[Compared],
) -> Page:
    """What index.html shows; the settings' warnings are logged too."""
    source, settings = sweep_settings(folder, records)
    warnings = warnings_of(settings, rows)
    for w in warnings:
        log.warning("%s", w)
    return Page(
        sweep_dir=folder.path,
        rows=rows,  # (in grid order, as read)
        columns=[c for c in COLUMNS if any(r.get(c) is not None for r in rows)],
        images=images,
        settings=settings,
        settings_source=source,
        best=runfacts.frontier_ids(rows),
        run_dirs={rec.run_id: rec.folder.path for rec in records},
        files={"summary": SUMMARY, "mmcs": MMCS_FILE},
        knob=crossdict.sweep_knob(rows),
        compared=compared,
        warnings=warnings,
    )


def _writes_back(sweep_dir: Path, out: Path) -> bool:
    """Whether the report may update the sweep folder (its summary.csv, the runs' MMCS in
    their metrics.json): not a read-only one (reported to another ``--out``)."""
    if os.access(sweep_dir, os.W_OK):
        return True
    from sweep.logger import sweep_logger_config

    cfg = sweep_logger_config(sweep_dir)
    wandb = " and no report is sent to wandb" if cfg is not None and cfg.name == "wandb" else ""
    log.warning(
        "%s is read-only: its summary.csv and the runs' metrics.json keep their values%s "
        "(the report in %s has the new ones)",
        sweep_dir,
        wandb,
        out,
    )
    return False


REPORT_FILES = {"index.html", SUMMARY, MMCS_FILE, crossdict.CACHE, "logger.json"}
"""What a report folder holds besides its plots (``<plot>.png``)."""


def _check_out(out: Path, sweep_dir: Path) -> Path:
    """The report folder must be new, empty or an earlier report (its files are replaced):
    a report written among run folders or into a chunk store would mix into them. It may
    not lie in another sweep's folder (it would replace that sweep's report), nor among
    runs."""
    if out.is_file():
        raise SweepError(f"report folder {out} is a file; pass a folder with --out")
    _check_owner(out, sweep_dir)
    plots_png = {f"{p}.png" for p in PLOTS}
    foreign = [
        p.name
        for p in (out.iterdir() if out.is_dir() else [])
        if p.name not in REPORT_FILES | plots_png and not p.name.startswith(".")
    ]
    if foreign:
        shown = ", ".join(sorted(foreign)[:3]) + (", ..." if len(foreign) > 3 else "")
        raise SweepError(
            f"report folder {out} holds files a report did not write ({shown}); "
            "pass a new or empty folder with --out"
        )
    return out


def _check_owner(out: Path, sweep_dir: Path) -> None:
    """``out`` is outside every sweep folder, or in ``sweep_dir``: its report/ itself, or a
    folder beside its runs/, store/ and report/ (not in them)."""
    within = within_sweep(out)
    if within is None:
        return
    owner, part = within
    if owner != sweep_dir.resolve():
        raise SweepError(
            f"report folder {out} is inside another sweep folder ({owner}); pass a folder "
            f"outside it with --out ('sweep report {owner}' writes that sweep's own report)"
        )
    own_report = out.resolve() == (sweep_dir / REPORT).resolve()
    if part in ("", RUNS, STORE) or part == REPORT and not own_report:
        where = "is the sweep folder" if part == "" else f"is inside its {part}/ folder"
        raise SweepError(
            f"report folder {out} {where}; pass a new folder with --out (default: "
            f"{sweep_dir / REPORT})"
        )


def _compared(
    folder: SweepFolder, records: list[RunRecord], rows: list[dict], others: list[SweepFolder]
) -> list[tuple[Compared, list[dict]]]:
    """This sweep and ``others``, each with its summary rows (the others' are only read)."""
    sweeps = [(folder, records, rows)]
    for f in others:
        recs = f.read_runs(deep=True)
        sweeps.append((f, recs, summary_rows(recs)))
    labels = sweep_labels([f for f, _, _ in sweeps], [architecture(f, r) for f, r, _ in sweeps])
    compared = [
        (_compared_sweep(label, f, rs), rs)
        for label, (f, _, rs) in zip(labels, sweeps, strict=True)
    ]
    for warning in comparison_warnings([c for c, _ in compared]):
        log.warning("%s", warning)
    return compared


def _compared_sweep(label: str, folder: SweepFolder, rows: list[dict]) -> Compared:
    """One sweep of a comparison: its runs, the store and held-out rows its finished runs
    were measured on, how long they trained."""
    done = [r for r in rows if r.get("state") == "done"]
    held = sorted({r["eval_rows"] for r in done if isinstance(r.get("eval_rows"), int)})
    trained = [r["rows_trained"] for r in done if isinstance(r.get("rows_trained"), int)]
    return Compared(
        label,
        folder.path,
        len(rows),
        len(done),
        _store(folder),
        tuple(held),
        statistics.median(trained) if trained else None,
    )


def _store(folder: SweepFolder) -> dict:
    store = folder.manifest().get("store")
    return store if isinstance(store, dict) else {}


def _table_value(v: object) -> object:
    """A summary value for wandb's table: numbers stay numbers (sortable, plottable there)."""
    return v if v is None or isinstance(v, (int, float, str)) else str(v)


def _log_media(sweep_dir: Path, rows: list[dict], images: dict[str, Path]) -> None:
    from sweep.logger import log_report

    cols = [c for c in COLUMNS if any(r.get(c) is not None for r in rows)]
    data = [[_table_value(r.get(c)) for c in cols] for r in rows]
    try:
        log_report(sweep_dir, {k: str(v) for k, v in images.items()}, cols, data)
    except Exception as err:  # tracking is best-effort
        log.warning("could not send the report to wandb (%s); the report on disk is complete", err)
