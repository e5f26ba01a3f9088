"""Nothing silently wrong: damaged inputs are detected, every fault is a one-line message.

Each test damages real files of a real sweep (or races real processes) the way a power loss,
a full disk, a careless copy or a second driver would, and checks that the result is either
correct (bit-identical to an undamaged sweep) or refused with one line, never wrong with exit 0.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import logging
import multiprocessing as mp
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import sweep
from sweep import checkpoints, planning, rundir
from sweep import lock as lock_module
from sweep.cli import main
from sweep.config import ConfigError, TrainConfig
from sweep.errors import SweepError
from sweep.io import STALE_TEMP_SECONDS, atomic_write_json, file_stamp, read_json
from sweep.lock import EVALUATING, SweepLock
from sweep.sweepdir import SweepFolder
from sweep.worker import train_ensemble
from tests.conftest import refused
from tests.lock_racer import take_lock
from tests.sweep_builder import jobs
from tests.test_report import weights_hashed
from tests.test_sweep_e2e import TINY

GRID = ["grid.l1=[1e-3,1e-1]", "grid.dict_ratio=[1,2]"]


def run(sweep_dir: Path, *extra: str) -> int:
    return main(["run", f"sweep_dir={sweep_dir}", *TINY, *GRID, *extra])


def preview(sweep_dir: Path) -> int:
    return main(["run", "--plan", f"sweep_dir={sweep_dir}", *TINY, *GRID])


def weights(sweep_dir: Path) -> dict[str, str]:
    return {
        r.name: hashlib.sha256((r / rundir.WEIGHTS).read_bytes()).hexdigest()
        for r in sorted((sweep_dir / "runs").iterdir())
    }


@pytest.fixture(scope="module")
def finished(ray_cluster, tmp_path_factory) -> Path:
    sw = tmp_path_factory.mktemp("integrity") / "sw"
    assert run(sw) == 0
    return sw


@pytest.fixture
def copy(finished, tmp_path) -> Path:
    shutil.copytree(finished, tmp_path / "sw")
    return tmp_path / "sw"


def one_line_error(err: str, *words: str) -> None:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert lines and lines[-1].startswith(("error:", "interrupted:")), err
    assert "Traceback" not in err, err
    for w in words:
        assert w in lines[-1], lines[-1]


# ------------------------------------------------------------------ 1. checkpoint metadata


def interrupted_job(store, tmp_path: Path, stop_at: int = 20):
    job = jobs(store, tmp_path, l1s=(1e-3, 3e-2), ratios=(2.0,), seeds=1, epochs=2)[0]
    n = iter(range(10**6))
    train_ensemble(job, should_stop=lambda: next(n) + 1 >= stop_at)
    return job


def test_checkpoint_metadata_is_inside_the_checksum(tiny_store, tmp_path, caplog):
    """A changed cursor digit in ONE member's newest checkpoint: the whole ensemble continues
    from the older common step, every member says so, and the result is still exact."""
    ref = jobs(tiny_store, tmp_path / "ref", l1s=(1e-3, 3e-2), ratios=(2.0,), seeds=1, epochs=2)
    train_ensemble(ref[0])
    job = interrupted_job(tiny_store, tmp_path / "cut")
    folder = rundir.run_dir(tmp_path / "cut", job.ensemble.members[0].run_id)
    newest = checkpoints.list_checkpoints(folder)[-1]
    data = newest.read_bytes()
    at = data.index(b'\\"chunk\\": ') + len(b'\\"chunk\\": ')  # the cursor, in the header
    digit = int(data[at : at + 1])
    newest.write_bytes(data[:at] + str((digit + 1) % 10).encode() + data[at + 1 :])
    with pytest.raises(ValueError, match="checksum"):
        checkpoints.load_checkpoint(newest)
    with caplog.at_level(logging.WARNING, logger="sweep.restore"):
        assert train_ensemble(job).resumed_from == 14  # the previous common checkpoint
    events = [json.loads(ln) for ln in (folder / rundir.EVENTS).read_text().splitlines()]
    assert [e["event"] for e in events] == ["bad_checkpoint", "resume_fallback"]
    assert newest.name in events[0]["detail"] and "checksum" in events[1]["reason"]
    other = rundir.run_dir(tmp_path / "cut", job.ensemble.members[1].run_id)
    (fallback,) = [json.loads(ln) for ln in (other / rundir.EVENTS).read_text().splitlines()]
    assert fallback["event"] == "resume_fallback"  # sound, but dragged back with its ensemble
    assert (fallback["newest"], fallback["resumed_from"]) == (20, 14)
    assert f"{folder.name}: checkpoint {newest.name} fails its checksum" in fallback["reason"]
    for d in (folder, other):
        assert (
            f"run {d.name} (ensemble r2-e0): newest checkpoint is step 20 but resuming from step 14"
            in caplog.text
        )
    assert weights(tmp_path / "cut") == weights(tmp_path / "ref")


# ------------------------------------------------------------------ 2. DONE is not trusted alone


@pytest.mark.parametrize("damage", ["delete", "truncate", "flip"])
def test_damaged_final_weights_are_retrained(copy, damage, capsys):
    before = weights(copy)
    victim = copy / "runs" / "r2-l1_1e-01-s0" / rundir.WEIGHTS
    data = victim.read_bytes()
    original = copy.parent / "original.safetensors"
    original.write_bytes(data)
    if damage == "delete":
        victim.unlink()
    elif damage == "truncate":
        victim.write_bytes(data[:100])
    else:  # same size, one bit changed: only the checksum in DONE catches it
        victim.write_bytes(data[:-9] + bytes([data[-9] ^ 1]) + data[-8:])
    assert run(copy) == 0
    err = " ".join(capsys.readouterr().err.split())  # rich wraps long lines
    assert "r2-l1_1e-01-s0" in err and "training it again" in err
    after = weights(copy)
    assert {k: v for k, v in after.items() if k != victim.parent.name} == {
        k: v for k, v in before.items() if k != victim.parent.name
    }
    again = load_file(victim)  # retrained alone (an ensemble of one: equal up to float order)
    for k, v in load_file(original).items():
        torch.testing.assert_close(again[k], v, rtol=1e-4, atol=1e-5)


def test_finished_weights_are_hashed_once_and_remembered(finished, copy, monkeypatch, capsys):
    """The worker that wrote a run's weights remembers them (``verified.json``: their file as
    it was then); a copy (new files) hashes each run's once at a re-run, which remembers it
    (``--plan`` hashes, remembering nothing), and no more after; a bit flipped in place, its
    mtime put back, is still caught (its ctime moved). One process hashes a file once."""
    for r in (finished / "runs").iterdir():
        recorded = json.loads((r / rundir.VERIFIED).read_text())
        assert recorded["file"] == file_stamp(r / rundir.WEIGHTS)
        assert (
            recorded["weights_sha256"]
            == json.loads((r / rundir.DONE).read_text())["weights_sha256"]
        )
    hashed = weights_hashed(monkeypatch)
    stamps = {r.name: (r / rundir.VERIFIED).read_bytes() for r in (copy / "runs").iterdir()}
    assert preview(copy) == 0 and hashed == dict.fromkeys(stamps, 1)
    assert {r: (copy / "runs" / r / rundir.VERIFIED).read_bytes() for r in stamps} == stamps
    assert preview(copy) == 0 and hashed == dict.fromkeys(stamps, 1)  # (this process knows)
    hashed = weights_hashed(monkeypatch)  # (the next ones as new processes)
    assert run(copy) == 0 and hashed == dict.fromkeys(stamps, 1)
    hashed = weights_hashed(monkeypatch)
    assert run(copy) == 0 and preview(copy) == 0 and not hashed
    victim = copy / "runs" / "r2-l1_1e-01-s0" / rundir.WEIGHTS
    was = victim.stat()
    with open(victim, "r+b") as fh:
        fh.seek(was.st_size - 9)
        byte = fh.read(1)
        fh.seek(was.st_size - 9)
        fh.write(bytes([byte[0] ^ 1]))
    os.utime(victim, ns=(was.st_atime_ns, was.st_mtime_ns))
    capsys.readouterr()
    assert run(copy) == 0
    err = " ".join(capsys.readouterr().err.split())
    assert (
        f"run {victim.parent.name}: {rundir.WEIGHTS} fails its checksum; training it again" in err
    )


@pytest.mark.parametrize("name", [rundir.METRICS, rundir.DONE, rundir.CFG])
def test_garbage_in_final_files_is_no_traceback(copy, name, capsys):
    (copy / "runs" / "r1-l1_1e-03-s0" / name).write_text("{not json")
    assert main(["status", str(copy)]) == 0
    assert main(["report", str(copy), "--no-wandb"]) == 0
    assert run(copy) == 0  # the damaged run is trained again
    assert "Traceback" not in capsys.readouterr().err
    m = json.loads((copy / "runs" / "r1-l1_1e-03-s0" / rundir.METRICS).read_text())
    assert m["state"] == "done"


@pytest.mark.parametrize("name", [rundir.DONE, rundir.CFG, rundir.WEIGHTS, rundir.METRICS])
def test_a_final_file_that_could_not_be_read_is_no_reason_to_retrain(
    copy, name, monkeypatch, capsys
):
    """An error reading a finished run's file (permissions, the disk) proves nothing about
    it: the re-run stops in one line naming it, the results as they were (taken for damaged,
    the run was trained again over them)."""
    before = weights(copy)
    victim = copy / "runs" / "r2-l1_1e-01-s0" / name
    monkeypatch.setattr(rundir, "read_json", refused(rundir.read_json, victim))
    monkeypatch.setattr(rundir, "file_sha256", refused(rundir.file_sha256, victim))
    assert run(copy) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"run r2-l1_1e-01-s0: could not read {name} (PermissionError" in err
    assert "training it again" not in err and weights(copy) == before
    assert main(["status", str(copy)]) == 0  # (the other runs listed; it, with the reason)
    said = " ".join(capsys.readouterr().out.split())
    assert (f"could not read {name}" in said) is (name != rundir.WEIGHTS)  # (status hashes none)
    assert ("1 run(s) could not be read: mend the cause" in said) is (name != rundir.WEIGHTS)
    assert "re-run its command to finish them" not in said
    summary = (copy / "summary.csv").read_bytes()
    assert main(["report", str(copy), "--no-wandb"]) == 0
    assert (copy / "summary.csv").read_bytes() == summary  # (its row would go blank)
    assert main(["export", str(copy), "--to", "saelens", str(copy.parent / "ex")]) == 2
    err = " ".join(capsys.readouterr().err.split())  # (not "damaged: re-run the sweep")
    assert f"could not read {name}" in err and "or pass --finished to export the 3" in err
    assert "are damaged" not in err
    monkeypatch.undo()
    assert run(copy) == 0 and weights(copy) == before


def test_a_verification_that_cannot_be_remembered_is_no_error(copy, monkeypatch):
    """``verified.json`` not written (a full disk, a permission) costs a hash next time."""
    run = rundir.RunFolder(copy / "runs" / "r1-l1_1e-03-s0")
    stale = (run.path / rundir.VERIFIED).read_bytes()  # (the copy's files are new)
    write = refused(rundir.atomic_write_json, rundir.VERIFIED)
    monkeypatch.setattr(rundir, "atomic_write_json", write)
    assert run.final_problem(deep=True, remember=True) is None
    assert (run.path / rundir.VERIFIED).read_bytes() == stale


def test_a_run_that_could_not_be_read_stops_the_plan_before_another_is_judged(
    copy, monkeypatch, capsys
):
    """A re-run that also trains (a new grid value) checks every finished run before it
    judges any: one that could not be read stops it in one line, and a damaged one before it
    in the grid is neither warned of nor recorded (it would be again at the next re-run)."""
    damaged = copy / "runs" / "r2-l1_1e-03-s0"
    (damaged / rundir.METRICS).write_text("{not json")
    events = (damaged / rundir.EVENTS).read_bytes() if (damaged / rundir.EVENTS).exists() else b""
    victim = copy / "runs" / "r1-l1_1e-01-s0" / rundir.DONE
    monkeypatch.setattr(rundir, "read_json", refused(rundir.read_json, victim))
    grid = ["grid.l1=[1e-3,1e-2,1e-1]", "grid.dict_ratio=[1,2]"]
    assert main(["run", f"sweep_dir={copy}", *TINY, *grid]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "run r1-l1_1e-01-s0: could not read DONE (PermissionError" in err
    assert "evaluating it again" not in err and "r2-l1_1e-03-s0" not in err
    now = (damaged / rundir.EVENTS).read_bytes() if (damaged / rundir.EVENTS).exists() else b""
    assert now == events


def test_status_names_the_runs_it_could_not_read_and_the_others_to_re_run(tmp_path, monkeypatch):
    from sweep import status

    monkeypatch.setattr(status.SweepFolder, "activity", lambda self: "done")
    monkeypatch.setattr(status.SweepFolder, "last_grid", lambda self: None)
    rows = [{"run_id": "a", "state": "pending", "unread": True}, {"run_id": "b", "state": "pending"},
            {"run_id": "c", "state": "done"}]  # fmt: skip
    word, said = status._activity(tmp_path, rows)
    assert word == "incomplete" and said.startswith("1 run(s) could not be read: mend the cause")
    assert said.endswith("; 1 other run(s) are no longer finished: then re-run its command")
    word, said = status._activity(tmp_path, rows[:1])
    assert said.endswith("a re-run stops at them, keeping their results")


def test_final_weights_whose_done_was_deleted_are_said_to_be_retrained(copy, capsys):
    folder = copy / "runs" / "r1-l1_1e-03-s0"
    (folder / rundir.DONE).unlink()
    assert main(["status", str(copy)]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "DONE, which vouches for sae.safetensors, is missing: a sweep run whose grid" in out
    assert run(copy) == 0
    err = " ".join(capsys.readouterr().err.split())
    assert (
        "run r1-l1_1e-03-s0: DONE, which vouches for sae.safetensors, is missing; training" in err
    )
    assert rundir.RunFolder(folder).is_done(deep=True)


@pytest.mark.parametrize("damage", ["delete", "garbage"])
def test_lost_metrics_are_evaluated_again_from_the_verified_weights(copy, damage, capsys):
    """Weights and cfg.json verify against DONE: the run is not trained again (hours at real
    sizes) but evaluated again, to the same metrics, in an ensemble of its own; what DONE
    vouches for is not rewritten. Its ensemble-mate, whose DONE is gone, is trained again."""
    folder, mate = (copy / "runs" / rid for rid in ("r2-l1_1e-01-s0", "r2-l1_1e-03-s0"))
    kept = (rundir.WEIGHTS, rundir.CURVE, rundir.CFG)
    before = {n: (folder / n).read_bytes() for n in kept}
    metrics = json.loads((folder / rundir.METRICS).read_text())
    if damage == "delete":
        (folder / rundir.METRICS).unlink()
    else:
        (folder / rundir.METRICS).write_text("{not json")
    (mate / rundir.DONE).unlink()
    assert main(["status", str(copy)]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "damaged: a sweep run whose grid has it evaluates it again from its weights" in out
    from sweep.status import status_rows

    (row,) = [r for r in status_rows(copy) if r["run_id"] == folder.name]
    assert row["rows_trained"] == row["rows_saved"] == row["rows_total"]  # nothing to train
    assert preview(copy) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "2 already done, 1 to train, 1 to evaluate again from their weights, in 2 ens" in out
    assert run(copy) == 0
    err = " ".join(capsys.readouterr().err.split())
    assert "metrics.json is missing or damaged; evaluating it again from its weights" in err
    assert {n: (folder / n).read_bytes() for n in kept} == before  # (no step trained)
    assert json.loads((folder / rundir.METRICS).read_text()) == metrics
    assert rundir.RunFolder(folder).is_done(deep=True) and rundir.RunFolder(mate).is_done()
    events = [json.loads(ln)["event"] for ln in (folder / rundir.EVENTS).read_text().splitlines()]
    assert events[-3:] == ["damaged_result", "evaluating_again", "evaluated_again"]
    manifest = json.loads((copy / "manifest.json").read_text())["runs"]
    assert manifest[folder.name]["ensemble"] == "r2-e0-eval"  # (apart from the trained mate)
    assert manifest[mate.name]["ensemble"] == "r2-e0-resume"  # (r2-e0 its mate keeps)


def test_a_diverged_run_is_evaluated_again_as_diverged(copy):
    """DONE's state says whether a run diverged (diverged.json, which it does not vouch for,
    only gives the step): a stale diverged.json beside a done run changes nothing."""
    run_ = rundir.RunFolder(copy / "runs" / "r1-l1_1e-03-s0")
    (run_.path / rundir.DIVERGED).write_text(json.dumps({"step": 3}))
    (run_.path / rundir.METRICS).unlink()
    assert run_.unevaluable() is None and run_.evaluated_step() is None
    done = json.loads((run_.path / rundir.DONE).read_text())
    (run_.path / rundir.DONE).write_text(json.dumps({**done, "state": "diverged"}))
    assert run_.evaluated_step() == 3
    from sweep.status import status_rows

    (row,) = [r for r in status_rows(copy) if r["run_id"] == run_.path.name]
    batch = json.loads((run_.path / "spec.json").read_text())["train"]["batch_size"]
    assert row["rows_trained"] == 2 * batch  # (step 3 diverged: its weights hold 2 updates)
    (run_.path / rundir.DIVERGED).unlink()  # a diverged run without its step: trained again
    assert (
        run_.unevaluable()
        == "diverged, and diverged.json (the step it froze at) is missing or damaged"
    )


def test_an_edited_cfg_is_not_final_and_never_loads(copy, capsys):
    """cfg.json is what a loader trusts (act_scale, architecture): DONE vouches for its bytes."""
    folder = copy / "runs" / "r1-l1_1e-03-s0"
    cfg = json.loads((folder / rundir.CFG).read_text())
    (folder / rundir.CFG).write_text(json.dumps({**cfg, "act_scale": 2 * cfg["act_scale"]}))
    assert rundir.RunFolder(folder).final_problem() == f"{rundir.CFG} fails its checksum"
    with pytest.raises(SweepError, match="fails its checksum; re-run its sweep"):
        sweep.load_run(folder)
    assert run(copy) == 0  # trained again
    assert sweep.load_run(folder).cfg["act_scale"] == cfg["act_scale"]


def test_a_run_being_trained_again_does_not_load_its_old_weights(copy):
    folder = copy / "runs" / "r1-l1_1e-03-s0"
    (folder / rundir.DONE).unlink()  # what a re-run does before training a damaged run again
    with pytest.raises(SweepError, match="is not finished"):
        sweep.load_run(folder)
    from sweep.status import status_rows

    (row,) = [r for r in status_rows(copy) if r["run_id"] == folder.name]
    assert (row["state"], row["rows_trained"]) == ("pending", 0)  # its old curve is redone


# ------------------------------------------------------------------ 3. store identity


def test_another_store_of_the_same_width_is_refused(ray_cluster, tmp_path, capsys):
    from sweep.activations.synthetic import ensure_synthetic_store
    from sweep.cli import compose
    from sweep.config import to_sweep_config

    a, b = tmp_path / "a", tmp_path / "b"
    for path, seed in ((a, 0), (b, 1)):  # the stores `sweep run` would make, made directly
        cfg = to_sweep_config(compose([f"sweep_dir={tmp_path}", *TINY, f"data.seed={seed}"]))
        ensure_synthetic_store(cfg.data, path, "cpu", progress=False)
    sw = tmp_path / "sw"
    train = [x for x in TINY if not x.startswith("data.")] + ["data.eval_rows=2048"]
    assert main(["run", f"sweep_dir={sw}", *train, "data=chunks", f"data.path={a}", *GRID]) == 0
    before = {p: p.read_bytes() for p in sw.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert main(["run", f"sweep_dir={sw}", *train, "data=chunks", f"data.path={b}", *GRID]) == 2
    one_line_error(capsys.readouterr().err, "not the store", "seed 0 -> 1")
    after = {p: p.read_bytes() for p in sw.rglob("*") if p.is_file() and p.name != "sweep.log"}
    assert after == {p: v for p, v in before.items() if p.name != "sweep.log"}
    moved = tmp_path / "moved"
    shutil.copytree(a, moved)  # the same store elsewhere is the same store
    assert main(["run", f"sweep_dir={sw}", *train, "data=chunks", f"data.path={moved}", *GRID]) == 0


def test_a_flipped_bit_in_a_chunk_is_caught(ray_cluster, tmp_path, capsys):
    store = tmp_path / "store"
    assert main(["run", f"sweep_dir={tmp_path / 'sw'}", *TINY, f"data.path={store}", *GRID]) == 0
    chunk = store / "chunk_00001.npy"
    arr = np.load(chunk)
    arr.view(np.uint32)[5, 3] ^= 1 << 3  # a small change to one float: no NaN, no inf
    np.save(chunk, arr)
    capsys.readouterr()
    assert main(["run", f"sweep_dir={tmp_path / 'sw2'}", *TINY, f"data.path={store}", *GRID]) == 2
    one_line_error(capsys.readouterr().err, "chunk_00001.npy", "checksum")


# ------------------------------------------------------------------ 4. result-defining fields


@pytest.mark.parametrize("field", ["lr_warmup=0.1", "lr_decay=0.1", "l1_warmup=0.05"])
def test_schedule_changes_are_refused_on_resume(copy, field, capsys):
    config = (copy / "config.yaml").read_bytes()
    assert run(copy, f"train.{field}") == 2
    one_line_error(
        capsys.readouterr().err, "different settings", field.split("=")[0], "sweep resume"
    )
    assert (copy / "config.yaml").read_bytes() == config
    assert main(["resume", str(copy)]) == 0  # the hint works: the recorded settings


def test_a_setting_that_does_nothing_does_not_lock_the_sweep(copy):
    """An AuxK weight on a ReLU SAE, a resampling schedule with resampling off, a dead-latent
    window with no remedy on: warned about (in sweep.log too), never a different sweep (they
    change no run)."""
    before = weights(copy)
    changed = ["train.auxk_alpha=0.5", "train.resample_stop=0.9", "train.dead_tokens=5000"]
    assert run(copy, *changed) == 0
    log = (copy / "sweep.log").read_text()
    assert "WARNING sweep.driver: train.auxk_alpha=0.5 does nothing for sae=untied" in log
    assert "train.dead_tokens=5,000 does nothing here: no dead-latent remedy is on" in log
    assert run(copy) == 0
    assert main(["resume", str(copy), "train.auxk_alpha=0.25"]) == 0
    assert weights(copy) == before
    assert run(copy, "train.resample_dead=100") == 2  # one that does something still locks


def test_resume_reads_its_overrides_as_run_does(copy):
    """Through Hydra's grammar (its functions; ``no`` is text, not YAML 1.1's false), not a
    second reading of their own that crashed on what `sweep run` takes."""
    from sweep.cli import load_saved

    cfg = load_saved(
        str(copy), ["launch.num_cpus=int(2.0)", "logger.project=no", "logger.entity=0x1F"]
    )
    assert (cfg.launch.num_cpus, cfg.logger.project, cfg.logger.entity) == (2, "no", "0x1F")
    cfg = load_saved(str(copy), ["train.checkpoint_every=${train.log_every}"])
    assert cfg.train.checkpoint_every == cfg.train.log_every == 5  # (recorded; default 50)
    with pytest.raises(ConfigError, match=r"^train.log_every: Interpolation key 'oops' not f"):
        load_saved(str(copy), ["train.log_every=${oops}"])  # (a traceback)


@pytest.mark.parametrize(
    "override, words",
    [
        ("train.lr=0.5", ("different settings", "without overriding those fields")),
        ("train.lrr=1", ("unknown config field 'train.lrr'", "--cfg job")),
        ("sae=topk", ("takes field overrides", "not 'sae=topk'", "'sweep run'")),
        ("hydra.verbose=true", ("not Hydra's own settings", "drop it")),
        ("hydra/job_logging=disabled", ("not Hydra's own settings",)),
    ],
)
def test_resume_with_a_bad_override_is_one_line(copy, override, words, capsys):
    before = {p: p.read_bytes() for p in copy.rglob("*") if p.is_file()}
    assert main(["resume", str(copy), override]) == 2
    one_line_error(capsys.readouterr().err, *words)
    assert {p: p.read_bytes() for p in copy.rglob("*") if p.is_file()} == before


def test_every_train_field_is_classified():
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    defining, free = set(planning.DEFINING["train"]), set(planning.FREE["train"])
    assert defining | free == names and not defining & free


# ------------------------------------------------------------------ 5. the lock, raced


@pytest.mark.parametrize("stale", [False, True])
def test_drivers_started_together_never_both_hold_the_lock(tmp_path, stale):
    ctx = mp.get_context("spawn")
    for trial in range(3):
        folder = tmp_path / f"t{trial}"
        folder.mkdir()
        if stale:
            info = {"host": socket.gethostname(), "pid": 2**22 + 7, "started": 0}
            (folder / ".lock").write_text(json.dumps(info))
        barrier, results = ctx.Barrier(6), ctx.Queue()
        procs = [
            ctx.Process(target=take_lock, args=(str(folder), barrier, results)) for _ in range(6)
        ]
        for p in procs:
            p.start()
        for p in procs:
            p.join(60)
        got = sorted(results.get(timeout=5) for _ in procs)
        assert got.count("held") == 1, got


def _lock_of_this_process(folder: Path, started: float, beat: float) -> None:
    """A lock naming this host and pid, written at ``started``, its heartbeat at ``beat``."""
    info = {"host": socket.gethostname(), "pid": os.getpid(), "started": started}
    (folder / ".lock").write_text(json.dumps(info))
    os.utime(folder / ".lock", (beat, beat))


def test_a_dead_drivers_lock_whose_pid_came_back_is_stale(tmp_path, caplog):
    """A driver killed an hour ago, its pid taken since by a process that began after its lock
    (here this one: a job re-queued in a container gets the same pids): taken over, not
    "being run by pid N" forever. A pid alive since before the lock and silent (a driver
    held by SIGSTOP; here the parent process) still holds it."""
    began, hour_ago = lock_module._began_at(os.getpid()), time.time() - 3600
    if began is None:
        pytest.skip("no /proc here: a live pid holds its lock")
    assert began > hour_ago
    _lock_of_this_process(tmp_path, started=hour_ago, beat=hour_ago)
    with caplog.at_level(logging.WARNING), SweepLock(tmp_path):
        assert "taking over a stale lock" in caplog.text
    _lock_of_this_process(tmp_path, started=time.time(), beat=time.time() - 3600)
    info = {**read_json(tmp_path / ".lock"), "pid": os.getppid()}  # alive since before it
    (tmp_path / ".lock").write_text(json.dumps(info))
    os.utime(tmp_path / ".lock", (time.time() - 3600, time.time() - 3600))
    with pytest.raises(SweepError, match="is being run by pid"):
        SweepLock(tmp_path).__enter__()


def test_a_lock_naming_this_process_that_holds_none_is_stale(tmp_path, caplog):
    """A re-queued job in a container may get the dead driver's pid: a lock naming this very
    process, fresh or not, is a dead driver's unless this process holds it."""
    _lock_of_this_process(tmp_path, started=time.time(), beat=time.time())
    with caplog.at_level(logging.WARNING), SweepLock(tmp_path):
        assert "taking over a stale lock" in caplog.text


def test_a_lock_that_cannot_be_read_is_not_taken_over(tmp_path, monkeypatch, capsys):
    """A live driver's lock another user's umask keeps from us (or a network file system's
    error) is no dead driver's: taking it over, two drivers trained the sweep at once."""
    with SweepLock(tmp_path):
        held = (tmp_path / ".lock").read_bytes()
    (tmp_path / ".lock").write_bytes(held)  # (as a live driver holds it)
    monkeypatch.setattr(Path, "read_text", refused(Path.read_text, ".lock"))
    with pytest.raises(SweepError, match="could not read the sweep's lock .* a driver may be"):
        SweepLock(tmp_path).__enter__()
    assert (tmp_path / ".lock").read_bytes() == held
    with pytest.raises(SweepError, match="could not read the sweep's lock"):
        SweepFolder(tmp_path).driver()  # (status, stop: none runs, they said)


def test_a_lock_that_cannot_be_removed_leaves_the_real_error(tmp_path, caplog, monkeypatch):
    """A sweep folder made read-only (or a full disk's) lock that cannot be removed is
    warned about: the error the sweep ended with (a stop, a failure) is still what it says
    (the next driver takes the dead one's lock over)."""
    monkeypatch.setattr(Path, "unlink", refused(Path.unlink, ".lock"))
    with caplog.at_level(logging.WARNING), pytest.raises(KeyboardInterrupt):
        with SweepLock(tmp_path):
            raise KeyboardInterrupt
    assert "could not remove the lock" in caplog.text and (tmp_path / ".lock").exists()
    monkeypatch.undo()
    with caplog.at_level(logging.WARNING), SweepLock(tmp_path):
        assert "taking over a stale lock" in caplog.text


def test_a_lock_copied_with_a_running_sweep_does_not_hold_the_copy(tmp_path, caplog):
    """``cp -r`` of a sweep while its driver runs copies the lock too: the copy is a sweep of
    its own (the lock names the original folder), the original stays held."""
    import shutil

    original, copy = tmp_path / "a", tmp_path / "b"
    original.mkdir()
    with SweepLock(original):
        info = {**read_json(original / ".lock"), "pid": os.getppid(), "started": 0.0}
    assert info["folder"] == lock_module.folder_id(original)
    (original / ".lock").write_text(json.dumps(info))  # a live driver's (the parent process)
    shutil.copytree(original, copy)
    with caplog.at_level(logging.WARNING), SweepLock(copy):
        assert "taking over a stale lock" in caplog.text
    with pytest.raises(SweepError, match="is being run by pid"):
        SweepLock(original).__enter__()
    del info["folder"]  # a lock written before locks named their folder: held, as before
    (copy / ".lock").write_text(json.dumps(info))
    with pytest.raises(SweepError, match="is being run by pid"):
        SweepLock(copy).__enter__()


def test_an_empty_lock_is_taken_over_and_a_full_disk_leaves_no_lock_temp(
    tmp_path, monkeypatch, caplog
):
    """An empty lock (a crash while an older sweep wrote it: the lock is now on disk before it
    is linked) is stale, said as such; a lock that cannot be written leaves no temp file."""
    (tmp_path / ".lock").write_text("")
    with caplog.at_level(logging.WARNING), SweepLock(tmp_path):
        assert (
            "taking over a stale lock (unreadable: its driver died while writing it)" in caplog.text
        )
        assert read_json(tmp_path / ".lock")["pid"] == os.getpid()

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(lock_module.os, "fsync", full)
    with pytest.raises(OSError, match="No space left"):
        SweepLock(tmp_path).__enter__()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock-guard"]


@pytest.mark.parametrize("text", ["[]", "0", '{"host": "HOST"}', '{"host": "HOST", "pid": -1}'])
def test_a_lock_without_a_pid_is_stale_once_silent(tmp_path, caplog, text):
    """A damaged lock (not an object, no pid of this host: os.kill(-1, 0) succeeds, so it
    held forever) is taken over once its heartbeat is old, as an unreadable one."""
    (tmp_path / ".lock").write_text(text.replace("HOST", socket.gethostname()))
    os.utime(tmp_path / ".lock", (time.time() - 3600, time.time() - 3600))
    with caplog.at_level(logging.WARNING), SweepLock(tmp_path):
        assert "taking over a stale lock" in caplog.text


def test_a_fresh_lock_of_another_host_is_waited_for_until_stale(tmp_path, monkeypatch, caplog):
    """A SLURM job re-queued on another node right after its driver died there: the lock's
    heartbeat is still fresh; the new driver waits for it to go stale instead of failing."""
    monkeypatch.setattr(lock_module, "STALE_AFTER", 3.0)
    info = {"host": "another-node", "pid": 4321, "started": time.time() - 600}
    (tmp_path / ".lock").write_text(json.dumps(info))
    t0 = time.monotonic()
    with caplog.at_level(logging.WARNING), SweepLock(tmp_path):
        assert 1.0 < time.monotonic() - t0 < 10.0
        assert "whose heartbeat is fresh; waiting" in caplog.text
        assert "taking over a stale lock left by pid 4321 on another-node" in caplog.text


def test_a_fresh_lock_whose_pid_began_after_it_is_waited_for_until_stale(
    tmp_path, monkeypatch, caplog
):
    """A driver just killed in a container, the job re-queued at once: its pid (small, as
    every container's) belongs to a process that began after the lock, whose heartbeat is
    still fresh. The new driver waits for it to go stale, then takes over (it failed with
    "being run by pid N" for the heartbeat's two minutes)."""
    import subprocess

    if lock_module._began_at(os.getpid()) is None:
        pytest.skip("no /proc here: a live pid holds its lock")
    monkeypatch.setattr(lock_module, "STALE_AFTER", 3.0)
    other = subprocess.Popen(["sleep", "60"])  # (began now: after the lock below)
    try:
        info = {"host": socket.gethostname(), "pid": other.pid, "started": time.time() - 600}
        (tmp_path / ".lock").write_text(json.dumps(info))
        t0 = time.monotonic()
        with caplog.at_level(logging.WARNING), SweepLock(tmp_path):
            assert 1.0 < time.monotonic() - t0 < 10.0
            assert f"locked by pid {other.pid} on {socket.gethostname()}, whose heartbeat" in (
                caplog.text
            )
            assert "taking over a stale lock" in caplog.text
    finally:
        other.kill()
        other.wait()


def test_a_heartbeat_in_flight_as_the_lock_is_released_never_writes_it_back(tmp_path, monkeypatch):
    """The heartbeat thread touching the lock while the driver releases it: the touch found
    it gone and wrote it back (as it does a lock removed by hand), leaving a released sweep
    locked by a process about to end."""
    import threading

    inside, go, real = threading.Event(), threading.Event(), os.utime

    def slow_utime(path, *args, **kw):
        inside.set()
        go.wait(5)
        return real(path, *args, **kw)

    held = SweepLock(tmp_path).__enter__()
    monkeypatch.setattr(lock_module.os, "utime", slow_utime)
    touch = threading.Thread(target=held._touch)
    touch.start()
    assert inside.wait(5)
    release = threading.Thread(target=held.release)
    release.start()
    time.sleep(0.2)  # (the release waits for the touch in flight)
    go.set()
    touch.join(5)
    release.join(5)
    assert not (tmp_path / ".lock").exists()


def test_a_lock_removed_while_its_driver_runs_is_written_again(tmp_path, caplog):
    """Removed by hand (thought stale), the lock comes back at the next heartbeat instead of
    the driver dying on it (a stop without checkpoints) or another driver starting."""
    with SweepLock(tmp_path) as held:
        (tmp_path / ".lock").unlink()
        with caplog.at_level(logging.WARNING):
            held.heartbeat(every=0.0)
        assert read_json(tmp_path / ".lock")["pid"] == os.getpid()
        assert "was removed while this driver runs; wrote it again" in caplog.text
        with pytest.raises(SweepError, match="is being run by pid"):
            SweepLock(tmp_path).__enter__()
    assert not (tmp_path / ".lock").exists()


# ------------------------------------------------------------------ 7. torn curve tail


def test_a_torn_curve_line_is_dropped_and_training_continues(tiny_store, tmp_path):
    ref = jobs(tiny_store, tmp_path / "ref", l1s=(1e-3, 3e-2), ratios=(2.0,), seeds=1, epochs=2)
    train_ensemble(ref[0])
    job = interrupted_job(tiny_store, tmp_path / "cut")
    for m in job.ensemble.members:
        with open(rundir.run_dir(tmp_path / "cut", m.run_id) / rundir.CURVE, "a") as f:
            f.write('{"step": 99, "lo')  # what a power loss leaves
    train_ensemble(job)
    assert weights(tmp_path / "cut") == weights(tmp_path / "ref")
    for m in job.ensemble.members:
        a, b = (rundir.run_dir(tmp_path / d, m.run_id) / rundir.CURVE for d in ("ref", "cut"))
        assert a.read_text() == b.read_text()


# ------------------------------------------------------------------ 8. disk full


@pytest.fixture
def small_disk(tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=200k", "tmpfs", str(mnt)]).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)])


def test_disk_full_is_one_line_and_a_copy_resumes(ray_cluster, small_disk, tmp_path, capsys):
    store = tmp_path / "store"
    ref = tmp_path / "ref"
    args = [*TINY, f"data.path={store}", "grid.l1=[1e-3,1e-2,1e-1]", "grid.dict_ratio=[4,8]"]
    assert main(["run", f"sweep_dir={ref}", *args]) == 0
    capsys.readouterr()
    sw = small_disk / "sw"
    assert main(["run", f"sweep_dir={sw}", *args]) == 2
    one_line_error(capsys.readouterr().err, "no space left", "free space")
    moved = tmp_path / "moved"
    shutil.copytree(sw, moved)
    assert main(["run", f"sweep_dir={moved}", *args]) == 0
    assert weights(moved) == weights(ref)
    assert not list(moved.rglob(".*.tmp"))
    shutil.rmtree(sw)
    with contextlib.suppress(OSError), open(small_disk / "filler", "wb") as f:
        while True:  # the disk full of something else: an export (which trains nothing) to it
            f.write(b"\0" * 4096)
            f.flush()
    capsys.readouterr()
    assert main(["export", str(ref), "--to", "saelens", str(small_disk / "out")]) == 2
    err = capsys.readouterr().err
    one_line_error(err, "no space left")
    assert err.strip().endswith(
        "; free space and re-run the same command; what it wrote before is intact"
    )


def test_a_read_only_sweep_is_refused_by_what_writes_into_it(ray_cluster, tmp_path, capsys):
    """(root ignores permissions: a read-only mount) status and a report elsewhere work;
    evaluate and report say what they write and the way out, in one line."""
    mnt = tmp_path / "ro"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=20m", "tmpfs", str(mnt)]).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        sw = mnt / "sw"
        assert run(sw) == 0
        subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
        capsys.readouterr()
        assert main(["evaluate", str(sw)]) == 2
        err = capsys.readouterr().err
        one_line_error(err, f"sweep_dir {sw} is not writable (Read-only file system)")
        assert err.strip().endswith(
            "; sweep evaluate writes its runs' metrics there: make it writable"
        )
        assert main(["report", str(sw)]) == 2
        err = capsys.readouterr().err
        assert err.strip().endswith(
            "is not writable (Read-only file system); choose another with --out DIR"
        )
        assert main(["status", str(sw)]) == 0
        assert main(["report", str(sw), "--out", str(tmp_path / "rep")]) == 0
        fix = "make it writable, or copy the sweep folder to a writable disk and run the copy"
        for plan in ([], ["--plan"]):  # (another folder would train the sweep from nothing)
            assert run(sw, *plan) == 2
            assert capsys.readouterr().err.strip().endswith(fix)
        assert run(mnt / "new") == 2
        assert capsys.readouterr().err.strip().endswith("; choose another folder")
    finally:
        subprocess.run(["umount", "-l", str(mnt)])


def test_a_sweep_stopped_while_making_its_store_is_not_told_to_go_elsewhere(tmp_path):
    """Read-only, a sweep that stopped while it made its store (a harvest: hours) is to be
    made writable or copied, not left for another folder that would begin from nothing."""
    from sweep.sweepdir import unwritable_fix

    (tmp_path / "sw").mkdir()
    assert unwritable_fix(tmp_path / "sw") == "choose another folder"
    (tmp_path / "sw" / "sweep.log").write_text("INFO sweep.driver: making the store\n")
    assert unwritable_fix(tmp_path / "sw").startswith("make it writable, or copy the sweep")


def test_a_config_that_could_not_be_read_is_not_called_damaged(copy, monkeypatch):
    monkeypatch.setattr("io.open", refused(open, "config.yaml"))  # (as OmegaConf opens it)
    with pytest.raises(SweepError, match="config.yaml could not be read .*mend the cause") as e:
        SweepFolder(copy).load_config()
    assert "delet" not in str(e.value)


def test_os_errors_name_their_fix():
    from sweep.errors import os_error_message

    eio = OSError(errno.EIO, "Input/output error", "/sw/runs/r1/checkpoint-000000010.safetensors")
    assert os_error_message(eio) == (
        "Input/output error (/sw/runs/r1/checkpoint-000000010.safetensors); the disk or its file "
        "system failed (see dmesg); repair it, then re-run the same command (what was written "
        "before is verified as it is read)"
    )
    ro = OSError(errno.EROFS, "Read-only file system", "/sw/.lock-guard")
    assert os_error_message(ro).endswith(
        "; the file system is mounted read-only; use a writable folder, then re-run"
    )
    denied = OSError(errno.EACCES, "Permission denied", "/sw")
    assert os_error_message(denied).endswith("; check the path and its permissions, then re-run")


def test_a_full_disk_names_the_file_it_could_not_write(tmp_path):
    """A write or fsync that fails for want of space names no file: which disk is full
    (the sweep's, --out's, the store's)?"""
    from sweep.errors import os_error_message
    from sweep.io import append_text, atomic_write

    def full(f):  # noqa: ANN001, ANN202
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError) as caught:
        atomic_write(tmp_path / "metrics.json", full)
    assert caught.value.errno == errno.ENOSPC and not list(tmp_path.iterdir())
    assert os_error_message(caught.value).startswith(
        f"no space left on the device ({tmp_path / 'metrics.json'}); "
    )
    if Path("/dev/full").exists():  # (an append: a run's events and curve)
        with pytest.raises(OSError) as caught:
            append_text(Path("/dev/full"), "x" * 100)
        assert caught.value.errno == errno.ENOSPC and caught.value.filename == "/dev/full"


def test_a_full_disk_at_the_end_keeps_the_failures_as_the_last_line(tmp_path, monkeypatch, caplog):
    """Ensembles failed (a full disk often is why) and summary.csv cannot be written either:
    the write's error is said, and the failures' line (with its exit code) stays the last;
    with no failure the write's error is the sweep's ending."""
    from sweep import driver
    from sweep.execution import Outcome

    def full(*_a):  # noqa: ANN202
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "summary.csv"))

    monkeypatch.setattr(driver, "write_summary", full)
    folder = SweepFolder(tmp_path)
    with caplog.at_level(logging.ERROR):
        driver.record_end(folder, [], Outcome(failures=["r8-e0: disk full"]))
    assert f"could not record the sweep's end: no space left on the device ({tmp_path}" in (
        caplog.text
    )
    with pytest.raises(OSError, match="No space left"):
        driver.record_end(folder, [], Outcome())


# ------------------------------------------------------------------ 10. minor


def test_stale_temp_files_are_removed(copy):
    junk = [
        copy / "runs" / "r1-l1_1e-03-s0" / ".sae.safetensors.x1.tmp",
        copy / ".manifest.json.x2.tmp",
    ]
    (copy / "runs" / "r1-l1_1e-03-s0" / rundir.DONE).unlink()  # so the run starts again
    old = time.time() - 2 * STALE_TEMP_SECONDS  # the sweep folder's: only old ones are stale
    for j in junk:
        j.write_bytes(b"\0" * 1000)
        os.utime(j, (old, old))
    assert run(copy) == 0
    assert not any(j.exists() for j in junk)


def test_diverged_and_dead_dictionaries_say_so(ray_cluster, tmp_path, capsys):
    sw = tmp_path / "sw"
    assert (
        main(
            [
                "run",
                f"sweep_dir={sw}",
                *TINY,
                "grid.l1=[1e-3,1e6,1e38]",
                "grid.dict_ratio=[1]",
                "train.grad_clip=null",
                "train.lr=1e-2",  # the huge L1 kills it within the run
            ]
        )  # fmt: skip
        == 0
    )
    from sweep.status import status_rows

    notes = {r["run_id"]: r.get("note", "") for r in status_rows(sw)}
    assert notes["r1-l1_1e-03-s0"] == ""
    assert notes["r1-l1_1e+06-s0"].startswith("dead dictionary")
    assert notes["r1-l1_1e+38-s0"].startswith("diverged at step")
    said = " ".join(capsys.readouterr().out.split())  # under the table, the done run's too
    assert "r1-l1_1e+06-s0 (done): dead dictionary" in said, said
    m = json.loads((sw / "runs" / "r1-l1_1e+38-s0" / rundir.METRICS).read_text())
    assert m["rows_trained"] == (m["diverged_step"] - 1) * 256  # (that step updated nothing)
    from sweep.status import status_json

    def no_nan(word: str) -> None:
        raise AssertionError(f"{word} in sweep status --json")

    facts = json.loads(status_json(sw), parse_constant=no_nan)  # (strict JSON: jq reads it)
    assert facts["states"] == {"diverged": 1, "done": 2} and facts["pace"] is None


def test_ensembles_that_need_every_cpu_run_one_at_a_time(ray_cluster, tmp_path):
    sw = tmp_path / "sw"
    extra = ["train.device=cpu", "launch.cpus_per_ensemble=2", "train.threads=1", "data.rows=30000"]
    assert (
        main(["run", f"sweep_dir={sw}", *TINY, "grid.l1=[1e-2]", "grid.dict_ratio=[1,2]", *extra])
        == 0
    )
    spans = []
    for r in (sw / "runs").iterdir():
        start = json.loads((r / rundir.PLACEMENT).read_text())["time"]
        end = json.loads((r / rundir.DONE).read_text())["finished"]
        spans.append((start, end))
    (a0, a1), (b0, b1) = sorted(spans)
    assert a1 <= b0, spans  # the second started after the first finished


# ------------------------------------------------------------------ review findings


def test_a_retry_after_a_crash_while_finishing_refinishes_every_member(
    tiny_store, tmp_path, monkeypatch
):
    """Member 0 finished, the worker died before member 1 did: the retry (the same job, as
    Ray runs it) restores every member from the end checkpoint, not from scratch."""
    ref = jobs(tiny_store, tmp_path / "ref", l1s=(1e-3, 3e-2), ratios=(2.0,), seeds=1)[0]
    train_ensemble(ref)
    job = jobs(tiny_store, tmp_path / "cut", l1s=(1e-3, 3e-2), ratios=(2.0,), seeds=1)[0]
    finish, calls = rundir.RunFolder.finish, []

    def dies_on_the_second(self, result):
        calls.append(self.run_id)
        if len(calls) == 2:
            raise RuntimeError("worker killed while finishing")
        finish(self, result)

    monkeypatch.setattr(rundir.RunFolder, "finish", dies_on_the_second)
    with pytest.raises(RuntimeError):
        train_ensemble(job)
    monkeypatch.setattr(rundir.RunFolder, "finish", finish)
    res = train_ensemble(job)  # Ray's retry
    assert res.resumed_from == res.steps > 0  # from the end checkpoint: nothing retrained
    assert weights(tmp_path / "cut") == weights(tmp_path / "ref")
    for m in job.ensemble.members:  # cleared once every member is final
        assert not list(rundir.run_dir(tmp_path / "cut", m.run_id).glob("checkpoint-*"))


def test_a_chunk_store_is_no_sweep_folder(copy, capsys):
    """Its manifest is no damaged sweep manifest: a run there would overwrite it. Refused
    before anything is written (no store generated inside it), also while it is being made."""
    store = copy / "store"
    before = {p: p.read_bytes() for p in store.rglob("*") if p.is_file()}
    assert main(["status", str(store)]) == 2
    assert run(store) == 2
    (store / "manifest.json").unlink()  # as while it is being made
    assert run(store) == 2
    assert main(["run", "--plan", f"sweep_dir={store}", *TINY, *GRID]) == 2
    err = capsys.readouterr().err
    assert err.count(f"error: {store} is a chunk store, not a sweep folder") == 4
    del before[store / "manifest.json"]
    assert {p: p.read_bytes() for p in store.rglob("*") if p.is_file()} == before


def test_a_folder_of_sweeps_is_no_new_sweeps(copy, tmp_path, capsys, monkeypatch):
    """A folder that is no sweep's and holds sweeps (``sweep_dir=outputs`` meant for
    ``outputs/new``), or a home folder, is refused before anything is written there; other
    folders (a job's log, notes, a chunk store harvested beside) are a new sweep's to take."""
    home = tmp_path / "home"
    (home / "docs").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    for folder, what in ((copy.parent, "holds the sweeps sw"), (home, "is a home or root")):
        before = sorted(p.name for p in folder.iterdir())
        assert run(folder) == 2
        assert main(["run", "--plan", f"sweep_dir={folder}", *TINY, *GRID]) == 2
        err = capsys.readouterr().err
        one_line_error(err, f"sweep_dir {folder} {what}")
        assert err.count("pass a new or empty folder for a new sweep") == 2
        assert sorted(p.name for p in folder.iterdir()) == before
    beside = tmp_path / "beside"
    shutil.copytree(copy / "store", beside / "acts")
    (beside / "notes").mkdir()
    (beside / "train.log").write_text("a job's log")
    assert main(["run", "--plan", f"sweep_dir={beside}", *TINY, *GRID]) == 0


def test_a_ratio_giving_the_size_of_an_earlier_grids_ratio_is_refused(copy, capsys):
    """The sweep has runs of ratio 2 (size 32 at width 16): a later grid's 2.01 would train
    the same dictionaries under other names (the report pairing them as next ratios); refused
    by the run and --plan, also once the store is gone (made again at data.width)."""
    before = sorted(p.name for p in (copy / "runs").iterdir())
    grid = ["grid.l1=[1e-3]", "grid.dict_ratio=[2.01,4]"]
    assert main(["run", f"sweep_dir={copy}", *TINY, *grid]) == 2
    shutil.rmtree(copy / "store")
    assert main(["run", "--plan", f"sweep_dir={copy}", *TINY, *grid]) == 2
    err = capsys.readouterr().err
    one_line_error(err, "grid.dict_ratio 2.01 gives dict size 32 at width 16, as ratio 2 of")
    assert err.count("it would train them again under other names; use 2") == 2
    assert sorted(p.name for p in (copy / "runs").iterdir()) == before
    # a sweep that has runs of both (begun before this check) goes on with them
    old = json.loads((copy / "manifest.json").read_text())
    for rid, point in list(old["runs"].items()):
        if point["dict_ratio"] == 2.0:
            old["runs"][rid.replace("r2-", "r2.01-")] = {**point, "dict_ratio": 2.01}
    (copy / "manifest.json").write_text(json.dumps(old))
    assert main(["run", "--plan", f"sweep_dir={copy}", *TINY, *grid]) == 0


def test_every_store_maker_leaves_a_marker_sweep_folders_know():
    from sweep.activations import harvest, layout, synthetic

    assert {harvest.PARAMS_FILE, synthetic.PARAMS_FILE} == set(layout.MAKING)


def test_status_of_a_sweep_no_run_of_which_started_names_no_row_count(copy, capsys):
    """(its totals come from the runs' specs: it said "rows: 0/0")"""
    shutil.rmtree(copy / "runs")
    assert main(["status", str(copy)]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "pending: 4 total: 4 rows: not known before a run starts" in out, out


def test_status_says_when_the_last_driver_ended_without_an_outcome(copy, capsys):
    manifest = json.loads((copy / "manifest.json").read_text())
    assert manifest.pop("state") == "done"  # each plan drops it; a SIGKILLed driver never wrote it
    (copy / "manifest.json").write_text(json.dumps(manifest))
    assert main(["status", str(copy)]) == 0
    assert (
        "stopped: its last driver ended without recording how (killed, or its disk full); "
        "re-run it to continue" in " ".join(capsys.readouterr().out.split())
    )
    assert main(["status", str(copy), "--json"]) == 0
    said = json.loads(capsys.readouterr().out)
    assert said["activity"] == "stopped" and "re-run it to continue" in said["note"]


def test_damaged_manifest_and_config_are_one_line(copy, capsys):
    (copy / "manifest.json").write_text("{oops")
    assert run(copy) == 2
    one_line_error(capsys.readouterr().err, "manifest.json is damaged")
    (copy / "manifest.json").unlink()
    (copy / "config.yaml").write_text("train: [unclosed")
    assert run(copy) == 2
    one_line_error(capsys.readouterr().err, "config.yaml is damaged")
    assert main(["resume", str(copy)]) == 2
    one_line_error(capsys.readouterr().err, "config.yaml is damaged")


@pytest.mark.parametrize("text", ["", "- 1", "data: 3", "sae:\n  name: untied\n", "7"])
def test_a_config_yaml_that_is_no_mapping_of_groups_is_damaged_in_one_line(copy, capsys, text):
    """Valid YAML without the data and sae groups: a traceback (AttributeError, missing key)
    from resume, evaluate and run alike."""
    (copy / "config.yaml").write_text(text)
    for argv in (["resume", str(copy)], ["evaluate", str(copy)], ["run", f"sweep_dir={copy}"]):
        assert main([*argv, *(TINY + GRID if argv[0] == "run" else [])]) == 2
        one_line_error(capsys.readouterr().err, "config.yaml is damaged", "restore it")


def test_a_folder_with_another_tools_config_yaml_is_no_sweep(tmp_path, capsys):
    """A Hydra project's folder: refused as such, not as "a sweep with different settings"
    with overrides (data.name=null ...) that then failed."""
    (tmp_path / "proj").mkdir()
    (tmp_path / "proj" / "config.yaml").write_text("my: precious\n")
    assert main(["run", f"sweep_dir={tmp_path / 'proj'}", *TINY, *GRID]) == 2
    one_line_error(capsys.readouterr().err, "is not a sweep's config", "choose another sweep_dir")
    assert sorted(p.name for p in (tmp_path / "proj").iterdir()) == ["config.yaml"]
    assert (tmp_path / "proj" / "config.yaml").read_text() == "my: precious\n"


def test_a_run_training_before_its_first_checkpoint_is_running(tiny_store, tmp_path):
    """Until its first checkpoint (10 minutes by default) a training run has none: under a
    live driver it is running if its attempt began under that driver, else pending."""
    from sweep.status import status_rows

    sweep_dir = tmp_path / "sw"
    a, b = [j.ensemble.members[0] for j in jobs(tiny_store, sweep_dir, l1s=(1e-2,), seeds=1)]
    spec = {**b.as_dict(), "train": {"batch_size": 256}, "total_steps": 10}
    killed = rundir.RunFolder.of(sweep_dir, b.run_id)
    killed.start(spec, {})  # a killed driver's attempt, two minutes ago:
    placement = killed.path / rundir.PLACEMENT
    atomic_write_json(placement, {**read_json(placement), "time": time.time() - 120})
    rows = status_rows(sweep_dir)
    assert {r["run_id"]: r["state"] for r in rows} == {a.run_id: "pending", b.run_id: "pending"}
    totals = [r["rows_total"] for r in rows]  # the run not started has the others' total
    assert totals == [2560, 2560] and rows[0]["rows_trained"] == 0
    with SweepLock(sweep_dir):
        rundir.RunFolder.of(sweep_dir, a.run_id).start(a.as_dict(), {})
        states = {r["run_id"]: r["state"] for r in status_rows(sweep_dir)}
        assert SweepFolder(sweep_dir).activity() == "running"
    assert states == {a.run_id: "running", b.run_id: "pending"}
    with SweepLock(sweep_dir, EVALUATING):  # a `sweep evaluate` trains nothing
        rundir.RunFolder.of(sweep_dir, a.run_id).start(a.as_dict(), {})
        states = {r["run_id"]: r["state"] for r in status_rows(sweep_dir)}
        assert SweepFolder(sweep_dir).activity() == "evaluating"
    assert states == {a.run_id: "pending", b.run_id: "pending"}


def test_a_retried_evaluation_evaluates_only_the_runs_still_without_metrics(copy):
    """A worker that died after re-finishing some members: its retry evaluates the rest (it
    used to train the whole ensemble again); one member needing training means training."""
    from types import SimpleNamespace

    from sweep.reevaluate import lost_members

    a, b = (rundir.RunFolder(copy / "runs" / r) for r in ("r2-l1_1e-03-s0", "r2-l1_1e-01-s0"))
    (b.path / rundir.METRICS).unlink()
    assert lost_members(SimpleNamespace(folders=[a, b])) == [1]
    (a.path / rundir.METRICS).unlink()
    assert lost_members(SimpleNamespace(folders=[a, b])) == [0, 1]
    (a.path / rundir.DONE).unlink()
    assert lost_members(SimpleNamespace(folders=[a, b])) is None


def test_an_atomic_write_makes_its_rename_durable_before_returning(tmp_path, monkeypatch):
    """The file, then its folder, are fsynced: a checkpoint's predecessor is pruned (and a
    finished run's checkpoints removed) only once the new file's name is on disk."""
    import stat

    synced, real = [], os.fsync
    monkeypatch.setattr(
        os, "fsync", lambda fd: (synced.append(stat.S_ISDIR(os.fstat(fd).st_mode)), real(fd))
    )
    atomic_write_json(tmp_path / "a.json", {"x": 1})
    assert synced == [False, True] and read_json(tmp_path / "a.json") == {"x": 1}


def test_an_atomic_write_whose_mode_cannot_be_set_leaves_no_temp(tmp_path, monkeypatch):
    """A file system that refuses chmod (some FUSE or CIFS mounts): the error, and neither a
    temp file nor an open descriptor left behind."""
    open_fds = set(os.listdir("/proc/self/fd")) if Path("/proc/self/fd").exists() else None

    def refuse(fd: int, mode: int) -> None:
        raise PermissionError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "fchmod", refuse)
    with pytest.raises(PermissionError):
        atomic_write_json(tmp_path / "a.json", {"x": 1})
    assert list(tmp_path.iterdir()) == []
    if open_fds is not None:
        assert set(os.listdir("/proc/self/fd")) == open_fds


def test_merging_into_metrics_waits_for_a_writer_of_the_run(copy):
    """``sweep report`` merges MMCS into a run's metrics.json (read, merge, rewrite) while a
    ``sweep evaluate`` may be writing new metrics there: the merge waits for the writer and
    merges into what it wrote, never writing the old metrics back."""
    import fcntl
    import threading

    run_ = rundir.RunFolder(copy / "runs" / "r1-l1_1e-03-s0")
    fd = os.open(run_.path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # (as the writer holds it)
        merge = threading.Thread(target=run_.update_metrics, args=({"mmcs_seeds": 0.5},))
        merge.start()
        time.sleep(0.5)
        assert "mmcs_seeds" not in read_json(run_.path / rundir.METRICS)  # it waits
        atomic_write_json(run_.path / rundir.METRICS, {"fvu": 0.25})  # the new metrics
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
    merge.join(timeout=10)
    assert read_json(run_.path / rundir.METRICS) == {"fvu": 0.25, "mmcs_seeds": 0.5}


def test_the_lock_guard_holds_though_another_user_made_its_file(tmp_path, monkeypatch):
    """In a group-shared sweep folder, .lock-guard (0644) may be another user's: it cannot be
    opened for writing, but flock needs no more than reading. (Root writes through file
    modes, so the refusal is simulated.)"""
    import fcntl

    from sweep import io

    real_open = os.open

    def as_another_users_file(path, flags, *mode):
        if flags & (os.O_WRONLY | os.O_RDWR):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, flags, *mode)

    guard = tmp_path / ".lock-guard"
    guard.write_text("")
    monkeypatch.setattr(io.os, "open", as_another_users_file)
    with io.flock_held(guard, create=True):
        fd = real_open(guard, os.O_RDONLY)
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(fd)
