"""`sweep report`: cross-dictionary MMCS, density data, summary/mmcs CSVs, plots, HTML, API."""

from __future__ import annotations

import collections
import csv
import json
import logging
import os
import re
import shutil
import time
from html.parser import HTMLParser

import pytest
import torch
from matplotlib import image as mpimg

import sweep
from sweep import crossdict, metrics, plots, rundir, runfacts, table
from sweep.cli import main
from sweep.errors import SweepError
from sweep.io import STALE_TEMP_SECONDS, atomic_write_json, read_json
from sweep.report import build_report
from sweep.sweepdir import SweepFolder
from tests.sweep_builder import L1S, build_sweep

PNGS = (
    "frontier.png",
    "curves.png",
    "mmcs_vs_l1.png",
    "mmcs_heatmap.png",
    "dead_vs_l1.png",
    "density.png",
)


@pytest.fixture(scope="module")
def finished(tiny_store, tmp_path_factory):
    """A finished 3 L1 x 2 ratios x 2 seeds sweep (12 runs), built once per module."""
    return build_sweep(tiny_store, tmp_path_factory.mktemp("sweeps") / "done")


@pytest.fixture
def sweep_copy(finished, tmp_path):
    dst = tmp_path / "sweep"
    shutil.copytree(finished, dst)
    return dst


def read_csv(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def assert_png(path) -> None:
    img = mpimg.imread(str(path))  # (H, W, 3|4) floats in [0, 1]
    assert img.shape[0] >= 200 and img.shape[1] >= 300, img.shape
    assert float(img[..., :3].std()) > 0.02, f"{path.name} looks blank"


def test_density_file_matches_metrics(finished):
    folder = rundir.run_dir(finished, "r2-l1_1e-02-s0")
    d = crossdict.load_density(rundir.RunFolder(folder))
    final = read_json(folder / rundir.METRICS)
    f = 32  # width 16 x ratio 2
    assert d["frequency"].shape == (f,) and d["log10_hist_counts"].shape == (40,)
    assert int(d["log10_hist_counts"].sum()) + int(d["dead_count"][0]) == f
    assert float(d["frequency"].mean() * f) == pytest.approx(
        final["l0"], rel=1e-6
    )  # sum of frequencies = L0
    assert float((d["frequency"] == 0).double().mean()) == final["dead_fraction"]


def test_density_counts_dead_features_separately():
    freq = torch.tensor([0.0, 0.0, 1e-3, 0.5, 1.0], dtype=torch.float64)
    t = metrics.density_tensors(freq)
    assert int(t["dead_count"][0]) == 2 and int(t["log10_hist_counts"].sum()) == 3


def test_max_cos_both_matches_reference():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(50, 8, generator=g), torch.randn(70, 8, generator=g)
    ua, ub = a / a.norm(dim=1, keepdim=True), b / b.norm(dim=1, keepdim=True)
    ab, ba = metrics.max_cos_both(ua, ub, chunk=16)  # several row blocks
    torch.testing.assert_close(ab, metrics.mmcs(a, b))
    torch.testing.assert_close(ba, metrics.mmcs(b, a))


def test_pareto_frontier():
    pts = [(1, 0.9), (2, 0.5), (3, 0.6), (4, 0.2), (5, 0.2), (0.7, 0.95)]
    assert runfacts.pareto(pts) == [(0.7, 0.95), (1, 0.9), (2, 0.5), (4, 0.2)]
    # no better than the mean (FVU >= 1): dominated by the empty dictionary, never on it
    assert runfacts.pareto([*pts, (0.5, 1.0), (0.1, 1.3)]) == runfacts.pareto(pts)
    # L0s within 1% are one L0 (TopK runs of one k at two ratios): the lower FVU wins
    assert runfacts.pareto([(3.893, 0.19), (3.916, 0.123), (8.0, 0.1)]) == [
        (3.916, 0.123),
        (8.0, 0.1),
    ]
    assert runfacts.pareto([(3.8, 0.19), (3.916, 0.123)]) == [(3.8, 0.19), (3.916, 0.123)]
    # only frontier points beat: L0s each within 1% of the next do not chain
    assert runfacts.pareto([(100, 0.3), (100.9, 0.2), (101.8, 0.1)]) == [(100, 0.3), (101.8, 0.1)]
    chain = runfacts.pareto([(100 + 0.9 * i, 0.5 - 0.02 * i) for i in range(12)])
    assert len(chain) == 6 and chain[-1] == (109.9, 0.28)


def test_the_frontier_joins_each_ratios_runs_in_knob_order_a_line_per_seed(finished):
    """Two seeds of 3 L1 values a ratio: two lines of 3 points each (one line through all
    six, sorted by L1 alone, zigzagged between the seeds)."""
    rows = [r.row() for r in SweepFolder(finished).read_runs()]
    ax = plots.frontier_figure(rows).axes[0]
    lines = [ln for ln in ax.get_lines() if ln.get_linestyle() == "-"]
    assert len(lines) == 2 * 2 and all(len(ln.get_xdata()) == 3 for ln in lines)
    for ln in lines:
        (run,) = [r for r in rows if r["l0"] == ln.get_xdata()[0]]
        mine = sorted(
            (r for r in rows if (r["dict_ratio"], r["seed"]) == (run["dict_ratio"], run["seed"])),
            key=lambda r: r["l1"],
        )
        assert list(ln.get_xdata()) == [r["l0"] for r in mine]
    dots = [c for c in ax.collections if len(c.get_offsets())]  # (a scatter per ratio, not
    assert len(dots) == 2 and sum(len(c.get_offsets()) for c in dots) == len(rows)  # per run)
    assert all(sorted(c.get_sizes()) == [25, 25, 65, 65, 105, 105] for c in dots)


def test_a_report_of_the_current_folder_names_it(sweep_copy, monkeypatch):
    """``cd SWEEP_DIR && sweep report .``: the page is titled with the folder's name (it
    was empty: the name of '.')."""
    monkeypatch.chdir(sweep_copy)
    assert main(["report", ".", "--no-wandb"]) == 0
    page = (sweep_copy / "report" / "index.html").read_text()
    assert "<title>sweep report: sweep</title>" in page and "<h1>sweep report: sweep</h1>" in page


def test_report_on_finished_sweep(sweep_copy, capsys):
    assert main(["report", str(sweep_copy), "--no-wandb"]) == 0
    out = capsys.readouterr().out
    report = sweep_copy / "report"
    assert f"report: {report / 'index.html'}" in out and "r2-l1_1e-01-s1" in out
    for name in PNGS:
        assert_png(report / name)
    rows = read_csv(report / "summary.csv")
    assert len(rows) == 12 and {r["state"] for r in rows} == {"done"}
    cols = set(rows[0])
    assert {
        "run_id",
        "l1",
        "dict_ratio",
        "seed",
        "l0",
        "fvu",
        "mse",
        "dead_fraction",
        "gt_mmcs",
        "mmcs_next_ratio",
        "mmcs_seeds",
    } <= cols
    by_id = {r["run_id"]: r for r in rows}
    assert list(rows[0])[:7] == ["run_id", "l1", "dict_ratio", "seed", "state", "frontier", "l0"]
    numeric = [{**r, **{k: float(r[k]) for k in ("l1", "l0", "fvu")}} for r in rows]
    front = runfacts.frontier_ids(numeric)
    assert {r["run_id"] for r in rows if r["frontier"] == "True"} == front and front
    assert {r["frontier"] for r in rows} == {"True", "False"}
    assert by_id["r1-l1_1e-03-s1"]["mmcs_next_ratio_run"] == "r2-l1_1e-03-s1"
    assert by_id["r2-l1_1e-03-s1"]["mmcs_next_ratio"] == ""  # no larger ratio in the sweep
    assert all(0 < float(r["mmcs_seeds"]) <= 1 for r in rows)
    sweep_rows = {r["run_id"]: r for r in read_csv(sweep_copy / "summary.csv")}  # refreshed too
    assert all(sweep_rows[i]["mmcs_seeds"] == r["mmcs_seeds"] for i, r in by_id.items())
    html = (report / "index.html").read_text()
    assert all(name in html for name in PNGS) and "r1-l1_1e-02-s0" in html and "summary.csv" in html


def test_mmcs_values_are_consistent(sweep_copy):
    build_report(sweep_copy, device="cpu", log_media=False)
    a_id, b_id = "r1-l1_1e-02-s0", "r2-l1_1e-02-s0"
    a = crossdict.unit_atoms(rundir.run_dir(sweep_copy, a_id), torch.device("cpu"))
    b = crossdict.unit_atoms(rundir.run_dir(sweep_copy, b_id), torch.device("cpu"))
    expect = float(metrics.mmcs(a, b).mean())
    m = read_json(rundir.run_dir(sweep_copy, a_id) / rundir.METRICS)
    assert (
        m["mmcs_next_ratio"] == pytest.approx(expect, abs=1e-6) and m["mmcs_next_ratio_run"] == b_id
    )
    with open(sweep_copy / "report" / "mmcs.csv", newline="") as f:
        table = list(csv.reader(f))
    ids = table[0][1:]
    assert len(ids) == 12 and [r[0] for r in table[1:]] == ids
    cell = {(row[0], ids[j]): v for row in table[1:] for j, v in enumerate(row[1:])}
    assert all(float(cell[(i, i)]) == pytest.approx(1.0) for i in ids)
    assert cell[(a_id, b_id)] == ""  # different ratios: blank
    other = "r1-l1_1e-02-s1"
    seeds = float(cell[(a_id, other)])
    assert m["mmcs_seeds"] == pytest.approx(seeds, abs=1e-6)
    ua = a
    uo = crossdict.unit_atoms(rundir.run_dir(sweep_copy, other), torch.device("cpu"))
    assert seeds == pytest.approx(float(metrics.mmcs(ua, uo).mean()), abs=1e-5)
    # the heatmap orders each ratio's runs by L1
    r1 = [i for i in ids if i.startswith("r1-")]
    assert [
        float(read_json(rundir.run_dir(sweep_copy, i) / rundir.SPEC)["l1"]) for i in r1
    ] == sorted([l1 for l1 in L1S for _ in range(2)])


def test_second_report_reuses_cached_mmcs(sweep_copy, monkeypatch):
    """Also after `sweep evaluate`, which re-finishes every run (DONE's time) and keeps its
    weights: keyed by that time, the cache was recomputed whole (hours of a large sweep)."""
    build_report(sweep_copy, log_media=False)
    first = (sweep_copy / "report" / "mmcs.csv").read_text()
    for run in (sweep_copy / "runs").iterdir():
        done = read_json(run / rundir.DONE)
        (run / rundir.DONE).write_text(json.dumps({**done, "finished": done["finished"] + 60}))

    def boom(*a, **k):
        raise AssertionError("MMCS recomputed although cached")

    monkeypatch.setattr(metrics, "max_cos_both", boom)
    build_report(sweep_copy, log_media=False)
    assert (sweep_copy / "report" / "mmcs.csv").read_text() == first


def test_a_report_removes_what_a_killed_report_left(sweep_copy):
    """Temp files of a killed report's writes go; a young one may be another report's."""
    folder = sweep_copy / "report"
    folder.mkdir()
    dead, live = folder / f".{crossdict.CACHE}.dead.tmp", folder / ".index.html.live.tmp"
    for f in (dead, live):
        f.write_text("a write that did not finish")
    old = time.time() - 2 * STALE_TEMP_SECONDS
    os.utime(dead, (old, old))
    build_report(sweep_copy, log_media=False)
    assert not dead.exists() and live.exists()


def test_report_on_running_sweep(sweep_copy):
    """Runs without DONE (still training) are listed but left out of MMCS and plots."""
    for rid in ("r2-l1_1e-01-s0", "r2-l1_1e-01-s1", "r1-l1_1e-03-s0"):
        (rundir.run_dir(sweep_copy, rid) / rundir.DONE).unlink()
    out, rows = build_report(sweep_copy, log_media=False)
    states = {r["run_id"]: r["state"] for r in rows}
    assert states["r2-l1_1e-01-s0"] == "pending" and sum(s == "done" for s in states.values()) == 9
    by_id = {r["run_id"]: r for r in read_csv(out / "summary.csv")}
    assert by_id["r1-l1_1e-01-s0"]["mmcs_next_ratio"] == ""  # its partner is not finished
    assert by_id["r1-l1_1e-03-s1"]["mmcs_seeds"] == ""  # its only other seed is not finished
    assert float(by_id["r1-l1_1e-02-s1"]["mmcs_next_ratio"]) > 0
    with open(out / "mmcs.csv", newline="") as f:
        assert len(next(csv.reader(f))) == 1 + 9
    for name in PNGS:
        assert_png(out / name)


def test_mmcs_values_leave_the_tables_once_another_run_finishes(sweep_copy):
    """What a report wrote back holds for the runs finished then: when one more finishes, a
    run's next-ratio partner or its seeds may change, so tables drop the values until the
    next report (metrics.json keeps them and says over which runs they were computed)."""
    late = rundir.run_dir(sweep_copy, "r2-l1_1e-01-s0") / rundir.DONE
    done = late.read_bytes()
    late.unlink()
    build_report(sweep_copy, log_media=False)

    def mmcs_columns() -> dict:
        rows = SweepFolder(sweep_copy).read_runs()
        return {r.run_id: r.row().get("mmcs_seeds") for r in rows if r.state == "done"}

    before = mmcs_columns()
    assert len(before) == 11 and sum(v is not None for v in before.values()) == 10
    assert "mmcs_over" not in SweepFolder(sweep_copy).read_runs()[0].row()
    late.write_bytes(done)  # the run finishes
    assert set(mmcs_columns().values()) == {None}
    some = read_json(rundir.run_dir(sweep_copy, "r1-l1_1e-02-s0") / rundir.METRICS)
    assert "mmcs_seeds" in some and "mmcs_over" in some  # kept on disk, only not shown
    build_report(sweep_copy, log_media=False)
    assert all(v is not None for v in mmcs_columns().values())
    assert len(mmcs_columns()) == len(before) + 1


def test_mmcs_next_ratio_is_of_the_next_ratio_of_the_sweep_not_of_its_finished_runs(sweep_copy):
    """A ratio between 1 and 2 none of whose runs has finished (failed, or still training):
    the ratio-1 runs get no mmcs_next_ratio yet (they were paired with ratio 2, two ratios
    up, under the name "next larger ratio"); ratio 2's own values are as before."""
    before = {r.run_id: r for r in SweepFolder(sweep_copy).read_runs()}
    manifest = read_json(sweep_copy / "manifest.json")
    point = {**manifest["runs"]["r1-l1_1e-01-s0"], "dict_ratio": 1.5, "dict_size": 24}
    manifest["runs"]["r1.5-l1_1e-01-s0"] = {**point, "run_id": "r1.5-l1_1e-01-s0"}
    (sweep_copy / "manifest.json").write_text(json.dumps(manifest))
    records = SweepFolder(sweep_copy).read_runs()
    assert {r.run_id: r.state for r in records}["r1.5-l1_1e-01-s0"] == "pending"
    cross = crossdict.compute(records, torch.device("cpu"))
    whole = crossdict.compute(list(before.values()), torch.device("cpu"))
    for rid, values in cross.per_run.items():
        if rid.startswith("r1-"):
            assert "mmcs_next_ratio" not in values and "mmcs_seeds" in values
        else:
            assert values == whole.per_run[rid]


def test_a_report_never_pairs_a_run_that_is_no_longer_finished(sweep_copy):
    """A report's MMCS values are its own: one recorded by an earlier report, against a run
    whose weights have since gone, is not shown (its DONE still stamps it finished)."""
    build_report(sweep_copy, log_media=False)
    partner = "r2-l1_1e-01-s0"
    (rundir.run_dir(sweep_copy, partner) / rundir.WEIGHTS).unlink()
    _, rows = build_report(sweep_copy, log_media=False)
    assert not [r["run_id"] for r in rows if r.get("mmcs_next_ratio_run") == partner]
    assert {r["run_id"]: r.get("mmcs_next_ratio") for r in rows}["r1-l1_1e-01-s0"] is None
    on_disk = read_csv(sweep_copy / "report" / "summary.csv")
    assert not [r for r in on_disk if r.get("mmcs_next_ratio_run") == partner]
    build_report(sweep_copy, log_media=False)
    (rundir.run_dir(sweep_copy, "r2-l1_1e-02-s0") / rundir.WEIGHTS).unlink()  # after a report
    table = sweep.load_sweep(sweep_copy).table  # values recorded over it are out of date
    assert table["mmcs_next_ratio"].isna().all() and table["mmcs_seeds"].isna().all()


def test_report_with_nothing_finished_draws_placeholders(sweep_copy):
    for d in (sweep_copy / "runs").iterdir():
        (d / rundir.DONE).unlink()
    out, rows = build_report(sweep_copy, log_media=False)
    assert {r["state"] for r in rows} == {"pending"}
    for name in PNGS:
        assert_png(out / name)


@pytest.mark.parametrize("kind", ["empty", "foreign", "missing"])
def test_report_bad_folder_is_one_line_error(tmp_path, capsys, kind):
    target = tmp_path / "x"
    if kind != "missing":
        target.mkdir()
    if kind == "foreign":
        (target / "notes.txt").write_text("hello")
    assert main(["report", str(target)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and str(target) in err
    assert not (target / "report").exists()


def test_an_override_given_to_report_is_named_as_one(sweep_copy, capsys):
    assert main(["report", str(sweep_copy), "launch.temp_dir=/x"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "error: sweep report takes sweep folders and options, not overrides "
        "(launch.temp_dir=/x); see 'sweep report --help'"
    )
    assert not (sweep_copy / "report").exists()


def test_a_report_during_training_leaves_the_sweeps_summary_as_the_runs_are_now(
    sweep_copy, monkeypatch
):
    """A run whose state changed while the report compared dictionaries (minutes of MMCS
    during training): the report's own table is of what it read, the sweep's summary.csv of
    what the runs are when it is written (it went back to the earlier states)."""
    real = crossdict.compute
    changed = "r2-l1_1e-01-s1"

    def compute(*args, **kw):
        out = real(*args, **kw)
        (rundir.run_dir(sweep_copy, changed) / rundir.DONE).unlink()  # no longer finished
        return out

    monkeypatch.setattr(crossdict, "compute", compute)
    build_report(sweep_copy, device="cpu", log_media=False)
    report = {r["run_id"]: r for r in read_csv(sweep_copy / "report" / "summary.csv")}
    now = {r["run_id"]: r for r in read_csv(sweep_copy / "summary.csv")}
    assert report[changed]["state"] == "done" and now[changed]["state"] != "done"
    other = "r1-l1_1e-03-s1"  # MMCS over another set of finished runs: out of date, left out
    assert report[other]["mmcs_seeds"] != "" and now[other]["mmcs_seeds"] == ""


def test_a_run_whose_weights_fail_their_checksum_is_not_done_in_either_summary(sweep_copy):
    """(The sweep's summary.csv said "done" while the report's own said otherwise.)"""
    rid = "r1-l1_1e-03-s0"
    weights = rundir.run_dir(sweep_copy, rid) / rundir.WEIGHTS
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    build_report(sweep_copy, device="cpu", log_media=False)
    for csv_file in (sweep_copy / "report" / "summary.csv", sweep_copy / "summary.csv"):
        row = {r["run_id"]: r for r in read_csv(csv_file)}[rid]
        assert row["state"] != "done" and "fails its checksum" in row["note"], csv_file


def test_report_without_runs_is_an_error(tmp_path, capsys):
    atomic_write_json(tmp_path / "manifest.json", {"runs": {}})
    assert main(["report", str(tmp_path)]) == 2
    assert "lists no runs" in capsys.readouterr().err


def test_load_sweep_table_and_lazy_saes(sweep_copy, caplog):
    (rundir.run_dir(sweep_copy, "r1-l1_1e-01-s1") / rundir.DONE).unlink()
    sw = sweep.load_sweep(sweep_copy)
    assert len(sw) == 12 and sw.table.loc["r2-l1_1e-02-s1", "dict_ratio"] == 2.0
    assert sw.table.loc["r1-l1_1e-01-s1", "state"] == "pending"
    assert not sw._cache  # nothing loaded yet
    rid = sw.table.query("state == 'done'").sort_values("fvu").index[0]
    model = sw.sae(rid)
    assert sw.sae(rid) is model and list(sw._cache) == [rid]
    ref = sweep.load_run(str(sw.run_dir(rid)))
    x = torch.randn(5, model.d_in)
    torch.testing.assert_close(model(x), ref(x))
    with pytest.raises(SweepError, match="not finished"):
        sw.sae("r1-l1_1e-01-s1")
    for ask in (sw.sae, sw.run_dir):
        with pytest.raises(SweepError, match="no run 'nope' in"):
            ask("nope")
    assert sum(1 for _ in sw.saes()) == 11 and list(sw._cache) == [rid]  # saes() keeps none
    assert dict(sw.saes())[rid] is model  # (but reuses what sae() keeps)
    done = sw.table[sw.table.state == "done"]
    rows = [r.row() for r in SweepFolder(sweep_copy).read_runs()]
    assert set(sw.table.index[sw.table.frontier]) == runfacts.frontier_ids(rows)
    front = done[done.frontier].sort_values("l0")
    assert len(front) >= 1 and list(front.fvu) == sorted(front.fvu, reverse=True)
    assert (sw.table.arch == "untied").all()
    weights = rundir.run_dir(sweep_copy, rid) / rundir.WEIGHTS
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF  # damaged after the table was read
    weights.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="sweep.api"):
        loaded = [r for r, _ in sweep.load_sweep(sweep_copy).saes()]
    assert len(loaded) == 10 and rid not in loaded
    with pytest.raises(SweepError, match="runs in state 'pending' have no dictionary to load"):
        next(sw.saes("pending"))
    assert f"skipped run {rid}: run " in caplog.text and "fails its checksum" in caplog.text


def test_runs_are_listed_in_grid_order_not_by_name(sweep_copy, capsys):
    """Run ids sort 1e-01 before 1e-03; the grid goes 1e-3, 1e-2, 1e-1 (then by seed)."""
    from sweep.status import status_rows

    want = [
        f"r{r}-l1_{v}-s{s}" for r in (1, 2) for v in ("1e-03", "1e-02", "1e-01") for s in (0, 1)
    ]
    assert [r["run_id"] for r in status_rows(sweep_copy)] == want
    assert list(sweep.load_sweep(sweep_copy).table.index) == want
    _, rows = build_report(sweep_copy, device="cpu", log_media=False)
    assert [r["run_id"] for r in rows] == want
    assert [r["run_id"] for r in read_csv(sweep_copy / "report" / "summary.csv")] == want


def test_terminal_table_says_why_a_run_is_not_done(sweep_copy, capsys, caplog):
    weights = rundir.run_dir(sweep_copy, "r2-l1_1e-02-s1") / rundir.WEIGHTS
    weights.write_bytes(weights.read_bytes()[:-8])
    assert main(["report", str(sweep_copy)]) == 0
    out = capsys.readouterr().out
    assert "r2-l1_1e-02-s1 (pending): " in out and "a sweep run whose grid has it trains it" in out
    atomic_write_json(
        sweep_copy / "manifest.json", {**read_json(sweep_copy / "manifest.json"), "state": "done"}
    )
    assert main(["status", str(sweep_copy)]) == 0
    title = " ".join(capsys.readouterr().out.split())
    assert (
        "(done when its last driver ended, but 1 run(s) are no longer finished: re-run its" in title
    )
    assert "command to finish them (each one's note says how)" in title
    assert main(["status", str(sweep_copy), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["activity"] == "incomplete"
    metrics = rundir.run_dir(sweep_copy, "r1-l1_1e-02-s0") / rundir.METRICS
    metrics.write_text(metrics.read_text()[:20])
    with caplog.at_level(logging.WARNING):
        assert main(["status", str(sweep_copy)]) == 0
    assert "metrics.json is missing or damaged: a sweep run" in " ".join(
        capsys.readouterr().out.split()
    )
    assert not caplog.records  # (the note says it: no warning besides, once per read)


def test_loading_onto_a_device_that_is_not_there_is_a_one_line_error(finished):
    run = rundir.run_dir(finished, "r1-l1_1e-02-s0")
    with pytest.raises(SweepError, match="unknown device 'gpu'; pass device='cpu' or 'cuda'"):
        sweep.load_run(run, device="gpu")
    sae = sweep.load_run(run)
    assert repr(sae) == f"SAE(r1-l1_1e-02-s0: untied, d_in={sae.d_in}, d_sae={sae.d_sae}, l1=0.01)"
    if torch.cuda.is_available():
        return
    for load in (
        lambda: sweep.load_run(run, device="cuda"),
        lambda: sweep.load_sweep(finished, "cuda"),
    ):
        with pytest.raises(SweepError, match="no CUDA device is visible; pass device='cpu'"):
            load()


def test_metrics_json_keeps_its_other_values(sweep_copy):
    folder = rundir.run_dir(sweep_copy, "r1-l1_1e-02-s0")
    before = read_json(folder / rundir.METRICS)
    build_report(sweep_copy, log_media=False)
    after = json.loads((folder / rundir.METRICS).read_text())
    assert {k: after[k] for k in before} == before and "mmcs_next_ratio" in after


def test_a_run_folder_made_read_only_keeps_its_mmcs_and_the_report_is_made(
    sweep_copy, monkeypatch, caplog
):
    """One run's metrics.json that cannot be written (its folder made read-only) keeps its
    values with a warning; the report is made (it stopped at that write, index.html unmade)."""
    update = rundir.RunFolder.update_metrics

    def refused(self, *args, **kwargs):  # noqa: ANN001, ANN202
        if self.run_id == "r1-l1_1e-02-s0":
            raise PermissionError(13, "Permission denied", str(self.path / "x.tmp"))
        return update(self, *args, **kwargs)

    monkeypatch.setattr(rundir.RunFolder, "update_metrics", refused)
    with caplog.at_level(logging.WARNING):
        out, _ = build_report(sweep_copy, log_media=False)
    assert (out / "index.html").is_file()
    assert "could not update the metrics.json of r1-l1_1e-02-s0 (read-only" in caplog.text
    other = read_json(rundir.run_dir(sweep_copy, "r1-l1_1e-03-s0") / rundir.METRICS)
    assert "mmcs_next_ratio" in other  # (the others are written)


# ----------------------------------------------------------------------------- the page

CONFIG_YAML = """\
data:
  name: synthetic
  width: 16
  n_features: 32
  rows: 12000
  path: null
sae:
  name: untied
  recipe: unit
grid:
  l1: [0.001, 0.01, 0.1]
  dict_ratio: [1.0, 2.0]
  seeds: 2
train:
  batch_size: 256
  lr: 0.01
  betas: [0.9, 0.999]
sweep_dir: somewhere
"""


class Links(HTMLParser):
    """Every href and src of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.urls += [v for k, v in attrs if k in ("href", "src") and v is not None]


def page_of(out) -> str:
    return (out / "index.html").read_text()


def section(page: str, name: str) -> str:
    start = page.index(f'<section id="{name}"')
    return page[start : page.index("</section>", start)]


def test_page_starts_with_settings_best_runs_and_table(sweep_copy):
    (sweep_copy / "config.yaml").write_text(CONFIG_YAML)
    out, _ = build_report(sweep_copy, device="cpu", log_media=False)
    page = page_of(out)
    where = [page.index(s) for s in ('id="settings"', 'id="best"', 'id="runs"', "<img")]
    assert where == sorted(where), "settings, best runs, run table, then plots"
    settings = section(page, "settings")
    assert "from config.yaml" in settings
    for text in ("n_features</b> 32", "l1</b> 0.001, 0.01, 0.1", "seeds</b> 2", "lr</b> 0.01"):
        assert text in settings
    assert "sae.recipe</b> unit" in settings  # (a recipe or levels, as trained: named)
    assert "sweep_dir" not in settings and "trained on</b>" in settings  # only data/grid/train


def test_settings_show_every_run_s_grid_values_after_a_resume_with_other_ones(sweep_copy):
    """config.yaml holds the last command's grid (a 'sweep resume DIR grid.l1=[0.1]' that
    trained one value more, say); the page's table has every run, and so do its settings."""
    last = CONFIG_YAML.replace("l1: [0.001, 0.01, 0.1]", "l1: [0.1]").replace(
        "seeds: 2", "seeds: 1"
    )
    (sweep_copy / "config.yaml").write_text(last)
    out, _ = build_report(sweep_copy, device="cpu", log_media=False)
    settings = section(page_of(out), "settings")
    assert "from config.yaml" in settings and "lr</b> 0.01" in settings
    assert "l1</b> 0.001, 0.01, 0.1" in settings and "seeds</b> 2" in settings


def test_settings_without_config_come_from_the_run_specs(sweep_copy):
    out, _ = build_report(sweep_copy, device="cpu", log_media=False)
    settings = section(page_of(out), "settings")
    assert "the run specs" in settings
    assert "l1</b> 0.001, 0.01, 0.1" in settings and "dict_ratio</b> 1, 2" in settings
    assert "batch_size</b> 256" in settings and "width</b> 16" in settings
    assert "init_seeding</b> per_ratio" in settings and "biased upward" not in settings


def test_a_sweep_of_shared_starts_warns_that_mmcs_next_ratio_is_biased(sweep_copy, caplog):
    """Recorded before train.init_seeding (its specs lack it): its runs' smaller dictionaries
    started as the leading atoms of the larger ones; the page and the log say so."""
    for spec_file in sweep_copy.glob("runs/*/spec.json"):
        spec = json.loads(spec_file.read_text())
        del spec["train"]["init_seeding"]
        spec_file.write_text(json.dumps(spec))
    with caplog.at_level(logging.WARNING, logger="sweep.report"):
        out, rows = build_report(sweep_copy, device="cpu", log_media=False)
    assert any(r.get("mmcs_next_ratio") is not None for r in rows)
    settings = section(page_of(out), "settings")
    assert "init_seeding</b> shared" in settings  # as it trained, though no file names it
    assert 'class="meta warn">mmcs_next_ratio is biased upward' in settings
    assert "train.init_seeding=shared" in caplog.text


def test_best_runs_are_the_pareto_frontier(sweep_copy):
    out, rows = build_report(sweep_copy, device="cpu", log_media=False)
    done = [r for r in rows if r["l0"] > 0 and r["fvu"] > 0]
    front = set(runfacts.pareto([(r["l0"], r["fvu"]) for r in done]))
    expect = {r["run_id"] for r in done if (r["l0"], r["fvu"]) in front}
    assert expect and runfacts.frontier_ids(rows) == expect
    page = page_of(out)
    best = section(page, "best")
    assert {rid for rid in (r["run_id"] for r in rows) if f"★ {rid}" in best} == expect
    table = section(page, "runs")
    marked = set(re.findall(r'<tr class="done best"><td class="id" data-s="([^"]+)"', table))
    assert marked == expect


def test_table_is_sortable_offline_and_links_run_files(sweep_copy):
    (rundir.run_dir(sweep_copy, "r1-l1_1e-02-s0") / rundir.CURVE).unlink()
    out, rows = build_report(sweep_copy, device="cpu", log_media=False)
    page = page_of(out)
    assert "<script>" in page and "sortTable" in page and 'class="sortable"' in page
    assert page.count('<th data-col="') >= len(rows[0]) // 2
    links = Links()
    links.feed(page)
    for url in links.urls:  # no external resources: everything opens from disk
        assert "://" not in url and not url.startswith("//"), url
        if not url.startswith("#"):
            assert (out / url).is_file(), url
    files = {u for u in links.urls if u.startswith("../runs/")}
    for r in rows:
        for name in (rundir.METRICS, rundir.CFG, rundir.SPEC):
            assert f"../runs/{r['run_id']}/{name}" in files
    assert "../runs/r1-l1_1e-02-s0/metrics.jsonl" not in files  # missing files: no link
    assert "../runs/r1-l1_1e-02-s1/metrics.jsonl" in files
    fvu = {r["run_id"]: r["fvu"] for r in rows}
    cell = re.search(r'data-s="r2-l1_1e-02-s1">.*?</tr>', page).group(0)
    assert f'data-v="{fvu["r2-l1_1e-02-s1"]!r}"' in cell  # full precision for sorting


def test_page_defines_the_metrics(sweep_copy):
    out, _ = build_report(sweep_copy, device="cpu", log_media=False)
    defs = section(page_of(out), "definitions")
    for term in ("MMCS", "FVU", "L0", "gt_recovered", "loss recovered"):
        assert f"<dt>{term}</dt>" in defs
    assert "cosine &gt; 0.9" in defs and "0.1 nats" in defs
    assert 'title="fraction of variance unexplained' in page_of(out)  # header tooltips


def test_no_language_model_plot_for_synthetic_sweeps(sweep_copy):
    out, _ = build_report(sweep_copy, device="cpu", log_media=False)
    assert not (out / "lm_vs_l0.png").exists() and "lm_vs_l0" not in page_of(out)


def fake_lm_metrics(sweep_dir, gap: float, ids) -> dict[str, dict]:
    """Give runs language-model metrics, as a harvested store would (test data only)."""
    written = {}
    for rid in ids:
        folder = rundir.RunFolder.of(sweep_dir, rid)
        m = read_json(folder.path / rundir.METRICS)
        spliced = 3.0 + gap * min(1.0, m["fvu"]) - (0.0066 if gap < 0.1 else 0.0)
        lm = {"ce_loss_clean": 3.0, "ce_loss_ablated": 3.0 + gap, "ce_loss_spliced": spliced}
        lm["loss_recovered"] = (3.0 + gap - spliced) / gap
        folder.update_metrics(lm)
        written[rid] = lm
    return written


def test_weak_loss_recovered_is_flagged_not_hidden(sweep_copy):
    ids = [p.name for p in sorted((sweep_copy / "runs").iterdir())]
    weak = fake_lm_metrics(sweep_copy, 0.018, [i for i in ids if i.startswith("r1-")])
    fake_lm_metrics(sweep_copy, 2.0, [i for i in ids if i.startswith("r2-")])
    assert any(m["loss_recovered"] > 1 for m in weak.values())
    out, rows = build_report(sweep_copy, device="cpu", log_media=False)
    assert_png(out / "lm_vs_l0.png")
    page = page_of(out)
    assert "lm_vs_l0.png" in page and '<p class="note">† 6 run(s)' in page
    table = section(page, "runs")
    flagged = re.findall(r'data-s="([^"]+)">(?:(?!</tr>).)*<td class="weak"', table)
    assert sorted(flagged) == sorted(weak)
    assert "changed the loss by +0.018 nats" in table
    for rid, lm in weak.items():  # the metrics files keep their values
        m = read_json(rundir.run_dir(sweep_copy, rid) / rundir.METRICS)
        assert m["loss_recovered"] == lm["loss_recovered"]
    by_id = {r["run_id"]: r for r in rows}
    assert runfacts.weak_loss_recovered(by_id["r1-l1_1e-02-s0"])
    assert not runfacts.weak_loss_recovered(by_id["r2-l1_1e-02-s0"])


def test_ablation_gap_threshold():
    row = {"ce_loss_clean": 3.0, "ce_loss_ablated": 3.05, "loss_recovered": 1.2}
    assert runfacts.ablation_gap(row) == pytest.approx(0.05) and runfacts.weak_loss_recovered(row)
    row["ce_loss_ablated"] = 3.0 + runfacts.MIN_ABLATION_GAP + 0.01
    assert not runfacts.weak_loss_recovered(row)
    assert not runfacts.weak_loss_recovered({"loss_recovered": 1.2})  # no CE values: no claim


# ----------------------------------------------------------------------------- the plots


def test_dead_vs_l1_ticks_every_l1_and_fits_the_data():
    l1s = [1e-3, 3e-3, 1e-2, 3e-2, 1e-1]
    rows = [
        {"run_id": f"r{k}", "state": "done", "l1": v, "dict_ratio": 4.0, "dead_fraction": f}
        for k, (v, f) in enumerate(zip(l1s, [0.0, 0.01, 0.05, 0.2, 0.32], strict=True))
    ]
    ax = plots.dead_vs_l1_figure(rows).axes[0]
    assert ax.get_xscale() == "log"
    assert list(ax.get_xticks()) == pytest.approx(l1s)
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0.001", "0.003", "0.01", "0.03", "0.1"]
    lo, hi = ax.get_ylim()
    assert -0.1 < lo < 0 and 0.32 < hi < 0.4
    rows[0]["l1"] = 0.0  # an L1 of 0 still gets its tick (symlog)
    ax = plots.dead_vs_l1_figure(rows).axes[0]
    assert ax.get_xscale() == "symlog" and ax.get_xticks()[0] == 0.0


def test_mmcs_heatmap_scales_to_the_data(finished):
    """To the values between different runs (a run against itself, 1, compressed them)."""
    cross = crossdict.compute(SweepFolder(finished).read_runs(), torch.device("cpu"))
    fig = plots.mmcs_heatmap_figure(cross)
    values = [
        v for _, mat in cross.matrices.values() for i, row in enumerate(mat)
        for j, v in enumerate(row) if i != j
    ]  # fmt: skip
    for ax in fig.axes[::2]:  # each panel is followed by its colour bar
        lo, hi = ax.images[0].get_clim()
        assert lo == pytest.approx(min(values)) and hi == pytest.approx(max(values))
        assert min(t.get_fontsize() for t in ax.texts) >= 9  # 6 x 6 cells: legible numbers
    assert plots._cell_fontsize(40) is None  # large matrices: no numbers


def test_an_interrupted_report_keeps_the_pairs_it_computed(finished, tmp_path, monkeypatch):
    """The pair cache is saved while pairs are computed: a report stopped after two pairs
    computes only the others when run again, and gets the same values."""
    real, calls = metrics.max_cos_both, []

    def counted(a, b):  # noqa: ANN001, ANN202
        if len(calls) == stop_at:
            raise KeyboardInterrupt
        calls.append((a.shape, b.shape))
        return real(a, b)

    records, cpu = SweepFolder(finished).read_runs(), torch.device("cpu")
    monkeypatch.setattr(metrics, "max_cos_both", counted)
    monkeypatch.setattr(crossdict, "SAVE_EVERY", 0.0)
    stop_at = -1
    whole = crossdict.compute(records, cpu)
    pairs, stop_at = len(calls), 2
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        crossdict.compute(records, cpu, tmp_path / crossdict.CACHE)
    assert len(read_json(tmp_path / crossdict.CACHE)) == 2 * 2  # both directions of each
    calls.clear()
    stop_at = -1
    again = crossdict.compute(records, cpu, tmp_path / crossdict.CACHE)
    assert len(calls) == pairs - 2 and again.per_run == whole.per_run
    assert [m for _, m in again.matrices.values()] == [m for _, m in whole.matrices.values()]


def test_mmcs_progress_lines_say_about_how_long_is_left(finished, monkeypatch, caplog):
    """(a first report of a large grid computes for many minutes: each line says how long is
    left, paced by the pairs' sizes; the last one, nothing left, says no time)"""
    monkeypatch.setattr(crossdict, "SAVE_EVERY", 0.0)
    with caplog.at_level(logging.INFO, logger="sweep"):
        crossdict.compute(SweepFolder(finished).read_runs(), torch.device("cpu"))
    lines = [
        r.getMessage() for r in caplog.records if "pairs of dictionaries compared" in r.message
    ]
    assert len(lines) > 2 and re.search(r"; about \d\d:\d\d left$", lines[0]), lines
    assert lines[-1].endswith("compared"), lines


def test_a_large_grids_mmcs_matrix_covers_the_first_seed_thinned(finished, monkeypatch, caplog):
    """Above MATRIX_RUNS runs a ratio (`sweep report --matrix-runs`), the matrix's pairs (which grow with the
    square of the runs) are the first seed's, thinned evenly over L1; every run still gets its
    per-run values, the heatmap says what it shows, and the report says how many pairs."""
    records, cpu = SweepFolder(finished).read_runs(), torch.device("cpu")
    whole = crossdict.compute(records, cpu)
    real, calls = metrics.max_cos_both, []
    monkeypatch.setattr(metrics, "max_cos_both", lambda a, b: calls.append(1) or real(a, b))
    with caplog.at_level(logging.INFO, logger="sweep.crossdict"):
        thin = crossdict.compute(records, cpu, most=2)
    # per ratio 1 matrix pair + 3 seed pairs (6 runs: 3 L1 x 2 seeds); 6 next-ratio pairs
    assert len(calls) == 2 * (1 + 3) + 6 and "MMCS: comparing 14 pairs" in caplog.text
    assert thin.per_run == whole.per_run and thin.finished == {1.0: 6, 2.0: 6}
    for ratio, (refs, mat) in thin.matrices.items():
        every, full = whole.matrices[ratio]
        assert [r.seed for r in every] == [0, 1] * 3  # (by L1, then seed)
        assert refs == [every[0], every[4]]  # seed 0's smallest and largest L1
        assert mat == [[full[i][j] for j in (0, 4)] for i in (0, 4)]
    fig = plots.mmcs_heatmap_figure(thin, max_ratios=1)
    assert "(seed 0: 2 of the ratio's 6 runs)" in fig.axes[0].get_title()
    assert fig._suptitle.get_text() == "1 of the 2 dict ratios (1; mmcs.csv has every ratio)"
    calls.clear()
    none = crossdict.compute(records, cpu, most=0)  # (the per-run values' pairs only)
    assert len(calls) == 2 * 3 + 6 and none.per_run == whole.per_run
    assert none.matrices == {1.0: ([], []), 2.0: ([], [])} and crossdict.matrix_rows(none) == (
        [],
        [],
    )
    assert plots.mmcs_heatmap_figure(none) is None
    assert plots._no_matrix(none) == "left out: sweep report --matrix-runs 0"
    first = whole.matrices[1.0][0][0]
    lone = crossdict.CrossDict({1.0: ([first], [[1.0]])}, {}, {1.0: 4}, 2)  # (seed 0: one run)
    assert plots._no_matrix(lone).endswith("its first seed's: fewer than two finished")
    assert plots._no_matrix(crossdict.CrossDict({}, {}, {1.0: 1})).startswith("needs two")


def test_report_matrix_runs_option(sweep_copy, capsys):
    """`sweep report --matrix-runs N`: the matrices' runs (0: none, its heatmap says why);
    anything else than a whole number >= 0 is one line, exit 2."""
    assert main(["report", str(sweep_copy), "--no-wandb", "--matrix-runs", "0"]) == 0
    with open(sweep_copy / "report" / "mmcs.csv", newline="") as f:
        assert list(csv.reader(f)) == [["run_id"]]
    by_id = {r["run_id"]: r for r in read_csv(sweep_copy / "report" / "summary.csv")}
    assert all(0 < float(r["mmcs_seeds"]) <= 1 for r in by_id.values())
    assert main(["report", str(sweep_copy), "--no-wandb", "--matrix-runs", "4"]) == 0
    with open(sweep_copy / "report" / "mmcs.csv", newline="") as f:
        assert len(next(csv.reader(f))) == 1 + 2 * 3  # (6 a ratio > 4: seed 0's 3)
    capsys.readouterr()
    for bad in ("-1", "two"):
        with pytest.raises(SystemExit) as exit_:
            main(["report", str(sweep_copy), "--matrix-runs", bad])
        assert exit_.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "is not a whole number >= 0" in err[0], err


def test_training_curves_and_mmcs_vs_l1_plots(tmp_path):
    runs = [
        (
            {"run_id": f"r{i}", "state": "done" if i % 3 else "running", "l1": 10 ** -(i % 5),
             "dict_ratio": float(2 ** (i % 4))},
            [{"step": s, "rows": 256 * s, "loss": 1 / s, "fvu": 0.5 / s, "l0": 10 + i / s}
             for s in range(1, 30)],
        )
        for i in range(60)
    ]  # fmt: skip
    assert_png(plots.training_curves(runs, tmp_path / "curves.png"))
    assert_png(plots.training_curves([], tmp_path / "empty.png"))  # labelled placeholder
    rows = [dict(r, mmcs_next_ratio=0.6 + 0.01 * i, state="done") for i, (r, _) in enumerate(runs)]
    assert_png(plots.mmcs_next_vs_l1(rows, tmp_path / "mmcs_vs_l1.png"))
    lm = [dict(r, l0=5.0 + i, ce_loss_clean=3.0, ce_loss_ablated=3.02, ce_loss_spliced=3.01,
               loss_recovered=1.3) for i, r in enumerate(rows)]  # fmt: skip
    assert_png(plots.lm_vs_l0(lm, tmp_path / "lm.png"))  # every value marked as weak


def test_a_matryoshka_sweep_gets_its_levels_plot(tmp_path):
    """Runs with nested levels' FVU (sae=matryoshka's fvu_level_<i>) get levels.png, one line
    per finished run through each level to the whole dictionary; other sweeps get none."""
    rows = [
        {"run_id": f"r{r:g}-k{k}-s0", "k": k, "l1": None, "dict_ratio": float(r), "seed": 0,
         "arch": "matryoshka", "state": "done", "l0": float(k), "fvu": 0.1 / k,
         **{f"fvu_level_{i}": (0.1 / k) * (5 - i) for i in range(1, 5)}}
        for r in (2, 4) for k in (4, 8, 16)
    ]  # fmt: skip
    assert plots.has_levels(rows) and not plots.has_levels([{"fvu": 0.1}])
    assert plots._levels_of(rows[0]) == 4
    assert_png(plots.nested_levels(rows, tmp_path / "levels.png"))
    unfinished = [dict(r, state="running") for r in rows]
    assert_png(plots.nested_levels(unfinished, tmp_path / "none.png"))  # labelled placeholder


def test_a_run_with_one_curve_record_is_drawn_as_a_dot(tmp_path, monkeypatch):
    """A run shorter than train.log_every has one record: a line through one point draws
    nothing, so it is marked."""
    from matplotlib.axes import Axes

    drawn, real = [], Axes.plot

    def plot(self, *args, **kw):
        drawn.extend(line for line in real(self, *args, **kw) if len(line.get_xdata()))
        return drawn[-1:] if drawn else []

    monkeypatch.setattr(Axes, "plot", plot)
    row = {"run_id": "r", "state": "done", "l1": 0.01, "dict_ratio": 2.0}
    one = [{"step": 38, "rows": 9728, "loss": 0.5, "fvu": 0.2, "l0": 12.0}]
    assert_png(plots.training_curves([(row, one)], tmp_path / "one.png"))
    assert len(drawn) == 3 and all(line.get_marker() == "o" for line in drawn)


def test_report_hashes_weights_status_reads_their_size(sweep_copy):
    """A flipped byte keeps the weights' size: ``status`` (no weights read) still says done,
    the report (which reads every dictionary) does not build on it."""
    from sweep.status import status_rows

    rid = "r2-l1_1e-02-s0"
    weights = rundir.run_dir(sweep_copy, rid) / rundir.WEIGHTS
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert {r["run_id"]: r["state"] for r in status_rows(sweep_copy)}[rid] == "done"
    _, rows = build_report(sweep_copy, device="cpu", log_media=False)
    row = {r["run_id"]: r for r in rows}[rid]
    assert row["state"] != "done" and row.get("fvu") is None
    cached = read_json(sweep_copy / "report" / crossdict.CACHE)  # "a|b" -> value
    assert cached and not any(rid in pair.split("|") for pair in cached)


def weights_hashed(monkeypatch) -> collections.Counter:
    """Counts, per run, how often this process hashes a run's weights from now on (as a new
    process: what it hashed before is forgotten)."""
    monkeypatch.setattr(rundir, "_HASHED", {})
    hashed: collections.Counter = collections.Counter()
    real = rundir.file_sha256

    def counting(path, *args, **kwargs):
        if path.name == rundir.WEIGHTS:
            hashed[path.parent.name] += 1
        return real(path, *args, **kwargs)

    monkeypatch.setattr(rundir, "file_sha256", counting)
    return hashed


def test_a_report_hashes_each_runs_weights_once(sweep_copy, monkeypatch):
    """Its table and the sweep's summary.csv are of one check of each run's weights (at
    researcher sizes, a second hash of every dictionary took seconds a run)."""
    hashed = weights_hashed(monkeypatch)
    build_report(sweep_copy, device="cpu", log_media=False)
    ids = SweepFolder(sweep_copy).run_ids()
    assert hashed == dict.fromkeys(ids, 1)


def test_report_out_must_be_new_empty_or_an_earlier_report(sweep_copy, tmp_path, capsys):
    runs = sweep_copy / "runs"
    before = {p: p.read_bytes() for p in runs.rglob("*") if p.is_file()}
    assert main(["report", str(sweep_copy), "--out", str(runs)]) == 2
    err = capsys.readouterr().err.strip()
    assert "is inside its runs/ folder; pass a new folder with --out" in err and "\n" not in err
    assert {p: p.read_bytes() for p in runs.rglob("*") if p.is_file()} == before
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(runs / "r1-l1_1e-01-s0", elsewhere)
    assert main(["report", str(sweep_copy), "--out", str(elsewhere)]) == 2
    err = capsys.readouterr().err.strip()
    assert "holds files a report did not write (" in err and "\n" not in err
    out = tmp_path / "rep"
    assert main(["report", str(sweep_copy), "--out", str(out)]) == 0
    assert main(["report", str(sweep_copy), "--out", str(out)]) == 0  # an earlier report: replaced


def test_a_report_never_goes_into_another_sweeps_folder(finished, sweep_copy, capsys):
    """Its report/ folder is that sweep's own: replacing it would show this sweep's runs
    under that sweep's name."""
    theirs = finished / "report"
    build_report(finished, device="cpu", log_media=False)
    capsys.readouterr()  # (its log lines)
    before = {p: p.read_bytes() for p in finished.rglob("*") if p.is_file()}
    for out in (theirs, finished / "other", finished):
        assert main(["report", str(sweep_copy), "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert f"is inside another sweep folder ({finished.resolve()})" in err, err
        assert "\n" not in err
    assert {p: p.read_bytes() for p in finished.rglob("*") if p.is_file()} == before
    for inside in ("store", "report"):  # (the default report would refuse its sub-folder)
        assert main(["report", str(sweep_copy), "--out", str(sweep_copy / inside / "r")]) == 2
        assert f"is inside its {inside}/ folder; pass a new folder" in capsys.readouterr().err
    assert main(["report", str(sweep_copy), "--out", str(sweep_copy / "vs-other")]) == 0
    (young := sweep_copy.parent / "theirs").mkdir()  # a sweep not yet at its runs
    (young / "config.yaml").write_text("{}")
    (young / "manifest.json").write_text("{damaged")
    assert main(["report", str(sweep_copy), "--out", str(young / "report")]) == 2
    assert "is inside another sweep folder" in capsys.readouterr().err


def test_terminal_table_marks_weak_loss_recovered(capsys):
    lm = {"state": "done", "fvu": 0.1, "l0": 3.0, "ce_loss_clean": 3.0}
    rows = [
        {"run_id": "weak", **lm, "ce_loss_ablated": 3.01, "loss_recovered": 1.4},
        {"run_id": "fine", **lm, "ce_loss_ablated": 5.0, "loss_recovered": 0.9},
    ]
    table.print_table(rows)
    out = capsys.readouterr().out
    assert "1.4 †" in out and "0.9 †" not in out
    assert "loss_recovered not meaningful" in " ".join(out.split())  # the caption says why
    table.print_table(rows[1:])
    assert "†" not in capsys.readouterr().out


def test_a_tables_column_writes_its_numbers_with_one_number_of_decimals(capsys):
    """(58 beside 57.75 read as a rounded value), at most MAX_DECIMALS of them; a value they
    would leave fewer than 3 of its significant digits (one that would read 0, grid values
    1e-4 and 1.5e-4) keeps 4 of its own; one just short of a whole number does not read as
    it; summary.csv every digit."""
    from sweep.cells import column_texts

    def texts(*values: object) -> list[str]:
        return [t["c"] for t in column_texts([{"c": v} for v in values], ["c"])]

    assert texts(57.75, 58.0, 3.91649, 12345.6) == ["57.750", "58.000", "3.916", "12345.600"]
    assert texts(0.5, 0.000123, float("nan"), 0.0) == ["0.5000", "0.000123", "nan", "0.0000"]
    assert texts(0.001953125, 0.09766, 0.4961) == ["0.001953", "0.0977", "0.4961"]
    assert texts(5e-5, 1e-4, 1.5e-4, 0.01) == ["5e-05", "0.0001", "0.00015", "0.0100"]
    assert texts(0.01, 0.5, 0.25) == ["0.01", "0.50", "0.25"]  # (0.5 keeps all it has)
    assert texts(-0.0, -0.3, 58, None) == ["0.0", "-0.3", "58.0", ""]  # (-0.0; an int)
    assert texts(32, None, True) == ["32", "", "True"]
    assert texts(1 - 1 / 32768, 0.5, 1.0) == ["0.99997", "0.5", "1.0"]  # (not all dead)
    assert texts(57.99999, 57.75) == ["57.99999", "57.75"]
    assert texts(3e-3, 1e38, 2.5e9) == ["0.003", "1e+38", "2.5e+09"]  # (not 39 digits)
    rows = [
        {"run_id": "a", "state": "done", "l0": 57.75, "fvu": 0.5},
        {"run_id": "b", "state": "done", "l0": 58.0, "fvu": 0.000123},
    ]
    table.print_table(rows)
    out = capsys.readouterr().out
    assert all(f" {t} " in out for t in ("57.75", "58.00", "0.5000", "0.000123"))


def test_terminal_table_says_when_runs_were_measured_by_earlier_metrics(capsys):
    """A sweep begun by an earlier version of sweep, its grid extended by this one: its old
    runs' cossim counted zero rows, and they lack l2_norm_in/out; the table says so, once."""
    from sweep.sweepdir import METRICS_VERSION

    new = {"state": "done", "l0": 3.0, "fvu": 0.2, "metrics_version": METRICS_VERSION}
    rows = [{"run_id": "old", "state": "done", "l0": 2.0, "fvu": 0.3}, {"run_id": "new", **new}]
    table.print_table(rows)
    out = " ".join(capsys.readouterr().out.split())
    assert "1 finished run(s) were measured by an earlier version of sweep's metrics" in out
    assert "`sweep evaluate` on this sweep measures them again from their weights" in out
    table.print_table(rows[1:])
    assert "earlier version" not in capsys.readouterr().out


def test_terminal_table_of_a_large_grid_lists_its_frontier(capsys, monkeypatch):
    """(hundreds of lines would scroll the run's log away); notes cover every run."""
    monkeypatch.setattr(table, "TABLE_ROWS", 4)
    points = [(1, 0.5), (2, 0.3), (4, 0.1), (2.5, 0.4), (5, 0.2), (6, 0.9), (1.5, 0.6)]
    points += [(3, 0.35), (4.5, 0.15)]  # the first three are the frontier
    rows = [
        {"run_id": f"r{i}", "state": "done", "l1": 0.01, "l0": l0, "fvu": fvu}
        for i, (l0, fvu) in enumerate(points)
    ] + [{"run_id": "bad", "state": "failed", "note": "out of memory"}]
    table.print_table(rows)
    out = capsys.readouterr().out
    listed = {r["run_id"] for r in rows if re.search(rf"\b{r['run_id']}\b", out)}
    assert listed == {"r0", "r1", "r2", "bad"} == runfacts.frontier_ids(rows) | {"bad"}
    assert "10 runs: the 3 on the FVU–L0 frontier above; every run in summary.csv" in out
    assert all(f"r{i} ★" in out for i in range(3)) and table.BEST_CAPTION in out
    assert "bad (failed): out of memory" in out
    table.print_table(rows[:4])
    assert "frontier above" not in capsys.readouterr().out
    monkeypatch.setattr(table, "TABLE_ROWS", 2)  # a frontier longer than the table
    table.print_table(rows)
    out = " ".join(capsys.readouterr().out.split())
    assert "10 runs: the first 2 of the 3 on the FVU–L0 frontier above" in out


def test_terminal_table_fits_a_narrow_terminal_and_keeps_cells_whole(capsys, monkeypatch):
    """On a terminal, tables are as wide as it is: compact, then without the columns that
    matter least (said under it); no run id or number is ever broken. In a file or a pipe,
    as wide as they need."""
    rows = [
        {"run_id": f"r32-l1_1.5e-0{i}-s0", "state": "done", "fvu": 0.123456, "l0": 12.5,
         "dead_fraction": 0.25, "rows_trained": 123456789, "gt_mmcs": 0.95}
        for i in range(3)
    ]  # fmt: skip
    table.print_table(rows)
    wide = capsys.readouterr().out.splitlines()
    assert max(map(len, wide)) > 60
    monkeypatch.setenv("FORCE_COLOR", "1")  # rich: a terminal
    monkeypatch.setenv("COLUMNS", "60")
    table.print_table(rows)
    narrow = re.sub(r"\x1b\[[0-9;]*m", "", capsys.readouterr().out).splitlines()  # styles
    assert max(map(len, narrow)) <= 60 and len(narrow) > len(wide)
    assert all(any(r["run_id"] in line for line in narrow) for r in rows)
    assert sum("0.1235" in line for line in narrow) == 3  # every fvu whole
    monkeypatch.setenv("COLUMNS", "40")
    table.print_table(rows)
    narrower = re.sub(r"\x1b\[[0-9;]*m", "", capsys.readouterr().out)
    assert "0.1235" in narrower and "(too narrow for dead_fraction, gt_mmcs" in narrower


def test_a_table_with_a_text_column_breaks_no_run_id_at_any_width():
    """``--plan``'s table (its runs wrap at spaces): cells with spaces ("52.31 GiB") were
    measured by their longest word, so at 79-80 columns a boxed table passed as fitting and
    then broke its run ids."""
    from io import StringIO

    from rich.console import Console

    from sweep.console import fit_table

    cols = ["ensemble", "dict_ratio", "dict_size", "members", "asks", "memory", "runs"]
    rows = [
        [f"r{r}-e0", str(r), str(r * 2304), "25", "1 GPU", "52.31 GiB",
         ", ".join(f"r{r}-k{k}-s{s}" for k in (16, 256) for s in range(5))]
        for r in (4, 128)
    ]  # fmt: skip
    for width in range(60, 121):
        console = Console(file=StringIO(), width=width)
        fit_table(console, "sweep plan", cols, rows, ("dict_size", "asks"), ("runs",)).print(
            console
        )
        words = console.file.getvalue().replace(",", " ").split()
        assert all(i in words for row in rows for i in row[-1].replace(",", "").split()), width


def test_the_terminal_table_says_what_l1_is_for_jumprelu_runs(capsys):
    """The run ids and the column say l1; for JumpReLU it is the L0 coefficient."""
    from sweep.table import L0_CAPTION, print_table

    row = {"run_id": "r2-l1_1e-02-s0", "l1": 0.01, "dict_ratio": 2, "state": "done", "l0": 5.0}
    print_table([{**row, "arch": "jumprelu"}])
    assert L0_CAPTION in " ".join(capsys.readouterr().out.split())
    print_table([{**row, "arch": "untied"}])
    assert "L0 coefficient" not in capsys.readouterr().out
