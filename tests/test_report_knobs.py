"""`sweep report` on TopK-style sweeps (the grid varies k, not L1) and on several sweeps at once
(``sweep report A B``: one frontier plot with every sweep)."""

from __future__ import annotations

import csv
import itertools
import json
import logging
import math
import re
import shutil
from pathlib import Path

import pytest
import torch
from matplotlib import image as mpimg

import sweep
from sweep import crossdict, grid, metrics, plots, rundir
from sweep.cli import main
from sweep.io import read_json
from sweep.report import build_report, sweep_labels
from sweep.status import status_rows
from sweep.sweepdir import SweepFolder
from sweep.worker import EnsembleJob, train_ensemble
from tests.conftest import tiny_train
from tests.sweep_builder import build_sweep, write_manifest
from tests.test_report import PNGS

KS = (2, 4)
RATIOS = (1.0, 2.0)


def build_topk(store, sweep_dir: Path, arch: str = "topk") -> Path:
    """A finished 2 k x 2 ratios x 2 seeds TopK sweep (8 runs), trained without Ray."""
    runs = grid.expand(list(KS), list(RATIOS), 2, store.width, arch, knob="k")
    sweep_dir.mkdir(parents=True)
    write_manifest(sweep_dir, runs, store)
    for e in grid.group(runs, dict.fromkeys(RATIOS, 16)):
        job = EnsembleJob(e, str(sweep_dir), str(store.path), True, 2048, tiny_train(), threads=1)
        train_ensemble(job)
    return sweep_dir


@pytest.fixture(scope="module")
def built(tiny_store, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("knobs")
    return {
        "topk": build_topk(tiny_store, root / "rep_topk"),
        "l1": build_sweep(tiny_store, root / "rep_l1", l1s=(1e-2, 1e-1), seeds=1),
    }


@pytest.fixture
def sweeps(built, tmp_path) -> dict[str, Path]:
    """Fresh copies (a report writes into its sweep)."""
    out = {}
    for name, src in built.items():
        out[name] = tmp_path / src.name
        shutil.copytree(src, out[name])
    return out


def read_csv(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def assert_png(path) -> None:
    img = mpimg.imread(str(path))
    assert img.shape[0] >= 200 and img.shape[1] >= 300, img.shape
    assert float(img[..., :3].std()) > 0.02, f"{path.name} looks blank"


def section(page: str, name: str) -> str:
    start = page.index(f'<section id="{name}"')
    return page[start : page.index("</section>", start)]


# ----------------------------------------------------------------------------- the knob


def test_knob_of_rows_and_specs():
    assert crossdict.knob({"l1": 0.01, "k": None}) == ("l1", 0.01)  # an L1 summary row
    assert crossdict.knob({"l1": 0.01, "k": 0}) == ("l1", 0.01)  # an L1 spec (k unused)
    assert crossdict.knob({"l1": 0.01}) == ("l1", 0.01)  # a spec from before TopK existed
    assert crossdict.knob({"l1": 0.0, "k": 8}) == ("k", 8)  # a TopK spec
    assert crossdict.knob({"l1": None, "k": 8}) == ("k", 8)  # a TopK summary row
    assert crossdict.knob({"run_id": "x"}) == ("l1", None)  # no spec yet
    assert crossdict.sweep_knob([{"l1": None, "k": 4}, {"run_id": "pending"}]) == "k"
    assert crossdict.sweep_knob([{"l1": 0.1}]) == "l1"
    assert crossdict.knob_text("k", 16.0) == "16" and crossdict.knob_text("l1", 0.0123) == "0.0123"
    assert crossdict.knob_text("l1", 0.001) != crossdict.knob_text("l1", 0.0010001)  # as written
    assert (
        crossdict.knob_text("l1", 3e-4) == "0.0003" and crossdict.knob_text("l1", 1e-8) == "1e-08"
    )
    assert crossdict.knob_text("l1", 10**-2.5) == "0.0032"  # (a logspace value: 2 digits)


def test_k_axis_is_log2_when_the_grid_spans_a_factor_of_four():
    def rows(ks):
        return [
            {"run_id": f"r{k}", "state": "done", "k": k, "l1": None, "dict_ratio": 4.0,
             "dead_fraction": 0.01 * i}
            for i, k in enumerate(ks)
        ]  # fmt: skip

    ax = plots.dead_vs_l1_figure(rows([8, 16, 32, 64, 128])).axes[0]
    assert ax.get_xscale() == "log" and ax.xaxis.get_transform().base == 2
    assert list(ax.get_xticks()) == [8, 16, 32, 64, 128]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["8", "16", "32", "64", "128"]
    assert ax.get_xlabel().startswith("k ")
    ax = plots.dead_vs_l1_figure(rows([4, 8])).axes[0]
    assert ax.get_xscale() == "linear" and list(ax.get_xticks()) == [4, 8]


# ----------------------------------------------------------------------------- a TopK sweep


def test_topk_sweep_report(sweeps, capsys):
    topk = sweeps["topk"]
    assert main(["report", str(topk), "--no-wandb"]) == 0
    out = capsys.readouterr().out
    report = topk / "report"
    ids = [f"r{r:g}-k{k}-s{s}" for r in RATIOS for k in KS for s in (0, 1)]
    assert all(rid in out for rid in ids)
    for name in PNGS:
        assert_png(report / name)
    rows = {r["run_id"]: r for r in read_csv(report / "summary.csv")}
    assert sorted(rows) == sorted(ids) and {r["state"] for r in rows.values()} == {"done"}
    assert {r["k"] for r in rows.values()} == {"2", "4"} and {r["l1"] for r in rows.values()} == {
        ""
    }
    for k in KS:  # MMCS pairs by (k, seed): across ratios and across seeds
        for s in (0, 1):
            assert rows[f"r1-k{k}-s{s}"]["mmcs_next_ratio_run"] == f"r2-k{k}-s{s}"
    with open(report / "mmcs.csv", newline="") as f:
        table = list(csv.reader(f))
    cell = {(row[0], table[0][j + 1]): v for row in table[1:] for j, v in enumerate(row[1:])}
    for rid, r in rows.items():
        partner = rid[:-1] + ("1" if rid.endswith("0") else "0")  # the other seed, same k
        assert float(r["mmcs_seeds"]) == pytest.approx(float(cell[(rid, partner)]), abs=1e-6)
    a = crossdict.unit_atoms(rundir.run_dir(topk, "r1-k4-s0"), torch.device("cpu"))
    b = crossdict.unit_atoms(rundir.run_dir(topk, "r2-k4-s0"), torch.device("cpu"))
    m = read_json(rundir.run_dir(topk, "r1-k4-s0") / rundir.METRICS)
    assert m["mmcs_next_ratio"] == pytest.approx(float(metrics.mmcs(a, b).mean()), abs=1e-5)
    page = (report / "index.html").read_text()
    assert all(rid in page for rid in ids) and all(name in page for name in PNGS)
    assert "k</b> 2, 4" in section(page, "settings")  # grid from the run specs
    assert 'data-col="k"' in section(page, "best") and 'data-col="l1"' not in page
    assert "<dt>k</dt>" in page and "the same k and seed" in page
    assert "against k." in page and "labels are k" in page


def test_topk_heatmap_and_crossdict_order_by_k(built):
    cross = crossdict.compute(SweepFolder(built["topk"]).read_runs(), torch.device("cpu"))
    refs, _ = cross.matrices[1.0]
    assert [r.run_id for r in refs] == ["r1-k2-s0", "r1-k2-s1", "r1-k4-s0", "r1-k4-s1"]
    assert {r.knob for r in refs} == {"k"}
    ax = plots.mmcs_heatmap_figure(cross).axes[0]
    # the heatmap: one block per seed (runs of a seed share their initialisation)
    assert [t.get_text() for t in ax.get_yticklabels()] == ["2 s0", "4 s0", "2 s1", "4 s1"]
    assert ax.get_xlabel() == "to run (k)"


def test_status_and_api_on_a_topk_sweep(built):
    states = {r["run_id"]: r["state"] for r in status_rows(built["topk"])}
    assert len(states) == 8 and set(states.values()) == {"done"}
    table = sweep.load_sweep(built["topk"]).table
    assert "k" in table.columns and "l1" not in table.columns
    assert table.loc["r2-k4-s1", "k"] == 4 and table.loc["r2-k4-s1", "dict_ratio"] == 2.0
    table = sweep.load_sweep(built["l1"]).table  # an L1 sweep's table is as it was
    assert "l1" in table.columns and "k" not in table.columns


# ----------------------------------------------------------------------------- several sweeps


def test_report_of_two_sweeps(sweeps, tmp_path, capsys):
    topk, l1 = sweeps["topk"], sweeps["l1"]
    before = {p.name: (p / rundir.METRICS).read_bytes() for p in (l1 / "runs").iterdir()}
    out = tmp_path / "compare"
    assert main(["report", str(topk), str(l1), "--out", str(out), "--no-wandb"]) == 0
    assert f"frontier of 2 sweeps: {out / 'frontier.png'}" in capsys.readouterr().out
    for name in PNGS:  # the first sweep's report, with the comparison frontier
        assert_png(out / name)
    assert not (topk / "report").exists() and not (l1 / "report").exists()
    after = {p.name: (p / rundir.METRICS).read_bytes() for p in (l1 / "runs").iterdir()}
    assert after == before  # the other sweeps are only read
    page = (out / "index.html").read_text()
    assert "rep_topk (topk)" in page and "rep_l1 (untied)" in page
    assert "frontier plot compares" in page and "r2-k4-s0" in page
    assert 'class="meta warn"' not in page  # same store, held-out rows and training length
    links = re.findall(r'(?:href|src)="([^"#][^"]*)"', page)
    assert links and all((out / u).is_file() for u in links)  # run files of the first sweep
    labels = sweep_labels([SweepFolder(topk), SweepFolder(l1)], ["topk", "untied"])
    rows = [[r.row() for r in SweepFolder(p).read_runs()] for p in (topk, l1)]
    fig = plots.frontier_compare_figure(list(zip(labels, rows, strict=True)))
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert legend == ["rep_topk (topk)", "rep_l1 (untied)"]


def test_two_sweeps_default_to_the_first_report_folder(sweeps):
    out, rows = build_report(sweeps["l1"], log_media=False, compare=[sweeps["topk"]])
    assert out == sweeps["l1"] / "report" and {r["run_id"] for r in rows} == {
        f"r{r:g}-l1_{v}-s0" for r in RATIOS for v in ("1e-02", "1e-01")
    }
    assert_png(out / "frontier.png")
    page = (out / "index.html").read_text()
    assert "rep_l1 (untied)</b> (this sweep" in page and "rep_topk (topk)" in page
    assert "<dt>k</dt>" not in page  # the page is the (L1) first sweep's
    assert "different stores" not in page  # both trained on one store


def test_sweeps_on_different_stores_are_compared_with_a_warning(sweeps, caplog):
    manifest = sweeps["topk"] / "manifest.json"
    content = json.loads(manifest.read_text())
    content["store"] = {**content["store"], "id": "another", "path": "/data/other-layer"}
    manifest.write_text(json.dumps(content))
    with caplog.at_level(logging.WARNING):
        out, _ = build_report(sweeps["l1"], log_media=False, compare=[sweeps["topk"]])
    page = " ".join((out / "index.html").read_text().split())
    want = "these sweeps trained on different stores (rep_l1 (untied): "
    assert want in page and "rep_topk (topk): /data/other-layer)" in page
    assert "not measured on the same data" in page and want in caplog.text


def test_sweeps_held_out_or_trained_differently_are_compared_with_a_warning(sweeps, caplog):
    for path in (sweeps["topk"] / "runs").glob("*/metrics.json"):
        values = json.loads(path.read_text())
        values.update(eval_rows=values["eval_rows"] * 2, rows_trained=values["rows_trained"] * 3)
        path.write_text(json.dumps(values))
    with caplog.at_level(logging.WARNING):
        out, _ = build_report(sweeps["l1"], log_media=False, compare=[sweeps["topk"]])
    page = " ".join((out / "index.html").read_text().split())
    held = "these sweeps held out different rows for evaluation (data.eval_rows: rep_l1 (untied): "
    longer = "these sweeps trained for very different lengths (rows per run: rep_l1 (untied): "
    for want in (held, longer, "measured on different rows", "lower for that reason too"):
        assert want in page and want in caplog.text
    assert "different stores" not in page


@pytest.mark.parametrize("kind", ["missing", "foreign", "twice"])
def test_report_with_a_bad_second_folder_is_one_line_error(sweeps, tmp_path, capsys, kind):
    other = {"missing": tmp_path / "nope", "foreign": tmp_path, "twice": sweeps["topk"]}[kind]
    assert main(["report", str(sweeps["topk"]), str(other), "--no-wandb"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and str(other) in err
    assert not (sweeps["topk"] / "report").exists()  # checked before anything is written


def test_compare_figure_labels():
    a, b = Path("/x/run1/sweep"), Path("/y/run2/sweep")
    assert sweep_labels([SweepFolder(a), SweepFolder(b)], ["topk", "untied"]) == [
        "run1/sweep (topk)",
        "run2/sweep (untied)",
    ]
    done = [{"run_id": "a", "state": "done", "k": 4, "l1": None, "dict_ratio": 2.0, "l0": 4.0,
             "fvu": 0.2}]  # fmt: skip
    fig = plots.frontier_compare_figure([("a (topk)", done), ("b (untied)", [])])
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert legend == ["a (topk)", "b (untied) (no finished runs)"]
    assert plots.frontier_compare_figure([("b (untied)", [])]) is None


def test_the_mmcs_colours_span_the_values_between_different_runs():
    """A run against itself (1) stretched the range over what no pair reaches."""
    from types import SimpleNamespace

    cross = SimpleNamespace(matrices={4.0: ([], [[1.0, 0.6], [0.7, 1.0]])})
    assert plots._mmcs_range(cross, [4.0]) == (0.6, 0.7)


def test_the_frontier_says_what_it_leaves_out_and_labels_each_grid_point_once():
    """Two seeds of a grid point: one label (they printed over each other); a dead dictionary
    (FVU >= 1) beside the line of no better than the mean; a diverged run counted, not
    silently absent. The comparison's labels carry the dict ratio, shaded alike in every
    sweep."""

    def run(i, seed, l1, l0, fvu, state="done", ratio=2.0):  # noqa: ANN001, ANN202
        return {"run_id": f"r{i}", "state": state, "l1": l1, "seed": seed, "dict_ratio": ratio,
                "l0": l0, "fvu": fvu}  # fmt: skip

    rows = [run(0, 0, 1e-2, 9.0, 0.2), run(1, 1, 1e-2, 9.2, 0.21), run(2, 0, 3.0, 0.05, 1.07),
            run(3, 0, 1e38, math.nan, math.nan, "diverged")]  # fmt: skip
    ax = plots.frontier_figure(rows).axes[0]
    labels = sorted(t.get_text() for t in ax.texts)
    assert labels == ["0.01", "3"]
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "FVU 1: no better than the mean" in legend
    assert "1 finished run(s) not drawn (diverged, L0 or FVU 0)" in legend
    fig = plots.frontier_compare_figure([("a (untied)", rows[:2]), ("b (untied)", rows[3:])])
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert legend[1] == "b (untied) (1 finished, none drawable: diverged, L0 or FVU 0)"
    other = [{**r, "dict_ratio": 8.0} for r in rows[:2]]
    fig = plots.frontier_compare_figure([("a (untied)", rows[:2]), ("b (untied)", other)])
    assert sorted(t.get_text() for t in fig.axes[0].texts) == ["r2 0.01", "r8 0.01"]


@pytest.mark.parametrize(
    "l0s, fvus", [((2, 3, 5, 9, 14), (0.5, 0.4, 0.3, 0.2, 0.12)), ((3, 4, 5), (0.3, 0.28, 0.25))]
)
def test_frontier_ticks_are_plain_distinct_and_apart(l0s, fvus):
    done = [
        {"run_id": f"r{i}", "state": "done", "l1": 1e-3, "dict_ratio": 2.0, "l0": a, "fvu": b}
        for i, (a, b) in enumerate(zip(l0s, fvus, strict=True))
    ]
    fig = plots.frontier_compare_figure([("a (untied)", done), ("b (topk)", done[1:])])
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    ax = fig.axes[0]
    for axis in (ax.xaxis, ax.yaxis):
        shown = [t for t in axis.get_ticklabels(which="both") if t.get_text() and t.get_visible()]
        texts = [t.get_text() for t in shown]
        assert len(texts) >= 2 and len(set(texts)) == len(texts), texts
        assert all(re.fullmatch(r"[0-9.]+", t) for t in texts), texts  # no 6x10^0, no 3e-01
        boxes = sorted((t.get_window_extent(renderer) for t in shown), key=lambda b: b.x0 + b.y0)
        assert not any(a.overlaps(b) for a, b in itertools.pairwise(boxes)), texts


# ----------------------------------------------------------------------------- a JumpReLU sweep


def test_jumprelu_report_names_its_l0_coefficient_and_shows_pending_and_failed_runs(
    tiny_store, tmp_path
):
    """JumpReLU's grid.l1 weighs an L0 penalty: the report says so (axes, captions,
    definitions, curves). A run not started shows its grid point (from the manifest), a
    failed one why it failed."""
    runs = grid.expand([1e-3, 1e-2, 1e-1], [1.0], 1, tiny_store.width, "jumprelu")
    sweep_dir = tmp_path / "jr"
    sweep_dir.mkdir()
    write_manifest(sweep_dir, runs, tiny_store)
    done, pending = runs[:2], runs[2]
    for e in grid.group(done, {1.0: 16}):
        job = EnsembleJob(
            e, str(sweep_dir), str(tiny_store.path), True, 2048, tiny_train(), threads=1
        )
        train_ensemble(job)
    failed = rundir.RunFolder.of(sweep_dir, done[1].run_id)
    (failed.path / rundir.DONE).unlink()
    failed.mark_failed("RuntimeError: boom")
    assert crossdict.knob({"l1": 0.01, "arch": "jumprelu"}) == ("l0", 0.01)
    assert crossdict.sweep_knob([{"l1": 0.01, "sae": "jumprelu"}, {"l1": 0.1}]) == "l1"

    out, rows = build_report(sweep_dir, device="cpu", log_media=False)
    by_id = {r["run_id"]: r for r in read_csv(out / "summary.csv")}
    assert "arch" not in next(iter(by_id.values()))
    assert (by_id[pending.run_id]["l1"], by_id[pending.run_id]["dict_ratio"]) == ("0.1", "1.0")
    assert by_id[pending.run_id]["seed"] == "0" and by_id[pending.run_id]["state"] == "pending"
    page = (out / "index.html").read_text()
    assert "L0 coefficient" in page and "labels are L1" not in page
    assert 'title="RuntimeError: boom">failed' in page
    assert plots.dead_vs_l1_figure(rows).axes[0].get_xlabel().startswith("L0 coefficient")
