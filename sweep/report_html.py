"""``report/index.html``: the page a researcher keeps open while a sweep trains.

Top to bottom: the sweep's settings (data, grid, train), the best runs (the FVU–L0 Pareto
frontier), the run table (click a header to sort; each run links to its files), short
definitions of the metrics, then the plots. Texts name the sweep's sparsity setting: the L1
coefficient, or ``k`` for TopK-style sweeps. A report of several sweeps (``sweep report A B``)
is the first sweep's page whose frontier plot shows every sweep; the header lists them. One self-contained file: inline CSS and a few
lines of inline JavaScript, relative links only, so it opens from disk with no network.
"""

from __future__ import annotations

import html
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from sweep import crossdict, runfacts
from sweep.cells import column_texts
from sweep.io import atomic_write_bytes
from sweep.metrics import DENSE_THRESHOLD, RECOVERED_THRESHOLD
from sweep.rundir import CFG, CURVE, FINAL_STATES, METRICS, SPEC

RUN_FILES = ((METRICS, "metrics"), (CFG, "cfg"), (SPEC, "spec"), (CURVE, "curve"))
"""Run-folder files the table links to (when they exist), with their link text."""

BEST_COLUMNS = ("run_id", "l1", "k", "lr", "dict_ratio", "seed", "l0", "fvu", "dead_fraction")
BEST_EXTRA = ("gt_mmcs", "gt_recovered", "loss_recovered", "mmcs_next_ratio", "mmcs_seeds")

GAP = runfacts.MIN_ABLATION_GAP


def definitions(knob: str = "l1") -> dict[str, str]:
    """The page's definitions for a sweep whose sparsity knob is ``knob`` (``l1`` or ``k``)."""
    out = dict(DEFINITIONS)
    if knob in KNOB_DEFINITIONS:
        name, text = KNOB_DEFINITIONS[knob]
        out["MMCS"] = out["MMCS"].replace("the same L1 and seed", f"the same {name} and seed")
        out = {name: text, **out}
    return out


KNOB_DEFINITIONS = {
    "k": (
        "k",
        "latents a TopK-style SAE keeps active per row (topk: at most k per row, fewer where "
        "a kept pre-activation is ≤ 0; batchtopk, matryoshka: k per row on average over a training batch, a learned threshold at "
        "inference): the grid's sparsity setting, in place of an L1 coefficient.",
    ),
    "l0": (
        "L0 coefficient",
        "JumpReLU's grid.l1 (the l1 column): the weight λ of its L0 penalty, loss = MSE + "
        "λ·L0, in place of an L1 coefficient.",
    ),
}
"""(name, definition) of each knob other than L1."""


DEFINITIONS = {
    "FVU": "fraction of variance unexplained on held-out rows: sum of squared reconstruction "
    "errors over the activations' total variance about their mean. 0 = perfect, 1 = no better "
    "than predicting the mean.",
    "L0": "mean number of features active (code > 0) per held-out row.",
    "MMCS": "mean max cosine similarity from dictionary A to B: the mean over A's decoder atoms "
    "of the largest cosine to any atom of B. gt_mmcs: true features vs the decoder (synthetic "
    "stores); mmcs_next_ratio: vs the same L1 and seed at the next larger dict ratio; "
    "mmcs_seeds: vs the other seeds of the grid point. Atoms that reappear are more likely real.",
    "gt_recovered": f"fraction of the ground-truth features whose closest decoder atom has "
    f"cosine > {RECOVERED_THRESHOLD:g} (synthetic stores).",
    "loss recovered": "(CE ablated − CE spliced) / (CE ablated − CE clean): the model's "
    "next-token cross-entropy on held-out text with the SAE's reconstruction spliced in at the "
    "hook, against the clean model and the hook zeroed. 1 = splicing costs nothing, 0 = as bad "
    f"as deleting the activations. Greyed with † when the ablation gap (CE ablated − CE clean) "
    f"is below {GAP:g} nats: the ratio then divides by noise and can exceed 1.",
    "dead / dense": f"fraction of features that never fire on the held-out rows / fire on more "
    f"than {DENSE_THRESHOLD:.0%} of them.",
    "frontier ★": "finished runs on the FVU–L0 Pareto frontier: FVU below 1 (better than "
    "predicting the mean), and no run on the frontier has a lower FVU at a lower L0, or at "
    "one at most 1% higher (closer L0s are one L0: TopK runs of one k); taken from the "
    "lowest FVU up.",
}
COLUMN_HELP = {
    "fvu": DEFINITIONS["FVU"],
    "l0": DEFINITIONS["L0"],
    "gt_mmcs": DEFINITIONS["MMCS"],
    "mmcs_next_ratio": DEFINITIONS["MMCS"],
    "mmcs_seeds": DEFINITIONS["MMCS"],
    "gt_recovered": DEFINITIONS["gt_recovered"],
    "loss_recovered": DEFINITIONS["loss recovered"],
    "dead_fraction": "fraction of features that never fire on the held-out rows.",
    "dense_fraction": f"fraction of features that fire on more than {DENSE_THRESHOLD:.0%} of "
    "the held-out rows.",
    "mse": "mean squared reconstruction error per activation dimension (training space).",
    "lr": "the run's learning rate (grid.lr: the grid's learning-rate axis).",
}


def captions(knob: str = "l1", sweeps: list[str] | None = None) -> dict[str, str]:
    """Figure captions for a sweep whose knob is ``knob``; ``sweeps``: the labels of the sweeps
    on a comparison frontier (``sweep report A B``)."""
    if knob == "l1" and not sweeps:
        return dict(CAPTIONS)
    name = KNOB_DEFINITIONS[knob][0] if knob in KNOB_DEFINITIONS else "L1"
    out = {k: v.replace("L1", name) for k, v in CAPTIONS.items()}
    if sweeps:
        out["frontier"] = (
            f"FVU against L0 (log-log) of {len(sweeps)} sweeps: {', '.join(sweeps)}. One colour "
            "family and marker per sweep, darker = larger dict ratio (the same shade for one "
            "ratio in every sweep); lines: each sweep's Pareto frontier; labels: dict ratio and "
            "L1 or L0 coefficient (JumpReLU) (e.g. r8 0.01) or k (e.g. r8 k32), once per grid "
            "point (its seeds lie close by)."
        )
    return out


CAPTIONS = {
    "frontier": "FVU against L0 (log-log). One colour per dict ratio; labels are L1 (once per grid point: its seeds lie close by); dashed: Pareto frontier.",
    "curves": "Training curves against rows seen: loss, FVU and L0 on training batches. One line per run, colour = dict ratio, lighter = smaller L1, dotted = not finished.",
    "lm_vs_l0": f"Language-model metrics against L0 (harvested stores). Grey crosses: loss recovered with an ablation gap below {GAP:g} nats (not meaningful).",
    "lr": "FVU (log) and the fraction of dead latents against the learning rate (grid.lr): one line per dict ratio and L1 value, the mean over seeds (dots: each run); colour = dict ratio, lighter = smaller L1.",
    "levels": "Matryoshka: FVU of each nested dictionary (its first latents' codes alone, held-out rows), the whole dictionary last; one line per run, colour = dict ratio, lighter = smaller k.",
    "mmcs_vs_l1": "MMCS from each run to the same L1/seed at the next larger dict ratio, against L1.",
    "mmcs_heatmap": "MMCS between dictionaries of one dict ratio, ordered by seed, then L1 (row: from, column: to; white lines between seeds); colour range fitted to the values between different runs (a run against itself shows as the top colour).",
    "dead_vs_l1": "Dead and dense feature fractions against L1.",
    "density": "Histograms of log10 feature firing frequency on the evaluation rows: seed 0's runs, at most 4 L1 values per dict ratio (spread over the grid), at most 3 dict ratios; each panel's title says how many of how many.",
}


@dataclass
class Compared:
    """A sweep on the comparison frontier of ``sweep report A B ...``."""

    label: str
    """``<folder name> (<architecture>)``, as in the plot's legend."""
    path: Path
    runs: int
    done: int
    store: dict = field(default_factory=dict)
    """The store it trained on, as its manifest records it (``path``, ``id``, ``width``)."""
    eval_rows: tuple[int, ...] = ()
    """The held-out rows its finished runs were evaluated on (``data.eval_rows``)."""
    rows_trained: float | None = None
    """The median number of rows its finished runs trained on."""


@dataclass
class Page:
    """Everything the page shows (built by :func:`sweep.report.build_report`)."""

    sweep_dir: Path
    rows: list[dict]
    columns: list[str]
    images: dict[str, Path]
    settings: dict[str, dict]
    settings_source: str
    best: set[str]
    """Run ids on the FVU–L0 Pareto frontier."""
    run_dirs: dict[str, Path]
    files: dict[str, str] = field(default_factory=dict)
    """Report data files to link: label -> file name in the report folder."""
    knob: str = "l1"
    """The sweep's sparsity setting: ``l1`` or ``k`` (TopK-style sweeps)."""
    compared: list[Compared] = field(default_factory=list)
    """Every sweep on the comparison frontier, this one first (empty: a one-sweep report)."""
    warnings: list[str] = field(default_factory=list)
    """What a reader must know before trusting a figure (:func:`sweep.report.warnings_of`)."""


def write_html(out: Path, page: Page) -> Path:
    """Write ``out/index.html`` (links relative to ``out``) and return its path."""
    parts = [
        _head(page),
        _settings(page),
        _best(out, page),
        '<section id="runs"><h2>Runs <small>click a column header to sort</small></h2>',
        _table(out, page, page.rows, page.columns, "runs"),
        _footnote(page.rows) + "</section>",
        _definitions(page.knob),
        _figures(page),
        f"<script>{SORT_JS}</script></body></html>\n",
    ]
    path = out / "index.html"
    atomic_write_bytes(path, "\n".join(parts).encode())
    return path


def _e(v: object) -> str:
    return html.escape(str(v), quote=True)


def _head(page: Page) -> str:
    states: dict[str, int] = {}
    for r in page.rows:
        states[r["state"]] = states.get(r["state"], 0) + 1
    counts = ", ".join(f"{k}: {v}" for k, v in sorted(states.items()))
    data = ", ".join(f'<a href="{_e(f)}">{_e(f)}</a>' for f in page.files.values())
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>sweep report: {_e(page.sweep_dir.resolve().name)}</title>
<style>{CSS}</style></head><body>
<h1>sweep report: {_e(page.sweep_dir.resolve().name)}</h1>
<p class="meta">{_e(page.sweep_dir)} &middot; {_runs(len(page.rows))} ({_e(counts)}) &middot;
generated {time.strftime("%Y-%m-%d %H:%M:%S")} &middot; data: {data} &middot;
<a href="#runs">runs</a> &middot; <a href="#definitions">definitions</a> &middot;
<a href="#plots">plots</a></p>{_compared(page)}"""


def _runs(n: int) -> str:
    return f"{n} run" if n == 1 else f"{n} runs"


def _compared(page: Page) -> str:
    if not page.compared:
        return ""
    items = ", ".join(
        f"<b>{_e(c.label)}</b> ({'this sweep' if i == 0 else _e(c.path)}: "
        f"{_runs(c.runs)}, done: {c.done})"
        for i, c in enumerate(page.compared)
    )
    out = f'\n<p class="meta compared">frontier plot compares: {items}</p>'
    warnings = comparison_warnings(page.compared)
    return out + "".join(f'\n<p class="meta warn">{_e(w)}</p>' for w in warnings)


LENGTH_RATIO = 2.0
"""Sweeps whose runs trained this many times longer than another's get a warning."""


def comparison_warnings(compared: list[Compared]) -> list[str]:
    """What makes the compared sweeps' frontiers unlike for unlike: different stores (their
    FVU and L0 measured on different data), different held-out rows on the same store,
    training lengths ``LENGTH_RATIO`` or more apart."""
    out = []
    if len({c.store.get("id") for c in compared} - {None}) > 1:
        where = "; ".join(f"{c.label}: {c.store.get('path', '?')}" for c in compared)
        out.append(
            f"these sweeps trained on different stores ({where}): their FVU and L0 are not "
            "measured on the same data"
        )
    elif len({c.eval_rows for c in compared if c.eval_rows}) > 1:
        where = "; ".join(f"{c.label}: {_rows(c.eval_rows)}" for c in compared if c.eval_rows)
        out.append(
            f"these sweeps held out different rows for evaluation (data.eval_rows: {where}): "
            "their FVU and L0 are measured on different rows"
        )
    lengths = [c.rows_trained for c in compared if c.rows_trained]
    if lengths and max(lengths) >= LENGTH_RATIO * min(lengths):
        where = "; ".join(f"{c.label}: {c.rows_trained:,.0f}" for c in compared if c.rows_trained)
        out.append(
            f"these sweeps trained for very different lengths (rows per run: {where}): a "
            "longer-trained sweep's frontier is lower for that reason too"
        )
    return out


def _rows(values: tuple[int, ...]) -> str:
    return " or ".join(f"{v:,}" for v in values)


def _value(v: object) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, bool) or v is None:
        return str(v).lower() if v is not None else "null"
    if isinstance(v, (list, tuple)):
        return ", ".join(_value(x) for x in v)
    return str(v)


def _settings(page: Page) -> str:
    cards = []
    for name, values in page.settings.items():
        chips = " ".join(
            f'<span class="kv"><b>{_e(k)}</b> {_e(_value(v))}</span>'
            for k, v in values.items()
            if v is not None
        )
        cards.append(f'<div class="card"><h3>{_e(name)}</h3>{chips}</div>')
    warned = "".join(f'\n<p class="meta warn">{_e(w)}</p>' for w in page.warnings)
    return (
        f'<section id="settings"><h2>Settings <small>from {_e(page.settings_source)}</small></h2>'
        f'<div class="cards">{"".join(cards)}</div>{warned}</section>'
    )


def _best(out: Path, page: Page) -> str:
    best = sorted((r for r in page.rows if r["run_id"] in page.best), key=lambda r: r["l0"])
    if not best:
        return '<section id="best"><h2>Best runs</h2><p>No finished runs yet.</p></section>'
    cols = [c for c in BEST_COLUMNS + BEST_EXTRA if any(r.get(c) is not None for r in best)]
    return (
        '<section id="best"><h2>Best runs <small>the FVU–L0 Pareto frontier, by L0 '
        "(★ in the table)</small></h2>" + _table(out, page, best, cols, "best") + "</section>"
    )


def _column_help(knob: str) -> dict[str, str]:
    if knob not in KNOB_DEFINITIONS:
        return COLUMN_HELP
    name, text = KNOB_DEFINITIONS[knob]
    mmcs = definitions(knob)["MMCS"]
    return {
        **{c: mmcs if "mmcs" in c else v for c, v in COLUMN_HELP.items()},
        crossdict.KNOB_FIELDS[knob]: text,
    }


def _table(out: Path, page: Page, rows: list[dict], cols: list[str], name: str) -> str:
    helps = _column_help(page.knob)
    head = "".join(
        f'<th data-col="{_e(c)}" title="{_e(helps.get(c, c))} (click to sort)">{_e(c).replace("_", "_<wbr>")}</th>'
        for c in cols
    )
    body = "\n".join(
        f'<tr class="{_e(r.get("state"))}{" best" if r["run_id"] in page.best else ""}">'
        + "".join(_cell(out, page, r, c, t[c]) for c in cols)
        + "</tr>"
        for r, t in zip(rows, column_texts(rows, cols), strict=True)
    )
    return (
        f'<table id="{name}-table" class="sortable">'
        f"<thead><tr>{head}</tr></thead><tbody>\n{body}\n</tbody></table>"
    )


def _cell(out: Path, page: Page, row: dict, col: str, text: str) -> str:
    """A cell of the run table (``text``: its value written, :mod:`sweep.cells`)."""
    v = row.get(col)
    if col == "run_id":
        star = "★ " if v in page.best else ""
        return (
            f'<td class="id" data-s="{_e(v)}">{star}{_e(v)} '
            f"{_links(out, page.run_dirs.get(str(v)), row.get('state'))}</td>"
        )
    if col == "state" and row.get("note"):  # why it failed, or what its metrics warn about
        return f'<td title="{_e(row["note"])}">{_e(v)}&nbsp;ⓘ</td>'
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        return f"<td>{_e('' if v is None else v)}</td>"
    key = repr(float(v)) if math.isfinite(v) else ""
    if col == "loss_recovered" and runfacts.weak_loss_recovered(row):
        gap = runfacts.ablation_gap(row)
        tip = (
            f"not meaningful: zero-ablating the hook changed the loss by {gap:+.3g} nats "
            f"(less than +{GAP:g}), so this ratio does not measure what the SAE recovers"
        )
        return f'<td class="weak" data-v="{key}" title="{_e(tip)}">{text}&nbsp;†</td>'
    return f'<td data-v="{key}">{text}</td>'


def _links(out: Path, run_dir: Path | None, state: object) -> str:
    """Links to the run's files; metrics.json only once final (before, it is a stale one)."""
    if run_dir is None:
        return ""
    links = [
        f'<a href="{_e(Path(os.path.relpath(run_dir / f, out)).as_posix())}">{label}</a>'
        for f, label in RUN_FILES
        if (run_dir / f).is_file() and (f != METRICS or state in FINAL_STATES)
    ]
    return f'<span class="files">{" ".join(links)}</span>' if links else ""


def _footnote(rows: list[dict]) -> str:
    weak = [r for r in rows if runfacts.weak_loss_recovered(r)]
    if not weak:
        return ""
    gaps = sorted(g for g in (runfacts.ablation_gap(r) for r in weak) if g is not None)
    lo, hi = f"{gaps[0]:+.3g}", f"{gaps[-1]:+.3g}"
    span = lo if lo == hi else f"{lo}–{hi}"
    return (
        f'<p class="note">† {len(weak)} run(s): <code>loss_recovered</code> is not meaningful — '
        f"zero-ablating the hook changed the model's loss by {span} nats (less than "
        f"+{GAP:g} nats), so the ratio does not measure what the SAE recovers and can exceed 1. Judge "
        "these runs by <code>ce_loss_spliced</code> against <code>ce_loss_clean</code>.</p>"
    )


def _definitions(knob: str = "l1") -> str:
    items = "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in definitions(knob).items())
    return f'<section id="definitions"><h2>Definitions</h2><dl>{items}</dl></section>'


def _figures(page: Page) -> str:
    texts = captions(page.knob, [c.label for c in page.compared])
    figs = "\n".join(
        f'<figure class="{_e(name)}"><img src="{_e(p.name)}" alt="{_e(name)}">'
        f"<figcaption>{_e(texts.get(name, name))}</figcaption></figure>"
        for name, p in page.images.items()
    )
    return f'<section id="plots"><h2>Plots</h2>\n{figs}\n</section>'


CSS = """
body { font-family: system-ui, sans-serif; margin: 1em 1.5em; color: #222; }
h1 { font-size: 1.35em; margin: 0 0 0.2em; } h2 { font-size: 1.1em; margin: 1em 0 0.35em; }
h2 small, p.meta { font-weight: normal; color: #666; font-size: 0.8em; } p.meta { margin: 0; }
p.warn { color: #a40; }
.cards { display: flex; gap: 0.6em; flex-wrap: wrap; }
.card { flex: 1 1 22em; border: 1px solid #ddd; border-radius: 4px; padding: 0.3em 0.5em;
  font-size: 0.8em; line-height: 1.6; background: #fafafa; }
.card h3 { margin: 0; font-size: 1em; } .kv { white-space: nowrap; margin-right: 0.9em; }
.kv b { color: #555; font-weight: 600; }
table { border-collapse: collapse; font-size: 0.82em; font-variant-numeric: tabular-nums; }
th, td { border: 1px solid #ccc; padding: 2px 6px; text-align: right; }
th { background: #f0f0f0; cursor: pointer; position: sticky; top: 0; user-select: none; }
th[aria-sort=ascending]::after { content: " ▲"; } th[aria-sort=descending]::after { content: " ▼"; }
td.id { text-align: left; white-space: nowrap; }
.files a { font-size: 0.85em; color: #36c; margin-left: 0.3em; }
tr.best td { background: #e6f4e6; } tr.best td.id { font-weight: 600; }
tr.diverged td, tr.failed td { background: #fde8e8; } tr.partial, tr.pending, tr.running { color: #888; }
td.weak { color: #999; background: repeating-linear-gradient(45deg, #f6f6f6, #f6f6f6 4px, #fff 4px, #fff 8px); }
p.note { font-size: 0.82em; color: #555; max-width: 60em; }
dl { font-size: 0.85em; max-width: 75em; display: grid; grid-template-columns: max-content 1fr; gap: 0.2em 1em; }
dt { font-weight: 600; } dd { margin: 0; }
figure { display: inline-block; margin: 0.5em; max-width: 100%; vertical-align: top; }
figure.curves { display: block; }
img { max-width: 100%; border: 1px solid #ddd; } figcaption { font-size: 0.85em; color: #444; max-width: 50em; }
"""

SORT_JS = """
function sortKey(cell) {
  if (cell.dataset.v !== undefined) return cell.dataset.v === "" ? null : Number(cell.dataset.v);
  const s = cell.dataset.s !== undefined ? cell.dataset.s : cell.textContent.trim();
  return s === "" ? null : s;
}
function sortTable(table, i) {
  const heads = table.tHead.rows[0].cells;
  const dir = heads[i].getAttribute("aria-sort") === "ascending" ? -1 : 1;
  for (const h of heads) h.removeAttribute("aria-sort");
  heads[i].setAttribute("aria-sort", dir > 0 ? "ascending" : "descending");
  const body = table.tBodies[0];
  const rows = Array.from(body.rows);
  rows.sort((a, b) => {
    const x = sortKey(a.cells[i]), y = sortKey(b.cells[i]);
    if (x === null || y === null) return (x === null) - (y === null);
    return (x < y ? -1 : x > y ? 1 : 0) * dir;
  });
  for (const r of rows) body.appendChild(r);
}
for (const table of document.querySelectorAll("table.sortable")) {
  Array.from(table.tHead.rows[0].cells).forEach((th, i) =>
    th.addEventListener("click", () => sortTable(table, i)));
}
"""
