"""``sweep status``: each run's state, progress and latest training metrics.

Progress is the latest training-curve record; ``saved`` where a run stopped now would
continue from: the newest step at which every unfinished member of its ensemble has a
checkpoint (members share one data cursor, so they resume together).

States: ``pending`` (nothing trained), ``running`` (a live driver training the sweep holds its
lock and the run has a checkpoint or began training under it), ``interrupted`` (has a checkpoint; the
sweep was stopped by a signal), ``partial`` (has a checkpoint, no driver), ``done``,
``diverged``, ``failed``.
Works while a sweep runs (read-only: it never takes the lock) and after it ended.
"""

from __future__ import annotations

import json
import math
from collections.abc import Collection
from pathlib import Path

from sweep import rate
from sweep.cells import column_texts
from sweep.checkpoints import checkpoint_steps
from sweep.errors import SweepError
from sweep.sweepdir import NO_OUTCOME, RunRecord, SweepFolder


def status_rows(sweep_dir: Path) -> list[dict]:
    """One row per run (grid order): state, rows trained of the total, latest L0 / FVU."""
    rows, records = [], SweepFolder(sweep_dir).read_runs()
    saved_steps = _saved_steps(records)
    for r in records:
        source = r.metrics if r.state.final else r.last
        batch = r.spec.get("train", {}).get("batch_size", 0)
        # (a run not started yet has no saved step: it starts over, as one without checkpoints)
        saved = None if r.state.final else saved_steps.get(r.run_id, 0) * batch
        trained = r.rows_trained  # the latest curve record; a stop checkpoints past it
        kept = _kept_weights_rows(r, batch)
        if kept is not None:  # its final weights stay: evaluated again, not trained
            trained = saved = kept
        rows.append(
            {
                "run_id": r.run_id,
                "state": r.state.value,
                "rows_total": r.total_rows,
                "rows_trained": max(trained, saved) if trained is not None and saved else trained,
                "rows_saved": saved,
                "l0": source.get("l0"),
                "fvu": source.get("fvu"),
                "held_out": r.state.final,  # (else l0 and fvu are of its latest training batch)
                **({"note": r.note} if r.note else {}),
                **({"unread": True} if r.unread else {}),
            }
        )
    return _fill_totals(rows)


def _kept_weights_rows(r: RunRecord, batch: int) -> int | None:
    """Rows trained into the kept final weights of a run whose ``metrics.json`` alone was
    lost (:attr:`RunRecord.kept_weights`), else None."""
    if not r.kept_weights:
        return None
    step = r.folder.evaluated_step()  # (a diverged run's weights hold the steps before it)
    return (step - 1) * batch if step is not None else r.total_rows


def _saved_steps(records: list[RunRecord]) -> dict[str, int]:
    """run_id -> the step it would resume from (by checkpoint file names, leaving out files cut
    short; their bytes are verified only when a run resumes): the newest one every unfinished
    member of its ensemble has (0: none); absent once final or before it has a spec."""
    steps: dict[str, set[int]] = {}
    for r in records:
        if not r.state.final and r.spec:
            try:
                steps[r.run_id] = checkpoint_steps(r.folder.path, whole=True)
            except OSError:
                continue
    group = {r.run_id: r.spec.get("ensemble") or r.run_id for r in records if r.run_id in steps}
    together: dict[str, set[int]] = {}
    for rid, key in group.items():
        together[key] = together.get(key, steps[rid]) & steps[rid]
    return {rid: max(together[key], default=0) for rid, key in group.items()}


def _fill_totals(rows: list[dict]) -> list[dict]:
    """A run not started yet has no spec, so no total: every run of a sweep trains on the
    same store with the same batches, so it gets the total of the others (their largest)."""
    known = [r["rows_total"] for r in rows if r.get("rows_total")]
    for r in rows:
        if not r.get("rows_total") and known:
            r["rows_total"] = max(known)
            r["rows_trained"] = r.get("rows_trained") or 0
    return rows


TRAINING_CAPTION = (
    "* l0 and fvu of a run not finished are of the training batch it last logged "
    "(train.log_every); a finished run's are measured on the held-out rows (data.eval_rows)"
)


def _from_training(row: dict) -> bool:
    return not row.get("held_out") and any(row.get(c) is not None for c in ("l0", "fvu"))


def _metric_cell(row: dict, col: str, text: str) -> str:
    """A cell (``text``: its value written); l0 and fvu measured on a training batch, not
    held-out rows, are marked *."""
    return f"{text} *" if text and col in ("l0", "fvu") and _from_training(row) else text


def _activity(sweep_dir: Path, rows: list[dict]) -> tuple[str, str | None]:
    """What the sweep is doing as one word (``running``, ``evaluating``, what its manifest
    recorded: ``done``, ``failed``, ``interrupted``; ``stopped``: its last driver died before
    recording that; ``incomplete``: done, but runs of that grid are no longer finished) and,
    where the word is not all of it, the sentence ``sweep status`` shows instead, which says
    what to do."""
    folder = SweepFolder(sweep_dir)
    activity, grid = folder.activity(), folder.last_grid()
    if activity == NO_OUTCOME:
        return "stopped", activity
    undone = [r["run_id"] for r in rows if r["state"] not in ("done", "diverged", "failed")]
    if activity != "done" or not undone:
        return activity, None
    lost = [rid for rid in undone if grid is None or rid in grid]
    unread = [r["run_id"] for r in rows if r.get("unread") and r["run_id"] in lost]
    if unread:  # (perhaps finished: nothing is judged of them)
        rest = len(lost) - len(unread)
        also = (
            f"; {rest} other run(s) are no longer finished: then re-run its command" if rest else ""
        )
        return "incomplete", (
            f"{len(unread)} run(s) could not be read: mend the cause (each one's note says "
            f"which file), then look again; a re-run stops at them, keeping their results{also}"
        )
    if lost:
        return "incomplete", (
            f"done when its last driver ended, but {len(lost)} run(s) are no longer finished: "
            "re-run its command to finish them (each one's note says how)"
        )
    return "done", (
        f"its last grid was done when its driver ended; {len(undone)} run(s) outside that grid "
        "are not finished: a `sweep run` whose grid has them continues them"
    )


def _percent(part: int | None, total: int | None) -> str:
    """``part`` of ``total`` in whole percent, rounded down: 100% only when all of it is."""
    return f"{int(100 * part // total)}%" if part is not None and total else ""


SHED = ("rows_trained", "saved", "fvu", "l0", "progress")
"""Columns a narrow terminal leaves out, first ones first."""


def status_facts(sweep_dir: Path, states: Collection[str] = ()) -> dict:
    """What ``sweep status`` says, as plain values (``--json``): every run's row (only those
    in ``states``, if given), what the sweep is doing, counts and rows over all runs, the
    pace of a training sweep (:func:`sweep.rate.pace`) and the member limits it learned."""
    rows = status_rows(sweep_dir)
    activity, note = _activity(sweep_dir, rows)
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["state"]] = counts.get(r["state"], 0) + 1
    limits = SweepFolder(sweep_dir).member_limits()
    return {
        "sweep_dir": str(sweep_dir),
        "activity": activity,
        "note": note,
        "runs": [r for r in rows if not states or r["state"] in states],
        "states": dict(sorted(counts.items())),
        "total_runs": len(rows),
        "rows_trained": sum(r.get("rows_trained") or 0 for r in rows),
        "rows_total": sum(r.get("rows_total") or 0 for r in rows),
        "pace": rate.pace(sweep_dir) if activity == "running" else None,
        "member_limits": {f"{r:g}": n for r, n in sorted(limits.items())},
    }


def no_runs_yet(sweep_dir: str, err: SweepError) -> dict:
    """``--json`` of a sweep that has not planned its runs: ``starting`` (preparing its data)
    or ``stopped`` (before it planned), the sentence saying which in ``note``."""
    from sweep.sweepdir import Preparing

    activity = "starting" if isinstance(err, Preparing) else "stopped"
    counts = {"states": {}, "total_runs": 0, "rows_trained": 0, "rows_total": 0}
    rest = {"pace": None, "member_limits": {}}  # (every key status_facts has)
    return {
        "sweep_dir": sweep_dir, "activity": activity, "note": str(err), "runs": [], **counts,
        **rest,
    }  # fmt: skip


def status_json(sweep_dir: Path, states: Collection[str] = ()) -> str:
    """:func:`status_facts` as JSON (NaN and infinite values, a diverged run's, as null)."""
    facts = status_facts(sweep_dir, states)
    facts["runs"] = [
        {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in r.items()}
        for r in facts["runs"]
    ]
    return json.dumps(facts, indent=1, allow_nan=False)


def print_status(sweep_dir: Path, states: Collection[str] = ()) -> None:
    """Every run's row (only those in ``states``, if given), then totals over all runs."""
    from sweep.console import fit_table, table_console

    facts = status_facts(sweep_dir, states)
    shown, n = facts["runs"], facts["total_runs"]
    only = f"; runs {', '.join(states)}: {len(shown)} of {n}" if states else ""
    title = f"sweep status: {sweep_dir} ({facts['note'] or facts['activity']}{only})"
    cols = ["run_id", "state", "progress", "saved", "rows_trained", "l0", "fvu"]
    cols += ["note"] if any(r.get("note") for r in shown) else []
    for r in shown:
        r["progress"] = _percent(r.get("rows_trained"), r.get("rows_total"))
        r["saved"] = _percent(r.get("rows_saved"), r.get("rows_total"))
    console = table_console()
    left_out: list[str] = []
    if shown or not states:
        texts = column_texts(shown, cols)
        cells = [
            [_metric_cell(r, c, t[c]) for c in cols] for r, t in zip(shown, texts, strict=True)
        ]
        fitted = fit_table(console, title, cols, cells, drop=SHED, text=("note",))
        fitted.print(console)
        left_out = fitted.left_out
    else:  # no run in those states: no empty table, the title says so in one line
        console.print(title, highlight=False, soft_wrap=True)
    if {"l0", "fvu"} - set(left_out) and any(_from_training(r) for r in shown):
        console.print(TRAINING_CAPTION, highlight=False)
    summary = "  ".join(f"{k}: {v}" for k, v in facts["states"].items())
    trained, total = facts["rows_trained"], facts["rows_total"]
    rows = f"{trained:,}/{total:,}" if total else "not known before a run starts"
    console.print(f"{summary}  total: {n}  rows: {rows}")
    if facts["pace"]:
        console.print(rate.words(facts["pace"]), highlight=False)
    limits = facts["member_limits"]
    if limits:
        said = ", ".join(f"dict ratio {r}: {m}" for r, m in limits.items())
        console.print(f"members per ensemble, learned when one ran out of GPU memory: {said}")
