"""Report plots, drawn with matplotlib's Agg canvas (no pyplot: no global backend change).

Every function takes summary rows (dicts from :mod:`sweep.report`) and a PNG path, draws
only finished runs with finite values, and draws a labelled placeholder when there is
nothing to show yet (a running sweep), so the report always has every image.

The sweep's sparsity setting (its *knob*, :func:`sweep.crossdict.knob`) is the L1
coefficient (a log axis) or, for TopK-style sweeps, ``k`` (a log2 axis when the grid spans
a factor of 4 or more, else linear). The ``*_vs_l1`` functions and files keep their names
for both. :func:`frontier_compare` draws the FVU–L0 points of several sweeps on one axes
(``sweep report A B ...``).

Also here, because plots and page must agree on them: which runs are on the FVU–L0 Pareto
frontier (:func:`frontier_ids`) and which ``loss_recovered`` values mean nothing because
zero-ablating the hook hardly changes the model's loss (:func:`weak_loss_recovered`).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import NamedTuple

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_rgba
from matplotlib.figure import Figure
from matplotlib.ticker import EngFormatter, LogFormatter, NullFormatter

from sweep import archs, crossdict
from sweep.crossdict import (
    KNOB_AXES,
    KNOB_NAMES,
    CrossDict,
    knob_text,
    knob_value,
    spread,
    sweep_knob,
)
from sweep.io import atomic_write
from sweep.rundir import FINAL_STATES, RunFolder
from sweep.runfacts import (
    MIN_ABLATION_GAP,
    finished,
    finite,
    frontier_candidates,
    pareto,
    weak_loss_recovered,
    with_knob,
)

log = logging.getLogger(__name__)

DPI = 110


def _figure(w: float = 7.0, h: float = 5.0, ncols: int = 1) -> tuple[Figure, list]:
    fig = Figure(figsize=(w, h), dpi=DPI)
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]
    return fig, axes


def _save(fig: Figure, path: Path) -> Path:
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png"))
    return path


def placeholder(path: Path, title: str, text: str) -> Path:
    fig, (ax,) = _figure(6, 3)
    ax.set_axis_off()
    ax.set_title(title)
    ax.text(
        0.5, 0.5, text, ha="center", va="center", fontsize=12, color="0.3", transform=ax.transAxes
    )
    return _save(fig, path)


def _ratio_colors(ratios: list[float]) -> dict[float, object]:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return {r: cmap(i % 10) for i, r in enumerate(sorted(ratios))}


LR_STYLES = ("-", "--", ":", "-.")
"""A line style per learning rate of a grid with an lr axis (``grid.lr``), in order."""


def lr_axis(rows: list[dict]) -> list[float]:
    """The learning rates of a grid with an lr axis (``grid.lr``), ascending; [] without."""
    return sorted({r["lr"] for r in rows if finite(r.get("lr"))})


class Series(NamedTuple):
    """The runs of one dict ratio (and learning rate: ``grid.lr``) drawn as one line."""

    label: str
    color: object
    """The dict ratio's colour."""
    style: str
    """The line style: one per learning rate (``-`` without an lr axis)."""
    tint: object
    """The colour lighter for a smaller learning rate (where the style is taken)."""
    runs: list[dict]


def _series(pts: list[dict]) -> list[Series]:
    """The runs of each dict ratio as one series; with an lr axis one per dict ratio and
    learning rate."""
    colors, lrs = _ratio_colors(list({r["dict_ratio"] for r in pts})), lr_axis(pts)
    out = []
    for ratio, color in colors.items():
        for i, lr in enumerate(lrs or [None]):
            mine = [r for r in pts if r["dict_ratio"] == ratio and r.get("lr") == lr]
            if mine and lr is None:
                out.append(Series(f"ratio {ratio:g}", color, "-", color, mine))
            elif mine:
                tint = _lighten(color, 0.55 * (1 - i / max(1, len(lrs) - 1)))
                label = f"ratio {ratio:g}, lr {lr:g}"
                out.append(Series(label, color, LR_STYLES[i % 4], tint, mine))
    return out


def _lr_text(row: dict) -> str:
    """`` lr 0.001`` for a run of a grid with an lr axis, else nothing (for labels)."""
    return f" lr {row['lr']:g}" if finite(row.get("lr")) else ""


def _mean(values: list) -> float:
    vals = [v for v in values if finite(v)]
    return sum(vals) / len(vals) if vals else math.nan


# ----------------------------------------------------------------------------- runs


def has_lm_metrics(rows: list[dict]) -> bool:
    """Whether any finished run has language-model metrics (runs on a harvested store)."""
    return any(_lm_panels(finished(rows)))


# ----------------------------------------------------------------------------- axes


def _l1_axis(ax, l1s: list[float], label: str = KNOB_AXES["l1"]) -> None:
    """A log L1 axis (symlog when 0 is in the grid) with a labelled tick at every grid L1."""
    ticks = sorted({float(v) for v in l1s})
    positive = [v for v in ticks if v > 0]
    if len(positive) < len(ticks):  # L1 = 0 cannot sit on a log axis
        ax.set_xscale("symlog", linthresh=min(positive) if positive else 1e-4, linscale=0.5)
    else:
        ax.set_xscale("log")
    step = max(1, math.ceil(len(ticks) / 14))
    labels = [f"{v:g}" if i % step == 0 else "" for i, v in enumerate(ticks)]
    ax.set_xticks(ticks, labels, rotation=45 if len(ticks) > 5 else 0, fontsize=8)
    ax.set_xticks([], minor=True)
    if positive:
        lo = 0.0 if len(positive) < len(ticks) else min(positive) / 1.6
        ax.set_xlim(lo - (positive[0] * 0.3 if lo == 0 else 0), max(positive) * 1.6)
    ax.set_xlabel(label)


def _k_axis(ax, ks: list[float]) -> None:
    """A k axis with a labelled tick at every grid k: log2 when the grid spans a factor of 4
    or more, else linear."""
    ticks = sorted({float(v) for v in ks if v > 0})
    if not ticks:
        ax.set_xlabel(KNOB_AXES["k"])
        return
    lo, hi = ticks[0], ticks[-1]
    if hi / lo >= 4:
        ax.set_xscale("log", base=2)
        ax.set_xlim(lo / 1.3, hi * 1.3)
    else:
        pad = max(0.5, 0.08 * (hi - lo))
        ax.set_xlim(lo - pad, hi + pad)
    step = max(1, math.ceil(len(ticks) / 14))
    labels = [knob_text("k", v) if i % step == 0 else "" for i, v in enumerate(ticks)]
    ax.set_xticks(ticks, labels, rotation=45 if len(ticks) > 8 else 0, fontsize=8)
    ax.set_xticks([], minor=True)
    ax.set_xlabel(KNOB_AXES["k"])


def _knob_axis(ax, name: str, values: list[float]) -> None:
    """The x axis of a plot against the sweep's knob: L1 or L0 coefficient (log) or k (log2
    or linear)."""
    if name == "k":
        _k_axis(ax, values)
    else:
        _l1_axis(ax, values, KNOB_AXES[name])


def _fit_ylim(ax, values: list[float], min_span: float = 0.05) -> None:
    """A y range around the finite ``values`` with a 10% margin (at least ``min_span`` wide)."""
    vals = [v for v in values if finite(v)]
    if not vals:
        return
    lo, hi = min(vals), max(vals)
    span = max(hi - lo, min_span)
    mid = (lo + hi) / 2
    lo, hi = min(lo, mid - span / 2), max(hi, mid + span / 2)
    ax.set_ylim(lo - 0.1 * span, hi + 0.1 * span)


# ----------------------------------------------------------------------------- frontier


def frontier(rows: list[dict], path: Path) -> Path:
    """FVU (log) against L0 (log): one colour per dict ratio, marker size/shade by the knob
    (L1 or k), Pareto line."""
    fig = frontier_figure(rows)
    if fig is None:
        return placeholder(path, "FVU vs L0", "no finished runs with L0 > 0 yet")
    return _save(fig, path)


def frontier_figure(rows: list[dict]) -> Figure | None:
    """:func:`frontier`'s figure (None: no run to draw): each ratio's runs joined in knob
    order, a line per seed."""
    pts = frontier_candidates(rows)
    if not pts:
        return None
    name = sweep_knob(pts)
    fig, (ax,) = _figure()
    values = sorted({knob_value(r) for r in pts})
    rank = {v: i / (len(values) - 1) if len(values) > 1 else 1.0 for i, v in enumerate(values)}
    by_lr = bool(lr_axis(pts))
    for label, color, style, _, mine in _series(pts):
        mine.sort(key=knob_value)
        for seed in sorted({r.get("seed") or 0 for r in mine}):  # (a line per seed: not a
            line = [r for r in mine if (r.get("seed") or 0) == seed]  # zigzag through them)
            ax.plot([r["l0"] for r in line], [r["fvu"] for r in line], style, color=color,
                    alpha=0.35, lw=1)  # fmt: skip
        _knob_points(ax, mine, color, [rank[knob_value(r)] for r in mine])
        if by_lr:  # (the rates' line styles)
            ax.plot([], [], style, marker="o", color=color, label=label)
        else:
            ax.scatter([], [], color=color, label=label)
    front = pareto([(r["l0"], r["fvu"]) for r in pts])
    ax.plot([p[0] for p in front], [p[1] for p in front], "k--", lw=1.2, label="Pareto frontier")
    _said_of_the_rest(ax, rows, pts)
    if len(pts) <= 40:
        for r in labelled(pts):
            ax.annotate(
                knob_text(name, knob_value(r)) + _lr_text(r),  # type: ignore[arg-type]
                (r["l0"], r["fvu"]),
                fontsize=6,
                xytext=(3, 3),
                textcoords="offset points",
            )
    _frontier_axes(ax)
    label = KNOB_NAMES[name]
    ax.set_title(f"Sparsity vs reconstruction (labels: {label}; larger, darker = larger {label})")
    ax.legend(fontsize=8)
    return fig


def _knob_points(ax, rows: list[dict], color, ranks: list[float]) -> None:
    """One series' runs as one scatter (one artist per run made a sweep of a thousand runs'
    plot the report's slowest: 3.6 s at 1200 runs): larger, darker by the knob's rank in [0, 1]."""
    alphas = [0.45 + 0.55 * q for q in ranks]
    ax.scatter(
        [r["l0"] for r in rows],
        [r["fvu"] for r in rows],
        s=[25 + 80 * q for q in ranks],
        facecolors=[to_rgba(color, a) for a in alphas],
        edgecolors=[to_rgba("k", a) for a in alphas],
        lw=0.4,
    )


def _compared(label: str, rows: list[dict], pts: list[dict]) -> str:
    """A compared sweep's legend entry: how many of its finished ``rows`` are not among the
    drawn ``pts``, or that it has none yet."""
    left = not_drawn(rows, pts)
    if not left:
        return label if pts else f"{label} (no finished runs)"
    none = ", none drawable" if not pts else " not drawn"
    return f"{label} ({left} finished{none}: diverged, L0 or FVU 0)"


def labelled(pts: list[dict]) -> list[dict]:
    """The points that get a label: one per dict ratio, knob value (and learning rate) (its
    lowest seed's; the other seeds' sit close by, and their labels printed over each other)."""
    first: dict[tuple, dict] = {}
    for r in sorted(pts, key=lambda r: r.get("seed") or 0):
        first.setdefault((r["dict_ratio"], knob_value(r), r.get("lr")), r)
    return list(first.values())


def _said_of_the_rest(ax, rows: list[dict], pts: list[dict]) -> None:
    """The line FVU = 1 where a run reaches it (no better than predicting the mean), and a
    legend entry for the finished runs log axes cannot show (diverged, L0 or FVU of 0)."""
    _mean_line(ax, pts)
    left = not_drawn(rows, pts)
    if left:
        ax.plot([], [], " ", label=f"{left} finished run(s) not drawn (diverged, L0 or FVU 0)")


def _mean_line(ax, pts: list[dict]) -> None:
    if any(r["fvu"] >= 1 for r in pts):
        ax.axhline(1.0, color="grey", ls=":", lw=1, label="FVU 1: no better than the mean")


def not_drawn(rows: list[dict], pts: list[dict]) -> int:
    """How many finished runs of ``rows`` are not among the drawn ``pts``."""
    drawn = {r["run_id"] for r in pts}
    return sum(r.get("state") in FINAL_STATES and r.get("run_id") not in drawn for r in rows)


def _frontier_axes(ax) -> None:
    ax.set_xscale("log")
    ax.set_yscale("log")
    for axis in (ax.xaxis, ax.yaxis):  # plain numbers ("6", "0.2"), not 6x10^0: they fit
        axis.set_major_formatter(_PlainLog(labelOnlyBase=False))
        axis.set_minor_formatter(_PlainLog(labelOnlyBase=False))
    ax.set_xlabel("L0 (active features per row)")
    ax.set_ylabel("FVU (fraction of variance unexplained)")
    ax.grid(True, which="both", alpha=0.3)


class _PlainLog(LogFormatter):
    """Matplotlib's choice of which log ticks to label, each written as a plain number."""

    def __call__(self, x: float, pos: int | None = None) -> str:
        return f"{x:g}" if super().__call__(x, pos) else ""


FAMILIES = ("Blues", "Oranges", "Greens", "Purples", "Reds", "Greys", "YlOrBr", "PuRd")
"""One colour family per sweep in :func:`frontier_compare` (shade: dict ratio)."""
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def frontier_compare(sweeps: list[tuple[str, list[dict]]], path: Path) -> Path:
    """FVU against L0 of several sweeps on one axes (``sweeps``: legend label and summary rows
    of each, first sweep first): one colour family and marker per sweep, darker = larger dict
    ratio, each sweep's own Pareto frontier as a line."""
    fig = frontier_compare_figure(sweeps)
    if fig is None:
        return placeholder(path, "FVU vs L0", "no finished runs with L0 > 0 yet")
    return _save(fig, path)


def frontier_compare_figure(sweeps: list[tuple[str, list[dict]]]) -> Figure | None:
    """:func:`frontier_compare`'s figure (None: no sweep has a point to draw). Every sweep gets
    a legend entry, ``(no finished runs)`` appended when it has nothing to draw yet."""
    from matplotlib import colormaps

    candidates = [(label, rows, frontier_candidates(rows)) for label, rows in sweeps]
    drawn = [(_compared(label, rows, pts), pts) for label, rows, pts in candidates]
    if not any(pts for _, pts in drawn):
        return None
    fig, (ax,) = _figure(8.0, 5.6)
    annotate = sum(len(pts) for _, pts in drawn) <= 40
    every = sorted({r["dict_ratio"] for _, pts in drawn for r in pts})  # (one shade per ratio
    shade = {v: 0.45 + 0.45 * j / max(1, len(every) - 1) for j, v in enumerate(every)}  # in all)
    for i, (label, pts) in enumerate(drawn):
        cmap, marker = colormaps[FAMILIES[i % len(FAMILIES)]], MARKERS[i % len(MARKERS)]
        dark = cmap(0.85)
        if not pts:
            ax.scatter([], [], color=dark, marker=marker, label=label)
            continue
        ratios = sorted({r["dict_ratio"] for r in pts})
        name = sweep_knob(pts)
        for ratio in ratios:
            mine = [r for r in pts if r["dict_ratio"] == ratio]
            ax.scatter(
                [r["l0"] for r in mine],
                [r["fvu"] for r in mine],
                s=30,
                marker=marker,
                color=cmap(shade[ratio]),
                edgecolor="k",
                lw=0.4,
                alpha=0.9,
            )
        front = pareto([(r["l0"], r["fvu"]) for r in pts])
        ax.plot([p[0] for p in front], [p[1] for p in front], "-", color=dark, lw=1.4, zorder=1)
        ax.plot([], [], "-", marker=marker, color=dark, lw=1.4, label=label)
        if annotate:
            for r in labelled(pts):
                knob = f"{'k' if name == 'k' else ''}{knob_text(name, knob_value(r))}"  # type: ignore[arg-type]
                knob += _lr_text(r)
                ax.annotate(
                    f"r{r['dict_ratio']:g} {knob}",
                    (r["l0"], r["fvu"]),
                    fontsize=6,
                    color=dark,
                    xytext=(3, 3),
                    textcoords="offset points",
                )
    _mean_line(ax, [r for _, pts in drawn for r in pts])
    _frontier_axes(ax)
    ax.set_title(
        "Sparsity vs reconstruction, by sweep (lines: each sweep's Pareto frontier; "
        f"darker = larger dict ratio, of {', '.join(f'{v:g}' for v in every)})",
        fontsize=9,
    )
    ax.legend(fontsize=8, title="sweep (architecture)", title_fontsize=8)
    return fig


# ----------------------------------------------------------------------------- MMCS


def _run_label(ref: crossdict.RunRef, seeds: bool) -> str:
    rate = "" if ref.lr is None else f" lr{ref.lr:g}"
    return knob_text(ref.knob, ref.value) + rate + (f" s{ref.seed}" if seeds else "")


def _cell_fontsize(n: int) -> float | None:
    """Font size for the numbers in an n x n heatmap; None = too many cells to number."""
    return 11 if n <= 6 else 9 if n <= 10 else 7.5 if n <= 16 else None


def _mmcs_range(cross: CrossDict, ratios: list[float]) -> tuple[float, float]:
    """The colour range: the values between different runs (a run against itself, 1, would
    stretch it over what no pair reaches; it shows as the top colour)."""
    mats = [cross.matrices[r][1] for r in ratios]
    vals = [v for m in mats for i, row in enumerate(m) for j, v in enumerate(row) if i != j]
    vals = [v for v in vals if finite(v)] or [1.0]
    lo, hi = min(vals), max(vals)
    return (lo, hi) if hi - lo > 1e-3 else (hi - 0.05, hi)


def mmcs_heatmap(cross: CrossDict, path: Path, max_ratios: int = 4) -> Path:
    """MMCS between all finished runs of each dict ratio, ordered by seed, then L1 or k (one
    panel per ratio; lines between the seeds' blocks)."""
    fig = mmcs_heatmap_figure(cross, max_ratios)
    if fig is None:
        return placeholder(path, "MMCS between dictionaries", _no_matrix(cross))
    return _save(fig, path)


def _no_matrix(cross: CrossDict) -> str:
    """Why no ratio has a matrix to draw."""
    n = cross.matrix_runs
    if not any(runs > 1 for runs in cross.finished.values()):
        return "needs two finished runs of one dict ratio"
    if n < 2:
        return f"left out: sweep report --matrix-runs {n}"
    return f"above {n} runs a ratio (--matrix-runs) its first seed's: fewer than two finished"


def mmcs_heatmap_figure(cross: CrossDict, max_ratios: int = 4) -> Figure | None:
    """:func:`mmcs_heatmap`'s figure (None: nothing to draw). The colour range is the data's,
    shared by the panels; cells are numbered while the numbers are legible."""
    drawable = [r for r in sorted(cross.matrices) if len(cross.matrices[r][0]) > 1]
    if not drawable:
        return None
    ratios = spread(drawable, max_ratios)
    vmin, vmax = _mmcs_range(cross, ratios)
    biggest = max(len(cross.matrices[r][0]) for r in ratios)
    side = min(9.0, max(5.2, 0.42 * biggest + 2.0))
    ncols = len(ratios) if side * len(ratios) <= 22 else 2
    nrows = math.ceil(len(ratios) / ncols)
    fig = Figure(figsize=(side * ncols, side * 0.92 * nrows), dpi=DPI)
    FigureCanvasAgg(fig)
    for i, ratio in enumerate(ratios):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        refs, mat = _by_seed(*cross.matrices[ratio])
        label = KNOB_NAMES[crossdict.common_knob(r.knob for r in refs)]
        im = ax.imshow(mat, vmin=vmin, vmax=vmax, cmap="viridis")
        seeds = len({r.seed for r in refs}) > 1
        labels = [_run_label(r, seeds) for r in refs]
        for at in (j for j in range(1, len(refs)) if seeds and refs[j].seed != refs[j - 1].seed):
            ax.axhline(at - 0.5, color="w", linewidth=1.2)
            ax.axvline(at - 0.5, color="w", linewidth=1.2)
        size = 8 if len(refs) <= 24 else 6
        ax.set_xticks(range(len(refs)), labels, rotation=90, fontsize=size)
        ax.set_yticks(range(len(refs)), labels, fontsize=size)
        _number_cells(ax, mat, vmin, vmax)
        ax.set_xlabel(f"to run ({label})")
        ax.set_ylabel(f"from run ({label})")
        ax.set_title(f"MMCS, dict ratio {ratio:g}{_thinned(cross, ratio, refs)}")
        fig.colorbar(
            im, ax=ax, fraction=0.046, pad=0.04, label="MMCS (range between different runs)"
        )
    if len(ratios) < len(drawable):
        shown = ", ".join(f"{r:g}" for r in ratios)
        fig.suptitle(
            f"{len(ratios)} of the {len(drawable)} dict ratios ({shown}; mmcs.csv has every ratio)"
        )
    return fig


def _thinned(cross: CrossDict, ratio: float, refs: list[crossdict.RunRef]) -> str:
    """A title's note when the matrix covers fewer runs than finished at ``ratio``."""
    finished = cross.finished.get(ratio, len(refs))
    if finished <= len(refs):
        return ""
    return f"\n(seed {refs[0].seed}: {len(refs)} of the ratio's {finished} runs)"


def _by_seed(
    refs: list[crossdict.RunRef], mat: list[list[float]]
) -> tuple[list[crossdict.RunRef], list[list[float]]]:
    """Runs (and the matrix) ordered by seed, then L1 or k: one block per seed (runs of one
    seed share their initialisation, so their MMCS is high for that reason too)."""

    def key(i: int) -> tuple:
        return refs[i].seed, refs[i].knob, refs[i].value, refs[i].lr or 0

    order = sorted(range(len(refs)), key=key)
    return [refs[i] for i in order], [[mat[i][j] for j in order] for i in order]


def _number_cells(ax, mat: list[list[float]], vmin: float, vmax: float) -> None:
    size = _cell_fontsize(len(mat))
    if size is None:
        return
    for i, row in enumerate(mat):
        for j, v in enumerate(row):
            dark = (v - vmin) / max(vmax - vmin, 1e-9) < 0.55  # viridis: dark below ~mid
            ax.text(
                j,
                i,
                f"{v:.2f}",
                ha="center",
                va="center",
                fontsize=size,
                color="w" if dark else "k",
            )


def mmcs_next_vs_l1(rows: list[dict], path: Path) -> Path:
    """MMCS from each run to its partner at the next larger dict ratio, against the knob
    (L1 or k)."""
    pts = with_knob(rows, "mmcs_next_ratio", "dict_ratio")
    if not pts:
        return placeholder(
            path, "MMCS to the next dict ratio", "needs finished runs at two dict ratios"
        )
    name = sweep_knob(rows)
    fig, (ax,) = _figure()
    for label, color, style, _, mine in _series(pts):
        values = sorted({knob_value(r) for r in mine})
        mean = [_mean([r["mmcs_next_ratio"] for r in mine if knob_value(r) == v]) for v in values]
        ax.plot(values, mean, style, marker="o", color=color, label=f"{label} → next")
        ax.scatter(
            [knob_value(r) for r in mine],
            [r["mmcs_next_ratio"] for r in mine],
            color=color,
            s=10,
            alpha=0.5,
        )
    _knob_axis(ax, name, _grid_values(rows))
    _fit_ylim(ax, [r["mmcs_next_ratio"] for r in pts])
    ax.set_ylabel(f"MMCS to the same {KNOB_NAMES[name]}/seed at the next larger ratio")
    ax.set_title("Features that reappear in a larger dictionary (dots: seeds)")
    ax.legend(fontsize=8)
    ax.grid(True, alpha=0.3)
    return _save(fig, path)


def _grid_values(rows: list[dict]) -> list[float]:
    """Every finite knob value of the sweep's runs (finished or not): the axis ticks."""
    return [v for v in (knob_value(r) for r in rows) if finite(v)]  # type: ignore[misc]


# ----------------------------------------------------------------------------- features


def dead_vs_l1(rows: list[dict], path: Path) -> Path:
    """Dead (solid) and dense (dashed) feature fractions against the knob (L1 or k), one
    colour per ratio."""
    fig = dead_vs_l1_figure(rows)
    if fig is None:
        label = KNOB_NAMES[sweep_knob(rows)]
        return placeholder(path, f"Dead features vs {label}", "no finished runs yet")
    return _save(fig, path)


def dead_vs_l1_figure(rows: list[dict]) -> Figure | None:
    """:func:`dead_vs_l1`'s figure (None: nothing to draw): a tick at every grid L1 on a log
    axis (every k: log2 or linear), the y range fitted to the values drawn."""
    pts = with_knob(rows, "dead_fraction")
    if not pts:
        return None
    name = sweep_knob(rows)
    fig, (ax,) = _figure()
    shown: list[float] = []
    for label, _, _, color, mine in _series(pts):  # (tinted by learning rate)
        values = sorted({knob_value(r) for r in mine})
        for key, style in (("dead_fraction", "o-"), ("dense_fraction", "s--")):
            mean = [_mean([r.get(key) for r in mine if knob_value(r) == v]) for v in values]
            if not any(finite(m) for m in mean):
                continue
            kind = key.split("_")[0]
            ax.plot(
                values,
                mean,
                style,
                color=color,
                ms=4 if kind == "dead" else 3,
                alpha=1.0 if kind == "dead" else 0.6,
                label=f"{label} {kind}",
            )
            each = [r for r in mine if finite(r.get(key))]
            ax.scatter(
                [knob_value(r) for r in each], [r[key] for r in each], color=color, s=10, alpha=0.4
            )
            shown += [r[key] for r in each]
    _knob_axis(ax, name, _grid_values(rows))
    _fit_ylim(ax, shown)
    ax.set_ylabel("fraction of features")
    ax.set_title("Dead (never fire on eval rows) and dense (fire > 10%) features")
    ax.legend(fontsize=7)
    ax.grid(True, alpha=0.3)
    return fig


# ----------------------------------------------------------------------------- learning rate

LR_PANELS = (("fvu", "FVU (held-out rows)"), ("dead_fraction", "fraction of latents dead"))


def lr_sweep(rows: list[dict], path: Path) -> Path:
    """FVU and dead fraction against the learning rate, for a grid with an lr axis
    (``grid.lr``): a line per dict ratio and knob value (mean over seeds; dots: each run),
    colour = dict ratio, lighter = smaller L1 (or k)."""
    fig = lr_sweep_figure(rows)
    if fig is None:
        return placeholder(path, "FVU vs learning rate", "no finished runs yet")
    return _save(fig, path)


def lr_sweep_figure(rows: list[dict]) -> Figure | None:
    """:func:`lr_sweep`'s figure (None: nothing to draw)."""
    pts = [r for r in with_knob(rows, "fvu") if r["fvu"] > 0 and finite(r.get("lr"))]
    if not pts:
        return None
    name, (fig, axes) = sweep_knob(pts), _figure(12.0, 4.6, ncols=2)
    colors = _ratio_colors(list({r["dict_ratio"] for r in pts}))
    light = _l1_lightness([knob_value(r) for r in pts])
    for ratio, value in sorted({(r["dict_ratio"], knob_value(r)) for r in pts}):
        mine = [r for r in pts if r["dict_ratio"] == ratio and knob_value(r) == value]
        color = _lighten(colors[ratio], light.get(value, 0.0))  # type: ignore[arg-type]
        label = f"r{ratio:g} {KNOB_NAMES[name]} {knob_text(name, value)}"  # type: ignore[arg-type]
        lrs = lr_axis(mine)
        for ax, (key, _) in zip(axes, LR_PANELS, strict=True):
            ys = [_mean([r.get(key) for r in mine if r["lr"] == lr]) for lr in lrs]
            ax.plot(lrs, ys, "o-", color=color, ms=4, lw=1.2, label=label)
            each = [r for r in mine if finite(r.get(key))]
            ax.scatter([r["lr"] for r in each], [r[key] for r in each], color=color, s=8, alpha=0.4)
    ticks = lr_axis(pts)
    for ax, (_, title) in zip(axes, LR_PANELS, strict=True):
        ax.set_xscale("log")
        ax.set_xticks(ticks, [f"{v:g}" for v in ticks], fontsize=8)
        ax.xaxis.set_minor_formatter(NullFormatter())  # (the grid's rates only)
        ax.set_xlabel("learning rate (grid.lr)")
        ax.set_ylabel(title)
        ax.grid(True, which="major", alpha=0.3)
    axes[0].set_yscale("log")
    axes[0].yaxis.set_major_formatter(_PlainLog(labelOnlyBase=False))
    axes[0].yaxis.set_minor_formatter(_PlainLog(labelOnlyBase=False))
    axes[0].legend(fontsize=7, ncol=2 if len(axes[0].lines) > 8 else 1)
    fig.suptitle("Learning rate: reconstruction and dead latents (one line per grid point)")
    return fig


def density(
    sweep_dir: Path, rows: list[dict], path: Path, max_ratios: int = 3, max_l1: int = 4
) -> Path:
    """Histograms of log10 feature firing frequency for a few runs (one panel per dict ratio)."""
    have = [r for r in with_knob(rows) if r.get("seed", 0) == 0]
    data = {r["run_id"]: crossdict.load_density(RunFolder.of(sweep_dir, r["run_id"])) for r in have}
    have = [r for r in have if data.get(r["run_id"]) is not None]
    if not have:
        return placeholder(path, "Feature density", "no finished runs with density data yet")
    ratios = spread(sorted({r["dict_ratio"] for r in have}), max_ratios)
    fig, axes = _figure(5.0 * len(ratios), 4.0, ncols=len(ratios))
    for ax, ratio in zip(axes, ratios, strict=True):
        mine = spread(sorted((r for r in have if r["dict_ratio"] == ratio), key=knob_value), max_l1)
        for r in mine:
            d = data[r["run_id"]]
            edges, counts = d["log10_hist_edges"].tolist(), d["log10_hist_counts"].tolist()  # type: ignore[index]
            dead = int(d["dead_count"][0])  # type: ignore[index]
            name, value = crossdict.knob(r)
            ax.stairs(
                counts,
                edges,
                label=f"{KNOB_NAMES[name]} {knob_text(name, value)}{_lr_text(r)} ({dead} dead)",
            )  # type: ignore[arg-type]
        rows_eval = [r["eval_rows"] for r in mine if finite(r.get("eval_rows"))]
        if rows_eval:  # nothing can fire less often than once in the eval rows
            ax.set_xlim(max(-8.0, -math.log10(max(rows_eval)) - 0.3), 0.1)
        ax.set_xlabel("log10 firing frequency (eval rows)")
        ax.set_ylabel("features")
        of = sum(r["dict_ratio"] == ratio for r in have)
        ax.set_title(f"dict ratio {ratio:g} (seed 0: {len(mine)} of {of} runs)")
        ax.legend(fontsize=7)
    return _save(fig, path)


# ----------------------------------------------------------------------------- training curves

CURVE_PANELS = (
    ("loss", "training loss (MSE + L1 penalty)"),
    ("fvu", "FVU on training batches"),
    ("l0", "L0 on training batches"),
)


def _lighten(color: object, amount: float) -> tuple[float, float, float]:
    from matplotlib.colors import to_rgb

    return tuple(c + (1.0 - c) * amount for c in to_rgb(color))  # type: ignore[return-value, arg-type]


def _l1_lightness(l1s: list) -> dict[float, float]:
    """How much to lighten each knob value's (L1 or k) colour: 0.6 for the smallest, 0 for
    the largest."""
    vals = sorted({v for v in l1s if finite(v)})
    return {v: 0.6 * (1 - i / max(1, len(vals) - 1)) for i, v in enumerate(vals)}


def _curve_xy(curve: list[dict], key: str) -> tuple[list[float], list[float]]:
    pts = [(c["rows"], c[key]) for c in curve if finite(c.get("rows")) and finite(c.get(key))]
    pts = [(x, y) for x, y in pts if y > 0]  # log axes
    return [p[0] for p in pts], [p[1] for p in pts]


def training_curves(runs: list[tuple[dict, list[dict]]], path: Path) -> Path:
    """Loss, FVU and L0 against training rows: one line per run (``runs``: summary row and its
    ``metrics.jsonl`` records), coloured by dict ratio, lighter for smaller L1 (or k), dotted
    while the run is not finished (with an lr axis: a line style per learning rate, and fainter
    while not finished). Thinner, fainter lines when there are many runs."""
    runs = [(r, c) for r, c in runs if c and finite(r.get("dict_ratio"))]
    if not runs:
        return placeholder(path, "Training curves", "no training-curve records yet")
    name = sweep_knob(r for r, _ in runs)
    fig, axes = _figure(15.0, 4.4, ncols=3)
    colors = _ratio_colors(list({r["dict_ratio"] for r, _ in runs}))
    light = _l1_lightness([knob_value(r) for r, _ in runs])
    many = len(runs) > 12
    width, alpha = (0.8, max(0.3, 3 / math.sqrt(len(runs)))) if many else (1.4, 0.95)
    lrs = lr_axis([r for r, _ in runs])
    for row, curve in runs:
        color = _lighten(colors[row["dict_ratio"]], light.get(knob_value(row), 0.0))  # type: ignore[arg-type]
        done = row.get("state") == "done"
        if lrs:  # (a style per rate; an unfinished run fainter instead of dotted)
            style, fade = LR_STYLES[lrs.index(row["lr"]) % len(LR_STYLES)], 1.0 if done else 0.5
        else:
            style, fade = "-" if done else ":", 1.0
        for ax, (key, _) in zip(axes, CURVE_PANELS, strict=True):
            xs, ys = _curve_xy(curve, key)
            if xs:  # (one record, e.g. a run shorter than log_every: a dot, not nothing)
                marker = "o" if len(xs) == 1 else None
                ax.plot(
                    xs, ys, style, color=color, lw=width, alpha=alpha * fade, marker=marker, ms=4
                )
    nested = any(_nested(row) for row, _ in runs)
    for ax, (key, title) in zip(axes, CURVE_PANELS, strict=True):
        if key == "loss" and name == "k":
            mse = "mean of the levels' MSEs" if nested else "MSE"
            title = f"training loss ({mse}, + AuxK when on)"
        elif key == "loss" and name == "l0":
            title = "training loss (MSE + L0 penalty)"
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(_PlainLog(labelOnlyBase=False))  # "0.6", as the frontier's
        ax.yaxis.set_minor_formatter(_PlainLog(labelOnlyBase=False))  # (not 6x10^-1)
        ax.set_xlabel("training rows")
        ax.xaxis.set_major_formatter(EngFormatter(sep=""))
        ax.set_title(title, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
    for ratio, color in colors.items():
        axes[0].plot([], [], color=color, label=f"ratio {ratio:g}")
    for i, lr in enumerate(lrs):
        axes[0].plot([], [], LR_STYLES[i % len(LR_STYLES)], color="0.3", label=f"lr {lr:g}")
    axes[0].legend(fontsize=8, title=f"lighter = smaller {KNOB_NAMES[name]}", title_fontsize=7)
    return _save(fig, path)


# ----------------------------------------------------------------------------- language model

LM_TITLES = {
    "loss_recovered": "loss recovered (1 = splicing the SAE in costs nothing)",
    "ce_loss_spliced": "next-token CE with the SAE spliced in (nats)",
    "kl_div_with_sae": "KL(clean || SAE spliced in), nats per token",
    "kl_div_score": "KL-divergence score (SAEBench; 1 = outputs unchanged)",
}


def _lm_panels(rows: list[dict]) -> list[str]:
    """The language-model metrics some of ``rows`` have (of :data:`LM_TITLES`)."""
    return [k for k in LM_TITLES if any(finite(r.get(k)) for r in rows)]


def lm_vs_l0(rows: list[dict], path: Path) -> Path:
    """Loss recovered, spliced CE (and any KL) against L0, one colour per dict ratio; runs whose
    ablation gap is below :data:`MIN_ABLATION_GAP` are grey crosses, left off the lines."""
    pts = [r for r in finished(rows, "l0", "dict_ratio") if r["l0"] > 0]
    keys = _lm_panels(pts)
    if not keys:
        return placeholder(
            path, "Language-model metrics vs L0", "no runs with language-model metrics"
        )
    fig, axes = _figure(5.6 * len(keys), 4.4, ncols=len(keys))
    for ax, key in zip(axes, keys, strict=True):
        for label, color, style, _, series in _series(pts):
            mine = [r for r in series if finite(r.get(key))]
            if key == "loss_recovered":
                mine = [r for r in mine if not weak_loss_recovered(r)]
            mine.sort(key=lambda r: r["l0"])
            if mine:
                ax.plot(
                    [r["l0"] for r in mine],
                    [r[key] for r in mine],
                    style,
                    marker="o",
                    color=color,
                    ms=4,
                    label=label,
                )
        if key == "loss_recovered":
            _mark_weak(ax, pts)
        if key == "ce_loss_spliced":
            _ce_references(ax, pts)
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(_PlainLog(labelOnlyBase=False))  # "20", not 2x10^1:
        ax.xaxis.set_minor_formatter(_PlainLog(labelOnlyBase=False))  # they do not overlap
        ax.set_xlabel("L0 (active features per row)")
        ax.set_title(LM_TITLES[key], fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, path)


def _mark_weak(ax, pts: list[dict]) -> None:
    ax.axhline(1.0, color="0.4", ls=":", lw=1)
    weak = [r for r in pts if weak_loss_recovered(r) and finite(r.get("loss_recovered"))]
    if weak:
        ax.scatter(
            [r["l0"] for r in weak],
            [r["loss_recovered"] for r in weak],
            marker="x",
            color="0.55",
            label=f"ablation gap < {MIN_ABLATION_GAP:g} nats: not meaningful",
        )


def _ce_references(ax, pts: list[dict]) -> None:
    clean = _mean([r.get("ce_loss_clean") for r in pts])
    ablated = _mean([r.get("ce_loss_ablated") for r in pts])
    if finite(clean):
        ax.axhline(clean, color="k", ls="--", lw=1, label=f"clean model {clean:.3g}")
    if finite(ablated):
        ax.plot([], [], " ", label=f"hook zero-ablated {ablated:.3g}")


def has_levels(rows: list[dict]) -> bool:
    """Whether some run reports nested levels' FVU (a Matryoshka's ``fvu_level_<i>``)."""
    return any(finite(r.get("fvu_level_1")) for r in rows)


def nested_levels(rows: list[dict], path: Path) -> Path:
    """A Matryoshka sweep's FVU at each nested level, the whole dictionary last: one line per
    finished run, coloured by dict ratio, lighter for smaller k."""
    fig = nested_levels_figure(rows)
    if fig is None:
        return placeholder(path, "FVU of the nested levels", "no finished runs yet")
    return _save(fig, path)


def nested_levels_figure(rows: list[dict]) -> Figure | None:
    """:func:`nested_levels`'s figure (None: nothing to draw)."""
    pts = [r for r in with_knob(rows, "fvu", "fvu_level_1") if r["fvu"] > 0]
    if not pts:
        return None
    name, fig, (ax,) = sweep_knob(pts), *_figure()
    colors = _ratio_colors(list({r["dict_ratio"] for r in pts}))
    light = _l1_lightness([knob_value(r) for r in pts])
    n = 0
    for r in pts:
        fvus = [r[f"fvu_level_{i}"] for i in range(1, _levels_of(r) + 1)] + [r["fvu"]]
        n = max(n, len(fvus))
        color = _lighten(colors[r["dict_ratio"]], light.get(knob_value(r), 0.0))
        label = f"r{r['dict_ratio']:g} {KNOB_NAMES[name]} {knob_text(name, knob_value(r))}"
        label += _lr_text(r)
        ax.plot(range(1, len(fvus) + 1), fvus, "o-", color=color, ms=3, lw=1.2, label=label)
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(_PlainLog(labelOnlyBase=False))
    ax.yaxis.set_minor_formatter(_PlainLog(labelOnlyBase=False))
    ax.set_xticks(range(1, n + 1), [*(str(i) for i in range(1, n)), "whole"])
    ax.set_xlabel("nested level (its first latents alone; cfg.json: matryoshka_widths)")
    ax.set_ylabel("FVU (held-out rows)")
    ax.set_title("Matryoshka: FVU of each nested dictionary")
    ax.legend(fontsize=7, ncol=2 if len(pts) > 8 else 1)
    ax.grid(True, alpha=0.3)
    return fig


def _levels_of(row: dict) -> int:
    """How many inner levels' FVU the row has (``fvu_level_1`` ... ``fvu_level_<n>``)."""
    n = 0
    while finite(row.get(f"fvu_level_{n + 1}")):
        n += 1
    return n


def _nested(row: dict) -> bool:
    """Whether the run's architecture trains nested levels (Matryoshka: its loss is their
    MSEs' mean, not the MSE)."""
    arch = archs.REGISTRY.get(str(row.get("arch")))
    return arch is not None and arch.nested
