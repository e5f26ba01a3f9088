"""The summary table on the terminal (``sweep run``, ``resume``, ``evaluate``, ``report``):
as wide as the terminal, at most :data:`TABLE_ROWS` runs, with the notes of runs not done.
(No plotting imports: printing it must not pay for matplotlib.)"""

from __future__ import annotations

from sweep import runfacts
from sweep.cells import column_texts
from sweep.rundir import FINAL_STATES
from sweep.sweepdir import METRICS_VERSION, SUMMARY, SUMMARY_COLUMNS

COLUMNS = SUMMARY_COLUMNS


SHED = (
    "seed",
    "dict_ratio",
    "l1",
    "k",
    "lr",
    "mse",
    "dense_fraction",
    "mmcs_seeds",
    "mmcs_next_ratio",
)
SHED += ("gt_mmcs", "dead_fraction", "loss_recovered", "gt_recovered", "fvu", "l0")
"""Columns a narrow terminal leaves out, first ones first (the grid point's are in its run id)."""


TABLE_ROWS = 60
"""Above this many runs the terminal table lists only those on the FVU–L0 frontier (a table of
hundreds scrolls the log away); ``summary.csv`` and ``sweep status`` list every run."""


def print_table(rows: list[dict], title: str = "sweep summary") -> None:
    """A readable table on stdout (rich), as wide as the terminal."""
    from sweep.console import fit_table, table_console

    best = runfacts.frontier_ids(rows)
    every, (rows, cut) = rows, _table_rows(rows, best)
    cols = [c for c in COLUMNS if any(r.get(c) is not None for r in rows)]
    weak = "loss_recovered" in cols and any(runfacts.weak_loss_recovered(r) for r in rows)
    console = table_console()
    texts = column_texts(rows, cols)
    cells = [
        [_cell(r, c, t[c], r["run_id"] in best) for c in cols]
        for r, t in zip(rows, texts, strict=True)
    ]
    fitted = fit_table(console, title, cols, cells, drop=SHED)
    fitted.print(console, see=SUMMARY)
    if best and any(r["run_id"] in best for r in rows):
        console.print(BEST_CAPTION, highlight=False)
    if weak and "loss_recovered" not in fitted.left_out:
        console.print(WEAK_CAPTION, highlight=False)
    if "l1" in cols and "l1" not in fitted.left_out and any(_l0_penalised(r) for r in rows):
        console.print(L0_CAPTION, highlight=False)
    if cut:
        console.print(cut, highlight=False)
    for line in _notes(every):
        console.print(line, highlight=False)


def _table_rows(rows: list[dict], best: set[str]) -> tuple[list[dict], str | None]:
    """The rows the terminal table lists, and a line saying which when not all
    (:data:`TABLE_ROWS`; ``best``: the run ids on the frontier)."""
    if len(rows) <= TABLE_ROWS:
        return rows, None
    front = [r for r in rows if r["run_id"] in best]
    shown = front[:TABLE_ROWS] or rows[:TABLE_ROWS]
    which = f"{len(shown)} on the FVU–L0 frontier" if front else f"{len(shown)} first"
    if len(front) > TABLE_ROWS:
        which = f"first {len(shown)} of the {len(front)} on the FVU–L0 frontier"
    return shown, f"{len(rows)} runs: the {which} above; every run in {SUMMARY} (and sweep status)"


def _notes(rows: list[dict], shown: int = 10) -> list[str]:
    """Why each run that is not done is where it is (failed, damaged, diverged) and what is
    wrong with a done one (a dead dictionary, ...), as lines under the table: the first
    ``shown``, then how many more ``summary.csv`` explains."""
    noted = [r for r in rows if r.get("note")]
    lines = [f"{r['run_id']} ({r.get('state')}): {r['note']}" for r in noted[:shown]]
    if len(noted) > shown:
        lines.append(f"... and {len(noted) - shown} more (the note column of {SUMMARY})")
    return lines + _measured_before(rows)


def _measured_before(rows: list[dict]) -> list[str]:
    """A line when finished runs were measured by earlier metric definitions than the others
    (a sweep begun by an earlier version of sweep): their columns do not compare."""
    done = [r for r in rows if r.get("state") in FINAL_STATES]
    older = [r for r in done if (r.get("metrics_version") or 1) < METRICS_VERSION]
    if not older:
        return []
    return [
        f"{len(older)} finished run(s) were measured by an earlier version of sweep's metrics "
        f"(cossim, l2_norm_in/out differ or are missing): `sweep evaluate` on this sweep "
        "measures them again from their weights"
    ]


def _l0_penalised(row: dict) -> bool:
    """Whether the row's run penalises L0 (JumpReLU): its ``l1`` is its L0 coefficient."""
    from sweep import archs

    arch = archs.REGISTRY.get(str(row.get("arch")))
    return arch is not None and arch.l0_penalty


L0_CAPTION = "l1 of jumprelu runs: their L0 coefficient (the penalty counts firing codes)"

WEAK_CAPTION = (
    f"† loss_recovered not meaningful: zero-ablating the hook changed the loss by less than "
    f"{runfacts.MIN_ABLATION_GAP:g} nats; judge those runs by ce_loss_spliced vs ce_loss_clean"
)


BEST_CAPTION = "★ on the FVU–L0 frontier (the report's best runs)"


def _cell(row: dict, col: str, text: str, best: bool = False) -> str:
    """A table cell (``text``: its value written); a ``loss_recovered`` that divides by
    noise is marked † (as on the page), the run id of a run on the frontier ★."""
    if col == "run_id" and best:
        return f"{text} ★"
    weak = col == "loss_recovered" and runfacts.weak_loss_recovered(row)
    return f"{text} †" if weak else text
