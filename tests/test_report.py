"""`sweep report`: cross-dictionary MMCS, density data, summary/mmcs CSVs, plots, HTML, API."""

from __future__ import annotations

import csv
import json
import shutil

import pytest
import torch
from matplotlib import image as mpimg

import sweep
from sweep import crossdict, metrics, plots, rundir
from sweep.cli import main
from sweep.errors import SweepError
from sweep.report import build_report
from tests.sweep_builder import L1S, build_sweep

PNGS = ("frontier.png", "mmcs_heatmap.png", "dead_vs_l1.png", "density.png")


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
    d = crossdict.load_density(folder)
    final = rundir.read_json(folder / rundir.METRICS)
    f = 32  # width 16 x ratio 2
    assert d["frequency"].shape == (f,) and d["log10_hist_counts"].shape == (40,)
    assert int(d["log10_hist_counts"].sum()) + int(d["dead_count"][0]) == f
    assert float(d["frequency"].mean() * f) == pytest.approx(
        final["l0"], rel=1e-6
    )  # sum of frequencies = L0
    assert float((d["frequency"] == 0).double().mean()) == final["dead_fraction"]


def test_density_counts_dead_features_separately():
    freq = torch.tensor([0.0, 0.0, 1e-3, 0.5, 1.0], dtype=torch.float64)
    t = crossdict.density_tensors(freq)
    assert int(t["dead_count"][0]) == 2 and int(t["log10_hist_counts"].sum()) == 3


def test_max_cos_both_matches_reference():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(50, 8, generator=g), torch.randn(70, 8, generator=g)
    ua, ub = a / a.norm(dim=1, keepdim=True), b / b.norm(dim=1, keepdim=True)
    ab, ba = crossdict.max_cos_both(ua, ub, chunk=16)  # several row blocks
    torch.testing.assert_close(ab, metrics.mmcs(a, b))
    torch.testing.assert_close(ba, metrics.mmcs(b, a))


def test_pareto_frontier():
    pts = [(1, 0.9), (2, 0.5), (3, 0.6), (4, 0.2), (5, 0.2), (0.5, 1.0)]
    assert plots.pareto(pts) == [(0.5, 1.0), (1, 0.9), (2, 0.5), (4, 0.2)]


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
    assert by_id["r1-l1_1e-03-s1"]["mmcs_next_ratio_run"] == "r2-l1_1e-03-s1"
    assert by_id["r2-l1_1e-03-s1"]["mmcs_next_ratio"] == ""  # no larger ratio in the sweep
    assert all(0 < float(r["mmcs_seeds"]) <= 1 for r in rows)
    assert (sweep_copy / "summary.csv").is_file()  # the sweep-level summary is refreshed too
    html = (report / "index.html").read_text()
    assert all(name in html for name in PNGS) and "r1-l1_1e-02-s0" in html and "summary.csv" in html


def test_mmcs_values_are_consistent(sweep_copy):
    build_report(sweep_copy, device="cpu", log_media=False)
    a_id, b_id = "r1-l1_1e-02-s0", "r2-l1_1e-02-s0"
    a = crossdict.unit_atoms(rundir.run_dir(sweep_copy, a_id), torch.device("cpu"))
    b = crossdict.unit_atoms(rundir.run_dir(sweep_copy, b_id), torch.device("cpu"))
    expect = float(metrics.mmcs(a, b).mean())
    m = rundir.read_json(rundir.run_dir(sweep_copy, a_id) / rundir.METRICS)
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
        float(rundir.read_json(rundir.run_dir(sweep_copy, i) / rundir.SPEC)["l1"]) for i in r1
    ] == sorted([l1 for l1 in L1S for _ in range(2)])


def test_second_report_reuses_cached_mmcs(sweep_copy, monkeypatch):
    build_report(sweep_copy, log_media=False)
    first = (sweep_copy / "report" / "mmcs.csv").read_text()

    def boom(*a, **k):
        raise AssertionError("MMCS recomputed although cached")

    monkeypatch.setattr(crossdict, "max_cos_both", boom)
    build_report(sweep_copy, log_media=False)
    assert (sweep_copy / "report" / "mmcs.csv").read_text() == first


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


def test_report_without_runs_is_an_error(tmp_path, capsys):
    rundir.atomic_write_json(tmp_path / "manifest.json", {"runs": {}})
    assert main(["report", str(tmp_path)]) == 2
    assert "lists no runs" in capsys.readouterr().err


def test_load_sweep_table_and_lazy_saes(sweep_copy):
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
    with pytest.raises(SweepError, match="no run"):
        sw.sae("nope")
    assert sum(1 for _ in sw.saes()) == 11


def test_metrics_json_keeps_its_other_values(sweep_copy):
    folder = rundir.run_dir(sweep_copy, "r1-l1_1e-02-s0")
    before = rundir.read_json(folder / rundir.METRICS)
    build_report(sweep_copy, log_media=False)
    after = json.loads((folder / rundir.METRICS).read_text())
    assert {k: after[k] for k in before} == before and "mmcs_next_ratio" in after
