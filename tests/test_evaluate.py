"""``sweep evaluate``: finished runs' metrics computed again from their verified weights.

Each test starts from a copy of one real finished sweep (real Ray, real Hydra, real files),
makes its metrics look like an older version's, and checks that the command gives back exactly
the metrics training wrote, keeps the old ones in the run's events, never writes weights or
``cfg.json``, and leaves runs that are not finished or fail their checks as they are.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest

import sweep
from sweep import rundir
from sweep.cli import main
from sweep.errors import SweepError
from tests.test_integrity import GRID, one_line_error
from tests.test_report import weights_hashed
from tests.test_sweep_e2e import TINY

KEPT = (rundir.WEIGHTS, rundir.CFG, rundir.CURVE, rundir.SPEC)
"""What evaluating never writes."""


@pytest.fixture(scope="module")
def finished(ray_cluster, tmp_path_factory) -> Path:
    sw = tmp_path_factory.mktemp("evaluate") / "sw"
    assert main(["run", f"sweep_dir={sw}", *TINY, *GRID]) == 0
    return sw


@pytest.fixture
def copy(finished, tmp_path) -> Path:
    shutil.copytree(finished, tmp_path / "sw")
    return tmp_path / "sw"


def runs(sweep_dir: Path) -> list[Path]:
    return sorted((sweep_dir / "runs").iterdir())


def files(folder: Path, names: tuple[str, ...] = KEPT) -> dict[str, bytes]:
    return {n: (folder / n).read_bytes() for n in names if (folder / n).is_file()}


def metrics(folder: Path) -> dict:
    return json.loads((folder / rundir.METRICS).read_text())


def as_older_version(folder: Path) -> dict:
    """Its metrics as a version that lacked explained variance would have written them."""
    old = {k: v for k, v in metrics(folder).items() if k != "explained_variance"}
    (folder / rundir.METRICS).write_text(json.dumps(old))
    return old


def events(folder: Path) -> list[dict]:
    path = folder / rundir.EVENTS
    return [json.loads(ln) for ln in path.read_text().splitlines()] if path.is_file() else []


def previous(folder: Path) -> dict:
    """The metrics its latest evaluation replaced, as its events recorded them (before it
    wrote the new ones, which its last event then says)."""
    before, after = events(folder)[-2:]
    assert before["event"] == "evaluating_again" and after["event"] == "evaluated_again"
    assert before["reason"] == after["reason"]
    return before["previous_metrics"]


def test_every_finished_run_gets_the_metrics_training_wrote(copy, capsys):
    """The metrics come back bit-equal to what training wrote (the same evaluation, from the
    same weights); the older ones are kept in the run's events; weights, cfg.json, the
    training curve and spec.json are not written; summary.csv has the metric again."""
    trained = {f.name: metrics(f) for f in runs(copy)}
    kept = {f.name: files(f) for f in runs(copy)}
    older = {f.name: as_older_version(f) for f in runs(copy)}
    assert main(["evaluate", str(copy)]) == 0
    err = " ".join(capsys.readouterr().err.split())
    assert "evaluating 4 finished run(s) again from their weights" in err
    assert "evaluated again, done" in err
    for f in runs(copy):
        assert metrics(f) == trained[f.name]
        assert files(f) == kept[f.name]
        assert rundir.RunFolder(f).is_done(deep=True)
        assert events(f)[-1]["reason"] == "sweep evaluate"
        assert previous(f) == older[f.name]
    with open(copy / "summary.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 4 and all(r["explained_variance"] for r in rows)


def test_each_runs_weights_are_hashed_once(copy, monkeypatch):
    """Picking the runs and the summary.csv after are of one check of each run's weights,
    remembered (``verified.json``): the next evaluation hashes none."""
    hashed = weights_hashed(monkeypatch)
    assert main(["evaluate", str(copy)]) == 0
    assert hashed == {f.name: 1 for f in runs(copy)}
    hashed = weights_hashed(monkeypatch)
    assert main(["evaluate", str(copy)]) == 0 and not hashed


def test_named_runs_only_and_a_damaged_one_is_left_as_it_is(copy, capsys):
    """``--runs`` evaluates those runs only; a named run whose weights fail their checksum is
    named and left (``sweep resume`` trains it again), the others are evaluated."""
    good, bad, other = (
        copy / "runs" / r for r in ("r2-l1_1e-03-s0", "r1-l1_1e-01-s0", "r1-l1_1e-03-s0")
    )
    weights = bytearray((bad / rundir.WEIGHTS).read_bytes())
    weights[-1] ^= 1
    (bad / rundir.WEIGHTS).write_bytes(bytes(weights))
    before_bad = files(bad, tuple(p.name for p in bad.iterdir()))
    before_other = files(other, tuple(p.name for p in other.iterdir()))
    assert main(["evaluate", str(copy), "--runs", good.name, bad.name]) == 0
    err = " ".join(capsys.readouterr().err.split())
    assert f"run {bad.name}: damaged (sae.safetensors fails its checksum); not evaluated" in err
    assert events(good)[-1]["reason"] == "sweep evaluate"
    with open(copy / "summary.csv") as fh:  # (it said "done", with its old metrics)
        row = {r["run_id"]: r for r in csv.DictReader(fh)}[bad.name]
    assert row["state"] != "done" and "sae.safetensors fails its checksum" in row["note"]
    assert files(bad, tuple(p.name for p in bad.iterdir())) == before_bad
    assert files(other, tuple(p.name for p in other.iterdir())) == before_other


def test_a_run_that_lost_its_metrics_is_evaluated_too(copy):
    folder = copy / "runs" / "r2-l1_1e-01-s0"
    trained = metrics(folder)
    (folder / rundir.METRICS).unlink()
    with pytest.raises(SweepError, match="evaluates it again from its weights$"):
        sweep.load_run(folder)  # (not "train it again": it is not)
    assert main(["evaluate", str(copy), "--runs", folder.name]) == 0
    assert metrics(folder) == trained
    assert previous(folder) == {}


def test_a_damaged_spec_is_warned_of_once(copy, capsys):
    """(Once per read: four times in one evaluation.) The run is evaluated still."""
    folder = copy / "runs" / "r2-l1_1e-01-s0"
    (folder / rundir.SPEC).write_text("{bad")
    assert main(["evaluate", str(copy), "--runs", folder.name]) == 0
    err = capsys.readouterr().err
    assert err.count("spec.json is unreadable") == 1, err
    assert events(folder)[-1]["reason"] == "sweep evaluate"


def test_metrics_edited_into_other_types_are_damaged_and_evaluated_again(copy):
    """(Taken as a finished run's: "abc" and [1] in the tables, off the frontier.)"""
    folder = copy / "runs" / "r2-l1_1e-01-s0"
    trained = metrics(folder)
    rundir.atomic_write_json(folder / rundir.METRICS, {**trained, "fvu": "abc", "l0": [1]})
    assert rundir.RunFolder(folder).final_problem() == rundir.METRICS_LOST
    for edited in ({**trained, "gt_mmcs": "abc"}, {"state": "done"}, {**trained, "l0": True}):
        rundir.atomic_write_json(folder / rundir.METRICS, edited)
        assert rundir.RunFolder(folder).final_problem() == rundir.METRICS_LOST, edited
    assert main(["evaluate", str(copy), "--runs", folder.name]) == 0
    assert metrics(folder) == trained
    nan = {**trained, "fvu": float("nan")}  # (a number: rows that do not vary have no FVU)
    rundir.atomic_write_json(folder / rundir.METRICS, nan)
    assert rundir.RunFolder(folder).final_problem() is None


def test_runs_an_earlier_grid_left_are_evaluated_too(copy, capsys):
    """The last command's grid (config.yaml) holds half the runs; the manifest holds all."""
    assert main(["run", f"sweep_dir={copy}", *TINY, "grid.l1=[1e-3]", "grid.dict_ratio=[1,2]"]) == 0
    older = {f.name: as_older_version(f) for f in runs(copy)}
    assert main(["evaluate", str(copy)]) == 0
    assert "evaluating 4 finished run(s)" in " ".join(capsys.readouterr().err.split())
    for f in runs(copy):
        assert previous(f) == older[f.name]
        assert "explained_variance" in metrics(f)
    assert main(["evaluate", str(copy), "--runs", "r1-l1_1e-01-s0"]) == 0  # (the earlier grid's)


def test_a_sweep_whose_manifest_was_deleted_evaluates_its_grid(copy):
    (copy / "manifest.json").unlink()
    folder = copy / "runs" / "r1-l1_1e-01-s0"
    older = as_older_version(folder)
    assert main(["evaluate", str(copy), "--runs", folder.name]) == 0
    assert previous(folder) == older
    assert main(["status", str(copy)]) == 0  # (the manifest is written again, as a run would)


def test_unfinished_runs_are_named_in_one_line_and_left(copy, capsys):
    """Runs never finished (no DONE, no final weights) are one warning, not one each."""
    left = [copy / "runs" / r for r in ("r1-l1_1e-03-s0", "r1-l1_1e-01-s0")]
    for f in left:
        for name in (rundir.DONE, rundir.WEIGHTS):
            (f / name).unlink()
    before = {f.name: files(f, tuple(p.name for p in f.iterdir())) for f in left}
    assert main(["evaluate", str(copy), "--runs", "r2-l1_1e-01-s0", *(f.name for f in left)]) == 0
    err = " ".join(capsys.readouterr().err.split())
    assert "2 run(s) not finished, not evaluated (r1-l1_1e-03-s0, r1-l1_1e-01-s0);" in err
    assert f"'sweep resume {copy}' finishes them" in err
    assert {f.name: files(f, tuple(p.name for p in f.iterdir())) for f in left} == before


def test_a_failed_evaluation_records_no_evaluation(copy, capsys):
    """A run whose new files could not be written gets no evaluated_again event (only the
    evaluating_again that began it), its ensemble-mates not reached none; the ensemble fails
    in one line (the runs stay final) and other ensembles are evaluated."""
    first, mate = (copy / "runs" / r for r in ("r1-l1_1e-03-s0", "r1-l1_1e-01-s0"))
    (first / rundir.DENSITY).unlink()
    (first / rundir.DENSITY).mkdir()  # (its write fails)
    said = {f.name: events(f) for f in (first, mate)}
    assert main(["evaluate", str(copy)]) == 2
    one_line_error(capsys.readouterr().err, "1 ensemble(s) failed", "r1-e0-eval")
    assert events(first)[:-1] == said[first.name]
    assert events(first)[-1]["event"] == "evaluating_again" and events(mate) == said[mate.name]
    assert rundir.RunFolder(first).is_done(deep=True) and not (first / rundir.FAILED).exists()
    assert events(copy / "runs" / "r2-l1_1e-01-s0")[-1]["event"] == "evaluated_again"


def test_a_failed_evaluation_of_lost_metrics_marks_the_run_failed(copy, capsys):
    """In a sweep run, a run that lost its metrics is not final: when its evaluation fails,
    status says failed (not pending), and the next run evaluates it again."""
    folder = copy / "runs" / "r2-l1_1e-01-s0"
    (folder / rundir.METRICS).unlink()
    (folder / rundir.DENSITY).unlink()
    (folder / rundir.DENSITY).mkdir()
    assert main(["run", f"sweep_dir={copy}", *TINY, *GRID]) == 2
    one_line_error(capsys.readouterr().err, "1 ensemble(s) failed", "r2-e0-eval")
    assert main(["status", str(copy)]) == 0
    row = next(ln for ln in capsys.readouterr().out.splitlines() if folder.name in ln)
    assert "failed" in row
    (folder / rundir.DENSITY).rmdir()
    assert main(["run", f"sweep_dir={copy}", *TINY, *GRID]) == 0
    assert events(folder)[-1]["event"] == "evaluated_again"


def test_a_run_of_a_sweep_before_checksums_is_evaluated_when_its_weights_load(copy, capsys):
    """DONE without checksums (an older sweep's): evaluated when its weights load; when its
    metrics are lost too, nothing vouches for the rest, so it is named and left."""
    old, lost = (copy / "runs" / r for r in ("r1-l1_1e-01-s0", "r1-l1_1e-03-s0"))
    for f in (old, lost):
        done = json.loads((f / rundir.DONE).read_text())
        (f / rundir.DONE).write_text(json.dumps({"state": done["state"], "finished": 1.0}))
    (lost / rundir.METRICS).unlink()
    assert main(["evaluate", str(copy), "--runs", old.name, lost.name]) == 0
    err = " ".join(capsys.readouterr().err.split())
    assert f"run {lost.name}: metrics.json is missing or damaged, and DONE holds no" in err
    assert previous(old)["fvu"] == metrics(old)["fvu"] and not events(lost)


def test_overrides_and_the_sweep_folder_may_follow_the_run_ids(copy):
    """(``--runs`` takes every word after it: the sweep folder among them was "required")"""
    folder = copy / "runs" / "r2-l1_1e-03-s0"
    assert main(["evaluate", str(copy), "--runs", folder.name, "launch.num_cpus=1"]) == 0
    assert events(folder)[-1]["reason"] == "sweep evaluate"
    assert main(["evaluate", "--runs", folder.name, str(copy)]) == 0
    assert len([e for e in events(folder) if e["event"] == "evaluated_again"]) == 2


def test_a_store_moved_elsewhere_is_named_by_data_path(copy, tmp_path, capsys):
    """The store moved (to another disk, say): evaluated there; the sweep's own place for it
    stays empty (not generated again), and another store is refused as the run refuses it."""
    moved = tmp_path / "elsewhere"
    shutil.move(copy / "store", moved)
    folder = copy / "runs" / "r2-l1_1e-03-s0"
    before = metrics(folder)
    assert main(["evaluate", str(copy), "--runs", folder.name, f"data.path={moved}"]) == 0
    assert not (copy / "store").exists() and metrics(folder)["fvu"] == before["fvu"]
    other = tmp_path / "other"
    assert main(["run", f"sweep_dir={tmp_path / 'o'}", *TINY, "data.seed=7", *GRID,
                 f"data.path={other}", "grid.l1=[1e-3]", "grid.dict_ratio=[1]"]) == 0  # fmt: skip
    capsys.readouterr()
    assert main(["evaluate", str(copy), f"data.path={other}"]) == 2
    assert "different" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args, words",
    [
        (["--runs", "r3-l1_1e-03-s0"], ("no run r3-l1_1e-03-s0 in the grid", "sweep status")),
        (["grid.l1=[5e-1]"], ("every grid the sweep ran", "'grid.l1=[5e-1]'", "--runs")),
        (["train.lr=0.5"], ("recorded settings", "launch.*, logger.*, train.device", "'train.lr=")),
        (["data.eval_rows=64"], ("recorded settings", "not 'data.eval_rows=64'")),
        (["sae=topk"], ("sweep evaluate takes field overrides", "not 'sae=topk'")),
        (["launch=local"], ("not 'launch=local'; pass launch.name=local launch.address=null",)),
        (["sweep_dir=/elsewhere"], ("sweep evaluate works on the sweep folder it is given",)),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(copy, args, words, capsys):
    """Nothing is written but sweep.log's lines."""
    before = {p: p.read_bytes() for p in copy.rglob("*") if p.is_file() and p.name != "sweep.log"}
    assert main(["evaluate", str(copy), *args]) == 2
    one_line_error(capsys.readouterr().err, *words)
    after = {p: p.read_bytes() for p in copy.rglob("*") if p.is_file() and p.name != "sweep.log"}
    assert after == before


def test_a_sweep_with_no_finished_run_is_refused(copy, capsys):
    for f in runs(copy):
        (f / rundir.DONE).unlink()
    assert main(["evaluate", str(copy)]) == 2
    one_line_error(capsys.readouterr().err, "no finished run to evaluate", "sweep resume")


def test_a_folder_that_is_no_sweep_is_one_line(tmp_path, capsys):
    assert main(["evaluate", str(tmp_path / "nothing")]) == 2
    one_line_error(capsys.readouterr().err)


def test_an_unknown_run_id_is_refused_before_the_store_is_made_again(copy, capsys):
    """A mistyped run id costs nothing: refused before a deleted store is generated again
    (minutes at real sizes) and before the store is read."""
    shutil.rmtree(copy / "store")
    assert main(["evaluate", str(copy), "--runs", "r3-l1_1e-03-s0"]) == 2
    one_line_error(capsys.readouterr().err, "no run r3-l1_1e-03-s0 in the grid")
    assert not (copy / "store").exists()
