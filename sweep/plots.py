"""Report plots, drawn with matplotlib's Agg canvas (no pyplot: no global backend change).

Every function takes summary rows (dicts from :mod:`sweep.report`) and a PNG path, draws
only finished runs with finite values, and draws a labelled placeholder when there is
nothing to show yet (a running sweep), so the report always has every image.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from sweep import crossdict, rundir
from sweep.crossdict import CrossDict, finite

log = logging.getLogger(__name__)

DPI = 110


def _figure(w: float = 7.0, h: float = 5.0, ncols: int = 1) -> tuple[Figure, list]:
    fig = Figure(figsize=(w, h), dpi=DPI)
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]
    return fig, axes


def _save(fig: Figure, path: Path) -> Path:
    fig.tight_layout()
    rundir.atomic_write(path, lambda f: fig.savefig(f, format="png"))
    return path


def placeholder(path: Path, title: str, text: str) -> Path:
    fig, (ax,) = _figure(6, 3)
    ax.set_axis_off()
    ax.set_title(title)
    ax.text(
        0.5, 0.5, text, ha="center", va="center", fontsize=12, color="0.3", transform=ax.transAxes
    )
    return _save(fig, path)


def _finished(rows: list[dict], *keys: str) -> list[dict]:
    return [r for r in rows if r.get("state") == "done" and all(finite(r.get(k)) for k in keys)]


def _ratio_colors(ratios: list[float]) -> dict[float, object]:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return {r: cmap(i % 10) for i, r in enumerate(sorted(ratios))}


def pareto(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points (l0, fvu) not dominated by any other (lower or equal l0 and lower fvu), by l0."""
    front: list[tuple[float, float]] = []
    for x, y in sorted(points, key=lambda p: (p[0], p[1])):
        if not front or y < front[-1][1]:
            front.append((x, y))
    return front


def frontier(rows: list[dict], path: Path) -> Path:
    """FVU (log) against L0 (log): one colour per dict ratio, marker size/shade by L1, Pareto line."""
    pts = [r for r in _finished(rows, "l0", "fvu", "l1") if r["l0"] > 0 and r["fvu"] > 0]
    if not pts:
        return placeholder(path, "FVU vs L0", "no finished runs with L0 > 0 yet")
    fig, (ax,) = _figure()
    colors = _ratio_colors(list({r["dict_ratio"] for r in pts}))
    l1s = sorted({r["l1"] for r in pts})
    rank = {v: i / max(1, len(l1s) - 1) for i, v in enumerate(l1s)}
    for ratio, color in colors.items():
        mine = sorted((r for r in pts if r["dict_ratio"] == ratio), key=lambda r: r["l1"])
        ax.plot(
            [r["l0"] for r in mine], [r["fvu"] for r in mine], "-", color=color, alpha=0.35, lw=1
        )
        for r in mine:
            ax.scatter(
                r["l0"],
                r["fvu"],
                s=25 + 80 * rank[r["l1"]],
                color=color,
                alpha=0.45 + 0.55 * rank[r["l1"]],
                edgecolor="k",
                lw=0.4,
            )
        ax.scatter([], [], color=color, label=f"ratio {ratio:g}")
    front = pareto([(r["l0"], r["fvu"]) for r in pts])
    ax.plot([p[0] for p in front], [p[1] for p in front], "k--", lw=1.2, label="Pareto frontier")
    if len(pts) <= 40:
        for r in pts:
            ax.annotate(
                f"{r['l1']:.2g}",
                (r["l0"], r["fvu"]),
                fontsize=6,
                xytext=(3, 3),
                textcoords="offset points",
            )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("L0 (active features per row)")
    ax.set_ylabel("FVU (fraction of variance unexplained)")
    ax.set_title("Sparsity vs reconstruction (labels: L1; larger, darker = larger L1)")
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    return _save(fig, path)


def _run_label(ref: crossdict.RunRef, seeds: bool) -> str:
    return f"{ref.l1:.2g}" + (f" s{ref.seed}" if seeds else "")


def mmcs_heatmap(cross: CrossDict, path: Path, max_ratios: int = 4) -> Path:
    """MMCS between all finished runs of each dict ratio, ordered by L1 (one panel per ratio)."""
    ratios = [r for r in sorted(cross.matrices) if len(cross.matrices[r][0]) > 1]
    if not ratios:
        return placeholder(
            path, "MMCS between dictionaries", "needs two finished runs of one dict ratio"
        )
    ratios = _spread(ratios, max_ratios)
    fig, axes = _figure(5.2 * len(ratios), 4.8, ncols=len(ratios))
    for ax, ratio in zip(axes, ratios, strict=True):
        refs, mat = cross.matrices[ratio]
        seeds = len({r.seed for r in refs}) > 1
        im = ax.imshow(mat, vmin=0, vmax=1, cmap="viridis")
        labels = [_run_label(r, seeds) for r in refs]
        ax.set_xticks(range(len(refs)), labels, rotation=90, fontsize=7)
        ax.set_yticks(range(len(refs)), labels, fontsize=7)
        if len(refs) <= 12:
            for i, row in enumerate(mat):
                for j, v in enumerate(row):
                    ax.text(
                        j,
                        i,
                        f"{v:.2f}",
                        ha="center",
                        va="center",
                        fontsize=6,
                        color="w" if v < 0.6 else "k",
                    )
        ax.set_xlabel("to run (L1)")
        ax.set_ylabel("from run (L1)")
        ax.set_title(f"MMCS, dict ratio {ratio:g}")
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    return _save(fig, path)


def _spread(items: list, n: int) -> list:
    """At most ``n`` items, evenly spread and including the ends."""
    if len(items) <= n:
        return list(items)
    idx = sorted({round(i * (len(items) - 1) / (n - 1)) for i in range(n)})
    return [items[i] for i in idx]


def dead_vs_l1(rows: list[dict], path: Path) -> Path:
    """Dead (solid) and dense (dashed) feature fractions against L1, one colour per ratio."""
    pts = _finished(rows, "l1", "dead_fraction")
    if not pts:
        return placeholder(path, "Dead features vs L1", "no finished runs yet")
    fig, (ax,) = _figure()
    colors = _ratio_colors(list({r["dict_ratio"] for r in pts}))
    for ratio, color in colors.items():
        mine = [r for r in pts if r["dict_ratio"] == ratio]
        l1s = sorted({r["l1"] for r in mine})
        mean = [_mean([r["dead_fraction"] for r in mine if r["l1"] == v]) for v in l1s]
        ax.plot(l1s, mean, "o-", color=color, label=f"ratio {ratio:g} dead")
        ax.scatter(
            [r["l1"] for r in mine],
            [r["dead_fraction"] for r in mine],
            color=color,
            s=10,
            alpha=0.5,
        )
        dense = [
            _mean(
                [
                    r.get("dense_fraction")
                    for r in mine
                    if r["l1"] == v and finite(r.get("dense_fraction"))
                ]
            )
            for v in l1s
        ]
        if any(finite(d) for d in dense):
            ax.plot(l1s, dense, "s--", color=color, alpha=0.6, ms=3, label=f"ratio {ratio:g} dense")
    positive = [r["l1"] for r in pts if r["l1"] > 0]
    ax.set_xscale("symlog", linthresh=min(positive) if positive else 1e-4)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("L1 coefficient")
    ax.set_ylabel("fraction of features")
    ax.set_title("Dead (never fire on eval rows) and dense (fire > 10%) features")
    ax.legend(fontsize=7)
    ax.grid(True, alpha=0.3)
    return _save(fig, path)


def _mean(values: list) -> float:
    vals = [v for v in values if finite(v)]
    return sum(vals) / len(vals) if vals else math.nan


def density(
    sweep_dir: Path, rows: list[dict], path: Path, max_ratios: int = 3, max_l1: int = 4
) -> Path:
    """Histograms of log10 feature firing frequency for a few runs (one panel per dict ratio)."""
    have = [r for r in _finished(rows, "l1") if r.get("seed", 0) == 0]
    data = {
        r["run_id"]: crossdict.load_density(rundir.run_dir(sweep_dir, r["run_id"])) for r in have
    }
    have = [r for r in have if data.get(r["run_id"]) is not None]
    if not have:
        return placeholder(path, "Feature density", "no finished runs with density data yet")
    ratios = _spread(sorted({r["dict_ratio"] for r in have}), max_ratios)
    fig, axes = _figure(5.0 * len(ratios), 4.0, ncols=len(ratios))
    for ax, ratio in zip(axes, ratios, strict=True):
        mine = _spread(
            sorted((r for r in have if r["dict_ratio"] == ratio), key=lambda r: r["l1"]), max_l1
        )
        for r in mine:
            d = data[r["run_id"]]
            edges, counts = d["log10_hist_edges"].tolist(), d["log10_hist_counts"].tolist()  # type: ignore[index]
            dead = int(d["dead_count"][0])  # type: ignore[index]
            ax.stairs(counts, edges, label=f"L1 {r['l1']:.2g} ({dead} dead)")
        rows_eval = [r["eval_rows"] for r in mine if finite(r.get("eval_rows"))]
        if rows_eval:  # nothing can fire less often than once in the eval rows
            ax.set_xlim(max(-8.0, -math.log10(max(rows_eval)) - 0.3), 0.1)
        ax.set_xlabel("log10 firing frequency (eval rows)")
        ax.set_ylabel("features")
        ax.set_title(f"dict ratio {ratio:g}")
        ax.legend(fontsize=7)
    return _save(fig, path)
