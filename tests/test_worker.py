"""One ensemble end to end (no Ray): run folders, exact resume, loader, metrics, grid."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from safetensors.torch import load_file

from sweep import archs, checkpoints, grid, load_run, metrics, planning, rundir, tensorfile
from sweep.activations.store import ChunkStore
from sweep.cli import compose
from sweep.config import SAEConfig, to_sweep_config
from sweep.errors import StoreError, SweepError
from sweep.io import memory_text
from sweep.planning import resume_groups
from sweep.rundir import RunFolder
from sweep.sweepdir import SweepFolder
from sweep.worker import EnsembleJob, train_ensemble
from tests.conftest import tiny_train
from tests.test_lm_metrics import store_with_a_model


def job_for(
    store,
    sweep_dir,
    l1s=(1e-3, 3e-2),
    ratio=2.0,
    seeds=1,
    arch="untied",
    recipe=None,
    lrs=None,
    **train,
):
    knob = archs.get(arch).knob
    runs = grid.expand(list(l1s), [ratio], seeds, store.width, arch, knob, lrs)
    (ens,) = grid.group(runs, {ratio: 16})
    sae = SAEConfig(name=arch, recipe=recipe)
    return EnsembleJob(
        ens, str(sweep_dir), str(store.path), True, 2048, tiny_train(**train), threads=1, sae=sae
    )


def digest(folder) -> str:
    return hashlib.sha256((folder / "sae.safetensors").read_bytes()).hexdigest()


def test_run_folders_are_complete(tiny_store, tmp_path):
    job = job_for(tiny_store, tmp_path)
    res = train_ensemble(job)
    assert set(res.states.values()) == {"done"} and res.steps == 38
    for m in job.ensemble.members:
        d = rundir.run_dir(tmp_path, m.run_id)
        names = {p.name for p in d.iterdir()}
        assert {
            "spec.json",
            "cfg.json",
            "sae.safetensors",
            "metrics.json",
            "metrics.jsonl",
            "DONE",
        } <= names
        assert not checkpoints.list_checkpoints(d)  # checkpoints are removed once final
        spec = json.loads((d / "spec.json").read_text())
        assert (
            spec["l1"] == m.l1 and spec["dict_ratio"] == 2.0 and spec["train"]["batch_size"] == 256
        )
        placement = json.loads((d / rundir.PLACEMENT).read_text())
        assert placement["program"] == "fast cpu float32" and placement["timings"]["steps"] == 38
        final = json.loads((d / "metrics.json").read_text())
        for key in (
            "mse",
            "fvu",
            "l0",
            "dead_fraction",
            "dense_fraction",
            "gt_mmcs",
            "gt_recovered",
        ):
            assert key in final
        curve = [json.loads(ln) for ln in (d / "metrics.jsonl").read_text().splitlines()]
        assert [c["step"] for c in curve] == [*range(5, 39, 5), 38]  # and the last step
        assert {"loss", "mse", "l1", "l0", "fvu"} <= set(curve[0])
        assert RunFolder(d).state() == "done"
    assert [m.run_id for m in job.ensemble.members] == ["r2-l1_1e-03-s0", "r2-l1_3e-02-s0"]


def test_members_are_evaluated_once_training_ended(tiny_store, tmp_path, monkeypatch):
    """Training's TF32 (on CUDA) is switched off before the members are evaluated."""
    from sweep import worker

    calls, finish = [], worker.finish_members
    monkeypatch.setattr(worker, "training_ended", lambda device: calls.append(device.type))
    monkeypatch.setattr(
        worker, "finish_members", lambda *a, **k: calls.append("finish") or finish(*a, **k)
    )
    assert set(train_ensemble(job_for(tiny_store, tmp_path)).states.values()) == {"done"}
    assert calls == ["cpu", "finish"]


def test_a_ground_truth_lost_while_training_costs_only_its_metrics(tiny_store, tmp_path, caplog):
    """Deleted after the store was verified (the run checks it before): the runs finish,
    without gt_* metrics, and the evaluation says why."""
    store = ChunkStore(shutil.copytree(tiny_store.path, tmp_path / "store"))
    job = job_for(store, tmp_path / "sw")
    truth = store.path / "ground_truth.safetensors"
    with caplog.at_level(logging.WARNING, logger="sweep"):
        done = train_ensemble(job, should_stop=lambda: truth.unlink(missing_ok=True) or False)
        assert set(done.states.values()) == {"done"}
    assert "ground-truth metrics skipped: " in caplog.text and "is missing; delete" in caplog.text
    for m in job.ensemble.members:
        final = RunFolder(rundir.run_dir(tmp_path / "sw", m.run_id)).metrics()
        assert "fvu" in final and "gt_mmcs" not in final


def test_a_chunk_replaced_while_training_fails_the_ensemble(tiny_store, tmp_path):
    """A chunk file rewritten under a training ensemble (another store copied over it) was
    read unchecked and its runs finished on it: the next read of it fails the ensemble in one
    line, no run is final, and a retry (Ray's) is refused by the store's checksum."""
    store = ChunkStore(shutil.copytree(tiny_store.path, tmp_path / "store"))
    job = job_for(store, tmp_path / "sw")
    steps = iter(range(10**6))

    def replace_at_step_3() -> bool:
        if next(steps) == 3:
            chunk = store.path / "chunk_00002.npy"
            arr = np.load(chunk)
            np.save(chunk, arr[::-1].copy())  # (the same shape, other rows)
        return False

    with pytest.raises(StoreError, match="chunk_00002.npy fails its checksum") as err:
        train_ensemble(job, should_stop=replace_at_step_3)
    assert str(err.value).endswith("(it changed while this sweep trained on it)")
    assert not any((rundir.run_dir(tmp_path / "sw", m.run_id) / "DONE").exists()
                   for m in job.ensemble.members)  # fmt: skip
    with pytest.raises(StoreError, match="chunk_00002.npy fails its checksum"):
        train_ensemble(job)


def test_a_chunk_touched_while_training_is_read_on(tiny_store, tmp_path):
    """A chunk file whose times or modes change but not its bytes (``touch`` against a
    scratch purge, ``chmod a-w``) is hashed again and read on: the runs are bit-identical
    to an undisturbed ensemble's."""
    store = ChunkStore(shutil.copytree(tiny_store.path, tmp_path / "store"))
    train_ensemble(job_for(store, tmp_path / "ref"))
    steps = iter(range(10**6))

    def touch_at_step_3() -> bool:
        if next(steps) == 3:
            for chunk in store.path.glob("chunk_*.npy"):
                chunk.touch()
                chunk.chmod(0o444)
        return False

    job = job_for(store, tmp_path / "sw")
    assert set(train_ensemble(job, should_stop=touch_at_step_3).states.values()) == {"done"}
    for m in job.ensemble.members:
        assert digest(rundir.run_dir(tmp_path / "sw", m.run_id)) == digest(
            rundir.run_dir(tmp_path / "ref", m.run_id)
        )


@pytest.mark.parametrize("stop_at", [3, 7, 16, 30])
def test_resume_is_bit_exact(tiny_store, tmp_path, stop_at):
    ref = job_for(tiny_store, tmp_path / "ref", epochs=2)
    train_ensemble(ref)
    cut = job_for(tiny_store, tmp_path / "cut", epochs=2)
    first = train_ensemble(cut, should_stop=stop_after(stop_at))
    assert set(first.states.values()) == {"interrupted"} and first.steps == stop_at
    d0 = rundir.run_dir(tmp_path / "cut", cut.ensemble.members[0].run_id)
    assert RunFolder(d0).state() == "interrupted" and not RunFolder(d0).is_done()
    second = train_ensemble(cut)
    assert second.steps == 76 and second.resumed_from == stop_at  # not a restart from scratch
    for m in ref.ensemble.members:
        a, b = (
            rundir.run_dir(tmp_path / "ref", m.run_id),
            rundir.run_dir(tmp_path / "cut", m.run_id),
        )
        assert digest(a) == digest(b)
        assert (a / "metrics.jsonl").read_text() == (b / "metrics.jsonl").read_text()


ARCH_JOBS = {
    "topk": dict(l1s=(2, 5)),
    "batchtopk": dict(l1s=(2, 5)),
    "matryoshka": dict(l1s=(2, 5)),
    "jumprelu": dict(l1s=(1e-3, 3e-2)),
    "untied": dict(l1s=(1e-3, 0.3), resample_dead=6, lr=0.1),  # latents die, are resampled
    "untied-weighted": dict(l1s=(1e-3, 3e-2), recipe="weighted"),
    "gated": dict(l1s=(1e-3, 0.3), resample_dead=6, lr=0.1),  # its magnitudes: checkpointed
    "tied": dict(l1s=(1e-3, 0.3), resample_dead=6, lr=0.1),  # its own fast step, resampled
}


@pytest.mark.parametrize("arch", sorted(ARCH_JOBS))
def test_every_architecture_resumes_bit_exact(tiny_store, tmp_path, arch):
    """Dead-latent bookkeeping (AuxK from step 2, resampling every 6 steps) and BatchTopK's
    threshold are part of the checkpoint: resumed == uninterrupted."""
    kw = dict(ARCH_JOBS[arch], arch=arch.split("-")[0], dead_tokens=256, epochs=2)
    ref = job_for(tiny_store, tmp_path / "ref", **kw)
    train_ensemble(ref)
    cut = job_for(tiny_store, tmp_path / "cut", **kw)
    train_ensemble(cut, should_stop=stop_after(17))
    assert train_ensemble(cut).resumed_from == 17
    for m in ref.ensemble.members:
        a, b = (
            rundir.run_dir(tmp_path / "ref", m.run_id),
            rundir.run_dir(tmp_path / "cut", m.run_id),
        )
        assert digest(a) == digest(b), m.run_id
        cfg = json.loads((a / "cfg.json").read_text())
        assert cfg["architecture"] == kw["arch"] and cfg["loss"]
        if kw.get("recipe"):
            assert cfg["recipe"] == "weighted" and "||W_dec_f||" in cfg["loss"]
        if arch == "matryoshka":  # (its levels' sizes at d_sae 32)
            assert cfg["matryoshka_widths"] == [1, 3, 7, 15, 32] and "levels" in cfg["loss"]
            assert {f"fvu_level_{i}" for i in range(1, 5)} <= set(
                json.loads((a / "metrics.json").read_text())
            )
        model = load_run(str(a))
        raw = tiny_store.tail_rows(64).float()
        assert model(raw).shape == raw.shape
    if arch in ("untied", "gated", "tied"):
        events = rundir.run_dir(tmp_path / "ref", ref.ensemble.members[1].run_id) / "events.jsonl"
        assert '"resampled"' in events.read_text()


def test_a_run_of_an_lr_axis_is_the_run_at_that_train_lr_and_resumes_bit_exact(
    tiny_store, tmp_path
):
    """``grid.lr``: members of one ensemble at their own learning rates; each is, bit for bit,
    the run a sweep without the axis trains at ``train.lr`` = its rate; resumed ==
    uninterrupted."""
    kw, lrs = dict(l1s=(3e-2,), epochs=2), (1e-3, 1e-2)
    ref = job_for(tiny_store, tmp_path / "ref", lrs=lrs, **kw)
    ids = [m.run_id for m in ref.ensemble.members]
    assert ids == ["r2-l1_3e-02-lr1e-03-s0", "r2-l1_3e-02-lr1e-02-s0"]
    train_ensemble(ref)
    cut = job_for(tiny_store, tmp_path / "cut", lrs=lrs, **kw)
    train_ensemble(cut, should_stop=stop_after(17))
    assert train_ensemble(cut).resumed_from == 17
    for run_id, lr in zip(ids, lrs, strict=True):
        a = rundir.run_dir(tmp_path / "ref", run_id)
        assert digest(a) == digest(rundir.run_dir(tmp_path / "cut", run_id)), run_id
        assert json.loads((a / "cfg.json").read_text())["lr"] == lr
        alone = job_for(tiny_store, tmp_path / f"lr{lr}", lr=lr, **kw)
        train_ensemble(alone)
        (only,) = alone.ensemble.members
        assert digest(a) == digest(rundir.run_dir(tmp_path / f"lr{lr}", only.run_id)), run_id


def test_snapshots_hold_the_weights_of_their_step_load_and_resume_bit_exact(tiny_store, tmp_path):
    """``train.snapshots``: after 25% and 50% of 76 steps each run's weights as they were
    (== the checkpoint of a run stopped there), loadable; a resumed run writes the same ones."""
    kw = dict(epochs=2, checkpoint_every=None)
    whole = job_for(tiny_store, tmp_path / "whole", snapshots=[0.5, 0.25], **kw)
    train_ensemble(whole)
    cut = job_for(tiny_store, tmp_path / "cut", snapshots=[0.25, 0.5], **kw)
    train_ensemble(cut, should_stop=stop_after(30))
    assert train_ensemble(cut).resumed_from == 30
    stopped = job_for(tiny_store, tmp_path / "stopped", **kw)
    train_ensemble(stopped, should_stop=stop_after(19))
    for m in whole.ensemble.members:
        snaps = rundir.run_dir(tmp_path / "whole", m.run_id) / rundir.SNAPSHOTS
        assert sorted(p.name for p in snaps.iterdir()) == ["step-00000019", "step-00000038"]
        for step in ("step-00000019", "step-00000038"):
            again = rundir.run_dir(tmp_path / "cut", m.run_id) / rundir.SNAPSHOTS / step
            assert digest(snaps / step) == digest(again)
        events = rundir.run_dir(tmp_path / "cut", m.run_id) / "events.jsonl"
        told = [json.loads(line) for line in events.read_text().splitlines()]
        assert [e["step"] for e in told if e["event"] == "snapshot"] == [19, 38]  # (once each)
        at19 = load_file(snaps / "step-00000019" / rundir.WEIGHTS)
        (ckpt,) = checkpoints.list_checkpoints(rundir.run_dir(tmp_path / "stopped", m.run_id))
        held = checkpoints.load_checkpoint(ckpt)
        assert held.step == 19
        for k, v in at19.items():
            assert torch.equal(v, held.tensors[f"param.{k}"]), k
        model = load_run(str(snaps / "step-00000019"))
        assert model.cfg["snapshot_step"] == 19 and model.cfg["total_steps"] == 76
        raw = tiny_store.tail_rows(64).float()
        assert model(raw).shape == raw.shape
    damaged = snaps / "step-00000038" / rundir.WEIGHTS  # (the last member's)
    data = bytearray(damaged.read_bytes())
    data[-1] ^= 0xFF
    damaged.write_bytes(bytes(data))
    with pytest.raises(
        SweepError, match="sae.safetensors fails its checksum .* remove the snapshot.s folder"
    ):
        load_run(str(damaged.parent))


def test_steps_redone_after_a_fallback_record_their_resampling_once(tiny_store, tmp_path):
    """A resume from an older checkpoint (here: the newest is damaged) redoes steps, and with
    them their events: events.jsonl's resamplings are the uninterrupted run's, once each."""
    kw = dict(ARCH_JOBS["untied"], dead_tokens=256, epochs=2, checkpoint_every=7)
    ref = job_for(tiny_store, tmp_path / "ref", **kw)
    train_ensemble(ref)
    cut = job_for(tiny_store, tmp_path / "cut", **kw)
    train_ensemble(cut, should_stop=stop_after(20))  # checkpoints 14 and 20 kept
    for m in cut.ensemble.members:
        newest = checkpoints.list_checkpoints(rundir.run_dir(tmp_path / "cut", m.run_id))[-1]
        newest.write_bytes(newest.read_bytes()[:-10])  # damaged: resumes from step 14
    assert train_ensemble(cut).resumed_from == 14

    def resampled(sweep: str, run_id: str) -> list[tuple]:
        path = rundir.run_dir(tmp_path / sweep, run_id) / rundir.EVENTS
        events = (
            [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
        )
        return [(e["step"], e["latents"]) for e in events if e["event"] == "resampled"]

    for m in ref.ensemble.members:
        assert resampled("cut", m.run_id) == resampled("ref", m.run_id)
    assert any(14 < step <= 20 for step, _ in resampled("ref", ref.ensemble.members[1].run_id))


def test_no_resampling_on_the_last_step(tiny_store, tmp_path):
    """Latents resampled at the last step would be saved untrained as the dictionary's: with
    train.resample_stop=1 the last resampling is the one before it."""
    kw = dict(ARCH_JOBS["untied"], resample_dead=19, resample_stop=1.0, dead_tokens=256)
    job = job_for(tiny_store, tmp_path, **kw)
    assert train_ensemble(job).steps == 38
    events = rundir.run_dir(tmp_path, job.ensemble.members[1].run_id) / rundir.EVENTS
    steps = [json.loads(ln)["step"] for ln in events.read_text().splitlines()]
    assert steps == [19]


def test_a_read_only_store_the_sweep_verified_is_not_scanned_again_by_its_workers(
    tiny_store, tmp_path, monkeypatch
):
    """The sweep folder remembers its verification (the store cannot): the worker reads it
    there, as the driver does, and skips the per-chunk NaN/inf scan."""
    from sweep.activations import store as store_module
    from sweep.sweepdir import STORE_VERIFIED
    from tests.test_store import read_only

    store = tmp_path / "store"
    shutil.copytree(tiny_store.path, store)
    read_only(store, monkeypatch)
    (tmp_path / "sw").mkdir()
    ChunkStore(store).verify(elsewhere=tmp_path / "sw" / STORE_VERIFIED)
    scans = []
    real = store_module.reject_nonfinite
    monkeypatch.setattr(store_module, "reject_nonfinite", lambda *a: scans.append(real(*a)))
    assert train_ensemble(job_for(ChunkStore(store), tmp_path / "sw")).steps == 38
    assert len(scans) == 1  # (the held-out rows the evaluation reads; no training chunk)


def test_a_date_as_train_seed_resamples_and_initialises(tiny_store, tmp_path):
    """(seed x 1_000_003 + run) x 1_000_033 + step passed torch's 64 bits for seeds above
    ~1.8e7: the ensemble failed at its first resampling. Smaller seeds keep their draws."""
    from sweep.resample import generator
    from sweep.restore import init_seed

    kw = dict(ARCH_JOBS["untied"], resample_dead=19, dead_tokens=256, seed=20240101)
    for seeding in ("per_ratio", "shared"):
        job = job_for(tiny_store, tmp_path / seeding, init_seeding=seeding, **kw)
        assert set(train_ensemble(job).states.values()) == {"done"}
    big = tiny_train(seed=2**63 - 1, init_seeding="shared")
    assert 0 <= init_seed(job.ensemble.members[0], big) < 2**64
    assert generator(7, 1, 19).initial_seed() == (7 * 1_000_003 + 1) * 1_000_033 + 19


def stop_after(n: int):
    """A should_stop() that says yes on its n-th call."""
    calls = iter(range(1, n + 1))
    return lambda: next(calls, n) == n


def reference_and_interrupted(store, tmp_path, stop_at: int = 20):
    """A finished reference run and the same job stopped (checkpointed) after ``stop_at`` steps."""
    ref = job_for(store, tmp_path / "ref")
    train_ensemble(ref)
    cut = job_for(store, tmp_path / "cut")
    train_ensemble(cut, should_stop=stop_after(stop_at))
    return ref, cut


def test_corrupt_checkpoint_falls_back_to_previous(tiny_store, tmp_path):
    ref, cut = reference_and_interrupted(tiny_store, tmp_path)
    for m in cut.ensemble.members:
        d = rundir.run_dir(tmp_path / "cut", m.run_id)
        ckpts = checkpoints.list_checkpoints(d)
        assert len(ckpts) == 2  # the previous one is kept
        raw = bytearray(ckpts[-1].read_bytes())
        raw[-10] ^= 0xFF  # flip a byte in the tensor data
        ckpts[-1].write_bytes(bytes(raw))
    train_ensemble(cut)
    for m in ref.ensemble.members:
        assert digest(rundir.run_dir(tmp_path / "ref", m.run_id)) == digest(
            rundir.run_dir(tmp_path / "cut", m.run_id)
        )


@pytest.mark.parametrize(
    "fault, raised",
    [
        (OSError(5, "Input/output error"), "could not read checkpoint .* it is kept"),
        # (what safetensors raises for any file it fails to open: here, it is there)
        (FileNotFoundError(2, "No such file or directory"), "could not read checkpoint .* kept"),
        (RuntimeError("DefaultCPUAllocator: can't allocate memory"), "ran out of host memory"),
    ],
)
def test_a_checkpoint_that_could_not_be_read_is_kept_not_taken_for_damaged(
    tiny_store, tmp_path, monkeypatch, fault, raised
):
    """An I/O error or an allocation that fails while a resume reads the checkpoints proves
    nothing about them: the resume stops in one line, every checkpoint kept (taken for
    damage, the newer ones were deleted and their training lost), and goes on once it passes."""
    ref, cut = reference_and_interrupted(tiny_store, tmp_path)
    folders = [rundir.run_dir(tmp_path / "cut", m.run_id) for m in cut.ensemble.members]
    before = [sorted(checkpoints.checkpoint_steps(d)) for d in folders]
    assert before == [[14, 20]] * 2

    def failing(*args, **kwargs):  # noqa: ANN202
        raise fault

    monkeypatch.setattr(safetensors, "safe_open", failing)
    with pytest.raises(SweepError, match=raised):
        train_ensemble(cut)
    assert [sorted(checkpoints.checkpoint_steps(d)) for d in folders] == before
    monkeypatch.undo()
    assert train_ensemble(cut).resumed_from == 20
    for m, d in zip(ref.ensemble.members, folders, strict=True):
        assert digest(rundir.run_dir(tmp_path / "ref", m.run_id)) == digest(d)
        events = d / "events.jsonl"
        assert not events.exists() or "bad_checkpoint" not in events.read_text()


def without_root(code: str, *args: str) -> subprocess.CompletedProcess:
    """``python -c code args`` with file permissions in force (root's overrides dropped)."""
    cmd = [sys.executable, "-c", code, *args]
    if os.geteuid() == 0:
        if shutil.which("capsh") is None:
            pytest.skip("root without capsh: permissions cannot be put in force")
        drop = "--drop=cap_dac_override,cap_dac_read_search"
        cmd = ["capsh", drop, "--", "-c", " ".join(shlex.quote(c) for c in cmd)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def test_a_checkpoint_safetensors_cannot_open_is_not_taken_for_gone(tmp_path):
    """A checkpoint its reader may not open: safetensors says the file does not exist (so
    it was taken for gone and fallen back from); the OS is asked, so it is kept."""
    tensors = {"param.W": torch.arange(6.0).reshape(2, 3)}
    checkpoints.save_checkpoint(tmp_path, checkpoints.Checkpoint(3, tensors, {"c": 1}), keep=2)
    path = checkpoints.path_of(tmp_path, 3)
    path.chmod(0)
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from sweep import checkpoints\n"
        "try:\n"
        "    checkpoints.load_checkpoint(Path(sys.argv[1]))\n"
        "except Exception as err:\n"
        "    print(type(err).__name__, err)\n"
    )
    out = without_root(code, str(path))
    assert out.stdout.startswith("CheckpointUnreadable could not read checkpoint"), out
    assert "PermissionError" in out.stdout, out


def test_a_checkpoint_safetensors_failed_to_open_once_is_read_again(tmp_path, monkeypatch):
    """A failure opening it that has passed (the OS opens it now): read again, not given up."""
    tensors = {"param.W": torch.arange(6.0).reshape(2, 3)}
    checkpoints.save_checkpoint(tmp_path, checkpoints.Checkpoint(3, tensors, {"c": 1}), keep=2)
    real, calls = safetensors.safe_open, []

    def once(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        calls.append(1)
        if len(calls) == 1:
            raise FileNotFoundError(2, "No such file or directory")
        return real(*args, **kwargs)

    monkeypatch.setattr(safetensors, "safe_open", once)
    got = checkpoints.load_checkpoint(checkpoints.path_of(tmp_path, 3))
    assert got.step == 3 and torch.equal(got.tensors["param.W"], tensors["param.W"])


def test_the_end_state_is_written_once_when_a_periodic_checkpoint_falls_on_the_last_step(
    tiny_store, tmp_path, monkeypatch
):
    """The last step's periodic checkpoint is left to the end's (written while the members
    are evaluated): the same bytes twice cost a whole write of every member's state."""
    saved = []
    save = rundir.RunFolder.save_checkpoint

    def counted(self, ckpt):  # noqa: ANN001, ANN202
        saved.append(ckpt.step)
        return save(self, ckpt)

    monkeypatch.setattr(rundir.RunFolder, "save_checkpoint", counted)
    job = job_for(tiny_store, tmp_path / "a", checkpoint_every=1000)
    total = train_ensemble(job).steps
    saved.clear()
    assert total % 2 == 0
    train_ensemble(job_for(tiny_store, tmp_path / "b", checkpoint_every=total // 2))
    assert saved == [total // 2] * 2 + [total] * 2


def test_loader_takes_raw_activations(tiny_store, tmp_path):
    job = job_for(tiny_store, tmp_path, l1s=(1e-3,))
    train_ensemble(job)
    folder = rundir.run_dir(tmp_path, job.ensemble.members[0].run_id)
    model = load_run(str(folder))
    assert (model.d_in, model.d_sae) == (16, 32)
    raw = tiny_store.tail_rows(2048)
    scale = tiny_store.scale(True)
    params = load_file(str(folder / "sae.safetensors"))
    from sweep import sae

    codes_train = sae.encode(params, raw * scale)
    with torch.no_grad():
        torch.testing.assert_close(model.encode(raw), codes_train, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(
            model(raw), sae.decode(params, codes_train) / scale, rtol=1e-4, atol=1e-5
        )
        fvu = ((model(raw) - raw) ** 2).sum() / ((raw - raw.mean(0)) ** 2).sum()
    final = json.loads((folder / "metrics.json").read_text())
    assert float(fvu) == pytest.approx(final["fvu"], rel=1e-3)


def test_metrics_on_known_dictionary(tiny_store):
    gt = tiny_store.ground_truth()
    perfect = {
        "W_dec": gt,
        "W_enc": gt.T.clone(),
        "b_enc": torch.zeros(32),
        "b_dec": torch.zeros(16),
    }
    m = metrics.ground_truth_metrics(perfect, gt)
    assert m["gt_mmcs"] == pytest.approx(1.0) and m["gt_recovered"] == 1.0
    rand = {**perfect, "W_dec": torch.randn(32, 16)}
    assert metrics.ground_truth_metrics(rand, gt)["gt_recovered"] < 0.2
    x = torch.randn(500, 16)
    dead = {"W_enc": torch.zeros(16, 32), "b_enc": torch.zeros(32), "W_dec": gt, "b_dec": x.mean(0)}
    ev = metrics.evaluate(dead, x)
    assert (
        ev["l0"] == 0 and ev["dead_fraction"] == 1.0 and ev["fvu"] == pytest.approx(1.0, rel=1e-5)
    )


def test_grid_ids_and_splitting():
    assert grid.run_id(4, 1e-3, 0) == "r4-l1_1e-03-s0"
    assert grid.run_id(0.5, 1.5e-4, 2) == "r0.5-l1_1.5e-04-s2"
    assert grid.run_id(8, 0.0, 0) == "r8-l1_0-s0"
    assert grid.run_id(8, 0.0, 1, k=64, lr=3e-4) == "r8-k64-lr3e-04-s1"
    by_lr = grid.expand([32, 64], [4], 2, 16, "topk", "k", lrs=[1e-2, 1e-3])
    assert [r.run_id for r in by_lr[:4]] == [
        "r4-k32-lr1e-03-s0", "r4-k32-lr1e-03-s1", "r4-k32-lr1e-02-s0", "r4-k32-lr1e-02-s1",
    ]  # fmt: skip
    assert len(by_lr) == 8 and by_lr[0].learning_rate(3e-3) == 1e-3
    assert grid.expand([32], [4], 1, 16, "topk", "k")[0].learning_rate(3e-3) == 3e-3
    runs = grid.expand([1e-3, 1e-2, 0.0], [2, 8], 2, 16, "untied")
    assert len(runs) == 12 and runs[0].dict_ratio == 8 and runs[0].dict_size == 128
    ens = grid.group(runs, {8.0: 4, 2.0: 16})
    assert [len(e.members) for e in ens] == [
        3,
        3,
        6,
    ]  # 6 at ratio 8 split evenly under a budget of 4
    assert [e.dict_ratio for e in ens] == [8, 8, 2]  # larger ratios first
    assert len({m.run_id for e in ens for m in e.members}) == 12
    assert (
        grid.member_budget(64, 512, 1024, "float32", 1e12, on_gpu=False, max_members=0)
        == grid.CPU_MAX_MEMBERS
    )
    assert grid.member_budget(64, 512, 1024, "float32", 1e12, on_gpu=False, max_members=3) == 3
    per = grid.bytes_per_member(512, 4096, 4096, "float32")
    assert (
        grid.member_budget(512, 4096, 4096, "float32", 10 * per / 0.8, on_gpu=True, max_members=0)
        == 10
    )
    with pytest.raises(SweepError, match="device budget") as err:
        grid.member_budget(512, 4096, 4096, "float32", per / 2, on_gpu=True, max_members=0)
    assert f"needs {memory_text(per)} (weights and Adam state " in str(err.value)
    assert "more than the device budget (" in str(err.value)
    assert "of launch.device_memory_gb or the memory found, per ensemble" in str(err.value)
    assert str(err.value).endswith("; use a smaller train.batch_size or a smaller dict ratio")
    state = grid.bytes_per_member(512, 4096, 0, "float32")  # (a smaller batch cannot help)
    with pytest.raises(SweepError) as err:
        grid.member_budget(512, 4096, 4096, "float32", state, True, 0, share=0.25)
    assert str(err.value).endswith(
        "; use launch.gpus_per_ensemble=1 (it gives each 0.25 of a GPU) or a smaller dict ratio"
    )
    assert memory_text(1.5 * 2**30) == "1.50 GiB" and memory_text(2**21) == "2.0 MiB"
    assert memory_text(3 * 2**40) == "3.00 TiB" and memory_text(512) == "512 bytes"
    budget = 10 * per / 0.8  # grid.max_members caps what fits; it never exceeds it
    assert grid.member_budget(512, 4096, 4096, "float32", budget, True, max_members=64) == 10
    assert grid.member_budget(512, 4096, 4096, "float32", budget, True, max_members=4) == 4
    wide = grid.spread(grid.group(grid.expand(L1S8, [8, 32], 1, 64, "untied"), {8: 8, 32: 8}), 8)
    assert [(e.ensemble_id, len(e.members)) for e in wide] == [
        ("r32-e0", 1), ("r32-e1", 1), ("r32-e2", 1), ("r32-e3", 1), ("r32-e4", 2),
        ("r32-e5", 2), ("r8-e0", 4), ("r8-e1", 4),
    ]  # fmt: skip
    assert sorted(m.run_id for e in wide for m in e.members) == sorted(
        m.run_id for m in grid.expand(L1S8, [8, 32], 1, 64, "untied")
    )
    assert grid.spread(wide[:2], 8) == wide[:2]  # single members: nothing left to split
    bf16, aux = (grid.bytes_per_member(512, 4096, 4096, "bfloat16", n) for n in (3, 7))
    assert aux > bf16  # AuxK's buffers
    assert grid.member_budget(512, 4096, 4096, "bfloat16", 10 * bf16 / 0.8, True, 0, buffers=7) < 10


L1S8 = [1e-3 * (i + 1) for i in range(8)]


def test_diverged_member_is_marked_and_others_finish(tiny_store, tmp_path):
    job = job_for(tiny_store, tmp_path, l1s=(1e-3, 1e38))  # l1 * sparsity overflows: loss = inf
    res = train_ensemble(job)
    assert res.states == {"r2-l1_1e-03-s0": "done", "r2-l1_1e+38-s0": "diverged"}
    bad = rundir.run_dir(tmp_path, "r2-l1_1e+38-s0")
    assert json.loads((bad / "diverged.json").read_text())["step"] == 1
    final = json.loads((bad / "metrics.json").read_text())
    assert final["state"] == "diverged" and final["diverged_step"] == 1
    assert final["steps"] == final["rows_trained"] == 0  # the first step updated nothing
    assert RunFolder(bad).state() == "diverged" and RunFolder(bad).is_done()
    good = json.loads((rundir.run_dir(tmp_path, "r2-l1_1e-03-s0") / "metrics.json").read_text())
    assert good["state"] == "done" and good["fvu"] < 0.5


def test_all_checkpoints_corrupt_restarts_and_says_so(tiny_store, tmp_path, caplog):
    ref, cut = reference_and_interrupted(tiny_store, tmp_path)
    for m in cut.ensemble.members:
        for c in checkpoints.list_checkpoints(rundir.run_dir(tmp_path / "cut", m.run_id)):
            c.write_bytes(c.read_bytes()[:100])  # truncated
    with caplog.at_level(logging.WARNING, logger="sweep.restore"):
        assert train_ensemble(cut).resumed_from == 0
    for m in ref.ensemble.members:
        d = rundir.run_dir(tmp_path / "cut", m.run_id)
        events = [json.loads(ln) for ln in (d / "events.jsonl").read_text().splitlines()]
        bad = [e for e in events if e["event"] == "bad_checkpoint"]
        assert len(bad) == 2 and all(e["action"] == "restarted from scratch" for e in bad)
        (fallback,) = [e for e in events if e["event"] == "resume_fallback"]
        assert fallback["newest"] == 20 and fallback["resumed_from"] == 0
        assert "step 20:" in fallback["reason"] and "step 14:" in fallback["reason"]
        assert (
            f"run {m.run_id} (ensemble r2-e0): newest checkpoint is step 20 but resuming from scratch"
            in caplog.text
        )
        assert digest(rundir.run_dir(tmp_path / "ref", m.run_id)) == digest(d)
        assert (rundir.run_dir(tmp_path / "ref", m.run_id) / "metrics.jsonl").read_text() == (
            d / "metrics.jsonl"
        ).read_text()


def test_kill_between_member_saves_resumes_from_common_step(tiny_store, tmp_path):
    ref, cut = reference_and_interrupted(tiny_store, tmp_path)
    dirs = [rundir.run_dir(tmp_path / "cut", m.run_id) for m in cut.ensemble.members]
    checkpoints.list_checkpoints(dirs[1])[-1].unlink()  # killed after member 0's save, before 1's
    assert checkpoints.checkpoint_steps(dirs[0]) != checkpoints.checkpoint_steps(dirs[1])
    ensemble_of = {m.run_id: cut.ensemble.ensemble_id for m in cut.ensemble.members}
    specs = [m.as_dict() for m in cut.ensemble.members]
    SweepFolder(tmp_path / "cut").write_manifest(specs, ensemble_of, tiny_store)
    groups, kept, fresh = resume_groups(SweepFolder(tmp_path / "cut"), list(cut.ensemble.members))
    assert groups == [list(cut.ensemble.members)] and not kept and not fresh  # no step chosen
    assert train_ensemble(cut).resumed_from == 14  # the worker's choice: the common step
    events = [json.loads(ln) for ln in (dirs[0] / rundir.EVENTS).read_text().splitlines()]
    assert [(e["event"], e["newest"], e["resumed_from"]) for e in events] == [
        ("resume_fallback", 20, 14)
    ]
    assert events[0]["reason"] == f"step 20: no checkpoint in {dirs[1].name}"
    assert not (dirs[1] / rundir.EVENTS).exists()  # its newest is the step resumed from
    for m, d in zip(ref.ensemble.members, dirs, strict=True):
        a = rundir.run_dir(tmp_path / "ref", m.run_id)
        assert digest(a) == digest(d)
        assert (a / "metrics.jsonl").read_text() == (d / "metrics.jsonl").read_text()


def test_a_second_kill_between_member_saves_after_a_fallback_still_finds_a_common_step(
    tiny_store, tmp_path
):
    """After falling back from step 20 to 14, the members' next save (a stop at 17) prunes the
    unusable step 20 rather than step 14: killed again between two members' saves, they still
    share step 14 (with 20 kept, member 0 would hold {17, 20}, member 1 {14}: from scratch)."""
    ref, cut = reference_and_interrupted(tiny_store, tmp_path)
    dirs = [rundir.run_dir(tmp_path / "cut", m.run_id) for m in cut.ensemble.members]
    checkpoints.list_checkpoints(dirs[1])[-1].unlink()  # killed between the saves of step 20
    assert train_ensemble(cut, should_stop=stop_after(3)).resumed_from == 14  # stops at 17
    assert checkpoints.checkpoint_steps(dirs[0]) == {14, 17}
    checkpoints.path_of(dirs[1], 17).unlink()  # killed between the saves of step 17
    assert train_ensemble(cut).resumed_from == 14
    for m, d in zip(ref.ensemble.members, dirs, strict=True):
        assert digest(rundir.run_dir(tmp_path / "ref", m.run_id)) == digest(d)


def test_a_kill_between_member_saves_past_the_step_fallen_back_from_keeps_a_common_step(
    tiny_store, tmp_path
):
    """Fallen back from step 20 to 14, the members' next save lands past 20 (a stop at 21; a
    time-based or the end checkpoint does as often): the unusable 20 is dropped as the resume
    starts, so the save keeps 14 rather than 20 as the one before. Killed between the two
    members' saves of 21, they still share 14 (member 0 held {20, 21}, member 1 {14}: all the
    training was redone from scratch)."""
    ref, cut = reference_and_interrupted(tiny_store, tmp_path)
    dirs = [rundir.run_dir(tmp_path / "cut", m.run_id) for m in cut.ensemble.members]
    checkpoints.list_checkpoints(dirs[1])[-1].unlink()  # killed between the saves of step 20
    assert train_ensemble(cut, should_stop=stop_after(7)).resumed_from == 14  # stops at 21
    assert (
        checkpoints.checkpoint_steps(dirs[0]) == checkpoints.checkpoint_steps(dirs[1]) == {14, 21}
    )
    checkpoints.path_of(dirs[1], 21).unlink()  # killed between the saves of step 21
    assert train_ensemble(cut).resumed_from == 14
    events = [json.loads(ln) for ln in (dirs[0] / rundir.EVENTS).read_text().splitlines()]
    assert [(e["event"], e["newest"], e["resumed_from"]) for e in events] == [
        ("resume_fallback", 20, 14),
        ("resume_fallback", 21, 14),
    ]
    for m, d in zip(ref.ensemble.members, dirs, strict=True):
        assert digest(rundir.run_dir(tmp_path / "ref", m.run_id)) == digest(d)


def test_a_failed_background_checkpoint_write_stops_training_at_once(
    tiny_store, tmp_path, monkeypatch
):
    """A checkpoint written in the background that fails (a full disk) stops the ensemble at
    the next logging step with that error, not at the next checkpoint (minutes later), and
    the checkpoint before it stays."""
    real = rundir.RunFolder.save_checkpoint

    def save(self, ckpt):
        if ckpt.step == 14:
            raise OSError(28, "No space left on device")
        real(self, ckpt)

    monkeypatch.setattr(rundir.RunFolder, "save_checkpoint", save)
    steps = []

    def should_stop() -> bool:
        steps.append(None)
        time.sleep(0.02)  # (time for the writer thread to fail)
        return False

    job = job_for(tiny_store, tmp_path, log_every=1)
    with pytest.raises(OSError, match="No space left on device"):
        train_ensemble(job, should_stop=should_stop)
    assert 14 <= len(steps) < 20  # (before, it raised at the next checkpoint: step 21)
    for m in job.ensemble.members:
        assert checkpoints.checkpoint_steps(rundir.run_dir(tmp_path, m.run_id)) == {7}


def test_an_ensemble_that_fails_closes_its_logger_as_failed(tiny_store, tmp_path, monkeypatch):
    """Its wandb runs are marked failed at once, not whenever (if ever) the logger is
    collected: a GPU task's process may exit first, leaving them "running" there."""
    from sweep import logger, worker
    from sweep.ensemble import Ensemble

    closes = []

    class Recording(logger.RunLogger):
        def close(self, timeout=None, stopped=False):
            closes.append((stopped, timeout))
            return True

    monkeypatch.setattr(worker, "make_logger", lambda *a: Recording())
    real = Ensemble.step

    def step(self, *a, **kw):
        if self.rows >= 10 * 256:
            raise RuntimeError("a kernel failed")
        return real(self, *a, **kw)

    monkeypatch.setattr(Ensemble, "step", step)
    with pytest.raises(RuntimeError, match="a kernel failed"):
        train_ensemble(job_for(tiny_store, tmp_path, log_every=1))
    assert closes == [(False, worker.FAILED_CLOSE_TIMEOUT)]
    monkeypatch.setattr(Ensemble, "step", real)
    job = job_for(tiny_store, tmp_path / "again")
    train_ensemble(job)
    (rundir.run_dir(tmp_path / "again", job.ensemble.members[0].run_id) / "metrics.json").unlink()
    closes.clear()

    def fails(*a, **kw):
        raise RuntimeError("evaluation failed")

    monkeypatch.setattr(metrics, "evaluate_members", fails)
    with pytest.raises(RuntimeError, match="evaluation failed"):  # (evaluated again: lost)
        train_ensemble(job)
    assert closes == [(False, worker.FAILED_CLOSE_TIMEOUT)]


def test_the_curve_is_on_disk_before_each_checkpoint(tiny_store, tmp_path, monkeypatch):
    """A power loss after checkpoint s must not leave the curve's record of step s torn: the
    resume from s drops a torn line and never writes that record again."""
    import os

    synced = []
    real = os.fsync

    def fsync(fd: int) -> None:
        synced.append(Path(os.readlink(f"/proc/self/fd/{fd}")).name)
        real(fd)

    if not Path("/proc/self/fd").is_dir():
        pytest.skip("no /proc here")
    monkeypatch.setattr(os, "fsync", fsync)
    train_ensemble(job_for(tiny_store, tmp_path, l1s=(1e-3,), log_every=7))
    first = next(i for i, n in enumerate(synced) if n.startswith(".checkpoint-"))
    assert rundir.CURVE in synced[:first]


def test_a_file_named_like_a_checkpoint_without_a_step_is_not_one(tmp_path):
    """A copy such as ``checkpoint-000000020-copy.safetensors`` is neither listed nor pruned."""
    saved = checkpoints.Checkpoint(20, {"param.W": torch.randn(2, 3)}, {})
    checkpoints.save_checkpoint(tmp_path, saved)
    copy = tmp_path / "checkpoint-000000020-copy.safetensors"
    copy.write_bytes(checkpoints.path_of(tmp_path, 20).read_bytes())
    for step in (21, 22):
        checkpoints.save_checkpoint(tmp_path, checkpoints.Checkpoint(step, saved.tensors, {}))
    assert checkpoints.checkpoint_steps(tmp_path) == {21, 22} and copy.exists()


def test_plan_keeps_previous_ensembles_apart_and_each_resumes_its_own_step(tiny_store, tmp_path):
    """Previous ensembles a (2 members) and b stopped at step 20, c at 10, e (2 members) at 10
    with one member's checkpoints lost, d never started; b's newest checkpoint is damaged.
    Planned apart (b beside a would drag a back to 14), e kept whole (it restarts, loudly),
    each resumes from its own verified step and ends bit-identical to an uninterrupted run."""
    l1s = [1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0]
    runs = grid.expand(l1s, [2.0], 1, tiny_store.width, "untied")
    parts = [runs[0:2], runs[2:3], runs[3:4], runs[4:6], runs[6:]]  # a b c e d
    before = [
        grid.EnsembleSpec(f"r2-e{i}", 2.0, runs[0].dict_size, tuple(m)) for i, m in enumerate(parts)
    ]
    ensemble_of = {r.run_id: e.ensemble_id for e in before for r in e.members}
    for name in ("ref", "cut"):
        (tmp_path / name).mkdir()
        SweepFolder(tmp_path / name).write_manifest(
            [r.as_dict() for r in runs], ensemble_of, tiny_store
        )
    for ens in before:
        train_ensemble(spec_job(tiny_store, tmp_path / "ref", ens))
    for ens, stop in zip(before[:4], (20, 20, 10, 10), strict=True):
        train_ensemble(spec_job(tiny_store, tmp_path / "cut", ens), should_stop=stop_after(stop))
    cut = {r.run_id: rundir.run_dir(tmp_path / "cut", r.run_id) for r in runs}
    damaged = checkpoints.path_of(cut[runs[2].run_id], 20)
    damaged.write_bytes(damaged.read_bytes()[:-1])
    checkpoints.clear_checkpoints(cut[runs[5].run_id])
    cfg = to_sweep_config(
        compose([f"sweep_dir={tmp_path / 'cut'}", f"grid.l1=[{','.join(map(str, l1s))}]",
                 "grid.dict_ratio=[2]", "grid.seeds=1", "train.batch_size=256"])
    )  # fmt: skip
    p = planning.plan(cfg, tiny_store.width, 1e12, on_gpu=False)
    assert (
        [(e.ensemble_id, e.members) for e in p.ensembles]
        == [
            ("r2-e0", tuple(runs[0:2])),  # each under the id it trained under
            ("r2-e1", (runs[2],)),
            ("r2-e2", (runs[3],)),
            ("r2-e3", tuple(runs[4:6])),
            ("r2-e4", (runs[6],)),  # planned, never started: its id too
        ]
    )
    assert planning.plan(cfg, tiny_store.width, 1e12, on_gpu=False) == p  # stable ids
    resumed = [train_ensemble(spec_job(tiny_store, tmp_path / "cut", e)) for e in p.ensembles]
    assert [r.resumed_from for r in resumed] == [20, 14, 10, 0, 0]
    for i, want in {
        0: [],
        2: ["bad_checkpoint", "resume_fallback"],
        4: ["resume_fallback"],
    }.items():
        events = cut[runs[i].run_id] / rundir.EVENTS
        lines = events.read_text().splitlines() if events.exists() else []
        assert [json.loads(ln)["event"] for ln in lines] == want, runs[i].run_id
    for r in runs:
        assert digest(rundir.run_dir(tmp_path / "ref", r.run_id)) == digest(cut[r.run_id]), r.run_id


def spec_job(store, sweep_dir, ens: grid.EnsembleSpec) -> EnsembleJob:
    return EnsembleJob(ens, str(sweep_dir), str(store.path), True, 2048, tiny_train(), threads=1)


def test_load_checkpoint_opens_the_file_once(tmp_path, monkeypatch):
    """Verified and loaded from one opening: the file is gone once it is open."""
    import safetensors

    saved = checkpoints.Checkpoint(7, {"param.W": torch.randn(3, 4)}, {"cursor": {"epoch": 1}})
    checkpoints.save_checkpoint(tmp_path, saved)
    path, real, opened = checkpoints.path_of(tmp_path, 7), safetensors.safe_open, []

    def open_once(name: str, *args, **kwargs):  # noqa: ANN202
        handle = real(name, *args, **kwargs)
        opened.append(Path(name))
        Path(name).unlink()  # a second opening of any kind would fail
        return handle

    monkeypatch.setattr(safetensors, "safe_open", open_once)
    got = checkpoints.load_checkpoint(path)
    assert opened == [path] and (got.step, got.meta) == (7, saved.meta)
    assert torch.equal(got.tensors["param.W"], saved.tensors["param.W"])


WIDTH_TIES = ("float64", "int64", "int32", "float16", "bfloat16", "int16", "int8", "uint8")
"""Dtypes that share a width (8, 4, 2, 1 bytes): safetensors orders them by dtype, then name."""


def test_checkpoint_files_are_the_bytes_safetensors_writes():
    """Streamed from the tensors' memory, a file is byte for byte what safetensors' own
    ``save`` makes of the same tensors (every dtype it lays out, scalars, empty and
    non-contiguous tensors), and safetensors reads every metadata entry back. (safetensors
    orders several metadata entries as its hash map does, so bytes are compared with one.)"""
    tensors = {
        "param.W_enc": torch.randn(6, 5).T,  # non-contiguous
        "adam.step.W_enc": torch.tensor(3.0),
        "buffer.since_fired": torch.zeros(0, 4),
        "b": torch.tensor([True, False, True]),
        **{t: torch.ones(2, dtype=getattr(torch, t)) for t in WIDTH_TIES},
    }
    dense = {k: v.contiguous() for k, v in tensors.items()}
    ours = io.BytesIO()
    one = {"note": "9 \u00fc\t\x01"}  # escaped as safetensors escapes it (non-ASCII kept)
    tensorfile.write(ours, tensors, one)
    assert ours.getvalue() == safetensors.torch.save(dense, metadata=one)
    meta = {"meta": json.dumps({"cursor": {"epoch": 1}}), "step": "9", "sha256": "ab" * 32}
    ours = io.BytesIO()
    tensorfile.write(ours, tensors, meta)
    data = ours.getvalue()
    back = safetensors.torch.load(data)
    assert all(torch.equal(back[k], v) and back[k].dtype == v.dtype for k, v in dense.items())
    header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
    assert header["__metadata__"] == meta
    with pytest.raises(ValueError, match="cannot write torch.complex64"):
        tensorfile.write(io.BytesIO(), {"z": torch.zeros(2, dtype=torch.complex64)}, {})


def _old_checkpoint(folder: Path, step: int, tensors: dict, form: str) -> Path:
    """A checkpoint as formats 1 and 2 wrote it (their checksums computed here, by hand)."""
    meta = {"meta": json.dumps({"cursor": {"epoch": 0}}), "step": str(step), "format": form}
    h = hashlib.sha256(f"{step}\n{meta['meta']}".encode() if form == "2" else b"")
    for k in sorted(tensors):
        h.update(k.encode())
        h.update(tensors[k].numpy().tobytes())
    meta["sha256"] = h.hexdigest()
    path = checkpoints.path_of(folder, step)
    path.write_bytes(safetensors.torch.save(tensors, metadata=meta))
    return path


def test_checkpoints_of_every_format_load_and_a_relabelled_dtype_is_caught(tmp_path):
    """Format 3's checksum covers each tensor's dtype and shape: a header edited to read the
    same bytes as another dtype (F32 -> I32) or shape no longer loads. Checkpoints written by
    earlier versions (formats 1 and 2) still load: a paused sweep resumes after an upgrade."""
    tensors = {"param.W": torch.randn(4, 6), "adam.step": torch.tensor(7.0)}
    for step, form in ((1, "1"), (2, "2")):
        old = checkpoints.load_checkpoint(_old_checkpoint(tmp_path, step, tensors, form))
        assert old.step == step and all(torch.equal(old.tensors[k], v) for k, v in tensors.items())
    checkpoints.save_checkpoint(tmp_path, checkpoints.Checkpoint(3, tensors, {"c": 1}), keep=9)
    path = checkpoints.path_of(tmp_path, 3)
    assert checkpoints.load_checkpoint(path).meta == {"c": 1}
    data = path.read_bytes()
    for edit in ((b'"F32","shape":[4,6]', b'"I32","shape":[4,6]'), (b"[4,6]", b"[6,4]")):
        assert data.count(edit[0]) == 1
        path.write_bytes(data.replace(*edit))
        with pytest.raises(ValueError, match="fails its checksum"):
            checkpoints.load_checkpoint(path)


def test_background_checkpoints_hold_the_state_of_their_step(tiny_store, tmp_path):
    """A checkpoint written while training went on equals one written with training held."""
    late = job_for(tiny_store, tmp_path / "late", checkpoint_every=10)
    before = time.time()
    res = train_ensemble(late, should_stop=stop_after(13))  # background write at 10, stop at 13
    assert res.timings["checkpoints"] == 2 and res.timings["checkpoint_write"] > 0
    assert before <= res.timings["started_at"] <= time.time() - res.timings["total"]
    held = job_for(tiny_store, tmp_path / "held", checkpoint_every=1000)
    train_ensemble(held, should_stop=stop_after(10))  # a stop waits for its write
    for m in late.ensemble.members:
        a = checkpoints.load_checkpoint(
            checkpoints.path_of(rundir.run_dir(tmp_path / "late", m.run_id), 10)
        )
        b = checkpoints.load_checkpoint(
            checkpoints.path_of(rundir.run_dir(tmp_path / "held", m.run_id), 10)
        )
        assert a.meta == b.meta
        for k in a.tensors:
            assert torch.equal(a.tensors[k], b.tensors[k]), k


def test_the_end_checkpoint_is_written_while_the_members_are_evaluated(
    tiny_store, tmp_path, monkeypatch
):
    """The end state's write overlaps the evaluation (it waits here until the evaluation has
    begun) and is on disk before the first final file; a failing evaluation still leaves it,
    so the retry resumes from the last step."""
    import threading

    from sweep.ckpt_writer import CheckpointWriter

    order, evaluating = [], threading.Event()
    write, evaluate, finish = (
        CheckpointWriter._write, metrics.evaluate_members, rundir.RunFolder.finish
    )  # fmt: skip

    def held_write(self, *args):  # noqa: ANN001, ANN202
        evaluating.wait(timeout=10)  # sequential (write, then evaluate): 10 s, then last
        write(self, *args)
        order.append("checkpoint written")

    def evaluated(*args, **kwargs):  # noqa: ANN202
        order.append("evaluation")
        evaluating.set()
        return evaluate(*args, **kwargs)

    def finished(self, result):  # noqa: ANN001, ANN202
        order.append("final files")
        finish(self, result)

    monkeypatch.setattr(CheckpointWriter, "_write", held_write)
    monkeypatch.setattr(metrics, "evaluate_members", evaluated)
    monkeypatch.setattr(rundir.RunFolder, "finish", finished)
    train_ensemble(job_for(tiny_store, tmp_path / "a", checkpoint_every=1000))
    assert order == ["evaluation", "checkpoint written", "final files", "final files"]

    def fails(*args, **kwargs):  # noqa: ANN202
        evaluating.set()
        raise RuntimeError("evaluation failed")

    monkeypatch.setattr(metrics, "evaluate_members", fails)
    job = job_for(tiny_store, tmp_path / "b", checkpoint_every=1000)
    with pytest.raises(RuntimeError, match="evaluation failed"):
        train_ensemble(job)
    monkeypatch.setattr(metrics, "evaluate_members", evaluate)
    res = train_ensemble(job)
    assert res.resumed_from == res.steps > 0


def test_planned_ensembles_that_never_checkpointed_keep_their_composition(tiny_store, tmp_path):
    """A sweep killed before any checkpoint restarts its ensembles as they were planned (an
    uninterrupted sweep trains them so), not split again to fill devices; runs added since
    are grouped, and spread, on their own."""
    l1s = [1e-3, 3e-3, 1e-2, 3e-2]
    runs = grid.expand(l1s, [2.0], 1, tiny_store.width, "untied")
    (tmp_path / "sw").mkdir()
    ensemble_of = {r.run_id: "r2-e0" for r in runs}
    SweepFolder(tmp_path / "sw").write_manifest(
        [r.as_dict() for r in runs], ensemble_of, tiny_store
    )
    cfg = to_sweep_config(
        compose([f"sweep_dir={tmp_path / 'sw'}", "grid.l1=[1e-3,3e-3,1e-2,3e-2,0.1,0.3]",
                 "grid.dict_ratio=[2]", "grid.seeds=1"])
    )  # fmt: skip
    p = planning.plan(cfg, tiny_store.width, 1e12, on_gpu=True, slots=4)
    added = grid.expand([0.1, 0.3], [2.0], 1, tiny_store.width, "untied")
    assert [(e.ensemble_id, e.members) for e in p.ensembles] == [
        ("r2-e0", tuple(runs)),
        ("r2-e1", (added[0],)),
        ("r2-e2", (added[1],)),
    ]


def test_an_ensemble_id_another_recorded_run_keeps_is_never_reused(tiny_store, tmp_path):
    """Runs a, b trained in r2-e0, then left the grid; c, d (planned as r2-e1, never
    checkpointed) go on alone, checkpoint, stop. When a and b return to the grid, each pair
    is planned as it trained: c, d must not have taken the id a and b still carry."""
    a, b, c, d = runs = grid.expand([1e-3, 3e-3, 1e-2, 3e-2], [2.0], 1, tiny_store.width, "untied")
    folder = SweepFolder(tmp_path / "sw")
    folder.path.mkdir()
    before = {a.run_id: "r2-e0", b.run_id: "r2-e0", c.run_id: "r2-e1", d.run_id: "r2-e1"}
    folder.write_manifest([r.as_dict() for r in runs], before, tiny_store)

    def plan(*l1s: float) -> planning.SweepPlan:
        cfg = to_sweep_config(
            compose([f"sweep_dir={folder.path}", f"grid.l1=[{','.join(map(str, l1s))}]",
                     "grid.dict_ratio=[2]", "grid.seeds=1"])
        )  # fmt: skip
        p = planning.plan(cfg, tiny_store.width, 1e12, on_gpu=False)
        folder.write_manifest([r.as_dict() for r in p.runs], p.ensemble_of(), tiny_store)
        return p

    p = plan(1e-2, 3e-2)
    assert [(e.ensemble_id, e.members) for e in p.ensembles] == [("r2-e1", (c, d))]
    for r in (c, d):
        path = checkpoints.path_of(folder.run(r.run_id).path, 10)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"stopped at step 10")
    p = plan(1e-3, 3e-3, 1e-2, 3e-2)
    assert sorted([m.run_id for m in e.members] for e in p.ensembles) == sorted(
        [[a.run_id, b.run_id], [c.run_id, d.run_id]]
    )


def test_a_resumed_ensemble_split_by_a_smaller_budget_is_reported(tiny_store, tmp_path, caplog):
    runs = grid.expand([1e-3, 3e-3, 1e-2, 3e-2], [2.0], 1, tiny_store.width, "untied")
    folder = SweepFolder(tmp_path / "sw")
    folder.path.mkdir()
    folder.write_manifest([r.as_dict() for r in runs], dict.fromkeys(
        [r.run_id for r in runs], "r2-e0"), tiny_store)  # fmt: skip
    path = checkpoints.path_of(folder.run(runs[0].run_id).path, 10)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"stopped at step 10")
    cfg = to_sweep_config(
        compose([f"sweep_dir={folder.path}", "grid.l1=[1e-3,3e-3,1e-2,3e-2]",
                 "grid.dict_ratio=[2]", "grid.seeds=1", "grid.max_members=2"])
    )  # fmt: skip
    with caplog.at_level(logging.INFO):
        p = planning.plan(cfg, tiny_store.width, 1e12, on_gpu=False)
    assert [(e.ensemble_id, len(e.members)) for e in p.ensembles] == [
        ("r2-e0.0", 2),
        ("r2-e0.1", 2),
    ]  # float32 on the CPU: a run's bits do not depend on its ensemble-mates
    assert (
        "resume in 2 ensembles, bit-identical all the same (float32 on the CPU); a larger "
        "grid.max_members keeps them together"
    ) in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        planning.plan(cfg, tiny_store.width, 1e12, on_gpu=True)
    assert "resume in 2 ensembles and will not be bit-identical" in caplog.text


def test_checkpoint_host_block_is_locked_once_on_whole_pages(monkeypatch):
    """On CUDA the snapshot block is page-locked once, over whole pages inside its own
    allocation (CUDA refuses a range touching a page already locked); every member's tensors
    are disjoint views of it."""
    from sweep import ckpt_writer, hostmem

    locked: list[tuple[int, int]] = []
    monkeypatch.setattr(
        hostmem, "_register", lambda b, what: locked.append((b.data_ptr(), b.numel()))
    )
    writer = ckpt_writer.CheckpointWriter([])
    like = [{"W": torch.zeros(3, 5), "n": torch.zeros((), dtype=torch.int64)} for _ in range(3)]
    views = writer._carve(like, pin=True)
    [(ptr, size)] = locked
    assert ptr % hostmem.PAGE == 0 and size % hostmem.PAGE == 0
    spans = sorted(
        (v.data_ptr(), v.data_ptr() + v.numel() * v.element_size())
        for m in views
        for v in m.values()
    )
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:], strict=False))
    assert ptr <= spans[0][0] and spans[-1][1] <= ptr + size
    assert [{k: (v.shape, v.dtype) for k, v in m.items()} for m in views] == [
        {k: (v.shape, v.dtype) for k, v in m.items()} for m in like
    ]
    for block in writer._blocks:
        block.locked = False  # nothing was really locked
    writer.close()


def test_a_host_block_too_large_to_lock_stays_pageable(monkeypatch):
    from sweep import hostmem

    monkeypatch.setattr(hostmem, "_register", lambda *_: pytest.fail("locked"))
    monkeypatch.setattr(hostmem, "MAX_LOCKED_SHARE", 1e-9)
    block = hostmem.HostBlock(1 << 20, lock=True, what="a test")
    assert not block.locked and block.data.numel() >= 1 << 20
    block.release()


@pytest.mark.parametrize(
    "overrides, buffers",
    [
        ([], 3),
        (["sae=topk", "grid.k=[4]"], 7),
        (["sae=topk", "grid.k=[4]", "train.auxk_alpha=0"], 3),
        (["sae=batchtopk", "grid.k=[4]"], 7),
        (["sae=jumprelu"], 4),
        (["sae=gated"], 4 + 64 / 128),  # + its gate's (B, D) error
        (["sae=matryoshka", "grid.k=[4]"], 7 + 4 * 64 / 128),  # + its levels' (B, D) errors
        (["sae=matryoshka", "grid.k=[4]", "sae.levels=[]"], 7),
    ],
)
def test_the_memory_model_counts_each_steps_batch_buffers(overrides, buffers, tmp_path):
    cfg = to_sweep_config(compose([f"sweep_dir={tmp_path}", *overrides]))
    assert planning.batch_buffers(cfg, 64, 128) == buffers


def test_a_run_resumed_by_another_step_program_says_so(tiny_store, tmp_path, caplog):
    """Checkpointed by the eager step, continued compiled: allowed (a machine or compiler
    change), but warned about and recorded, since it is not bit-identical."""
    train_ensemble(job_for(tiny_store, tmp_path, compile="false"), should_stop=stop_after(5))
    with caplog.at_level(logging.WARNING):
        job = job_for(tiny_store, tmp_path, compile="true")
        train_ensemble(job)
    assert "resumes with step program 'fast-compiled cpu float32'" in caplog.text
    for m in job.ensemble.members:
        events = rundir.run_dir(tmp_path, m.run_id) / rundir.EVENTS
        (event,) = [json.loads(ln) for ln in events.read_text().splitlines()]
        assert event.pop("time") > 0 and event == {
            "event": "step_program_change",
            "before": "fast cpu float32",
            "now": "fast-compiled cpu float32",
        }


def test_a_run_resumed_under_another_sweep_or_torch_says_so(
    tiny_store, tmp_path, caplog, monkeypatch
):
    """Checkpointed under another sweep version (an upgrade between a crash and the re-run):
    it continues, warned about and recorded, since exactness is no longer promised."""
    import sweep

    with monkeypatch.context() as m:
        m.setattr(sweep, "__version__", "0.0.9")
        train_ensemble(job_for(tiny_store, tmp_path), should_stop=stop_after(5))
    with caplog.at_level(logging.WARNING):
        job = job_for(tiny_store, tmp_path)
        train_ensemble(job)
    assert f"resumes under sweep {sweep.__version__}, torch {torch.__version__}" in caplog.text
    assert "written under sweep 0.0.9" in caplog.text
    for m in job.ensemble.members:
        events = rundir.run_dir(tmp_path, m.run_id) / rundir.EVENTS
        (event,) = [json.loads(ln) for ln in events.read_text().splitlines()]
        assert event["event"] == "software_change"
        assert event["before"]["sweep"] == "0.0.9" and event["now"]["sweep"] == sweep.__version__


def test_a_run_resumed_on_another_chip_model_says_so(tiny_store, tmp_path, caplog, monkeypatch):
    """Checkpointed on another processor model (a retry on another node type): it continues,
    warned about and recorded, since its kernels may round differently."""
    from sweep import restore
    from sweep.devices import processor

    here = processor(torch.device("cpu"))
    with monkeypatch.context() as m:
        m.setattr(restore, "processor", lambda device: "Other CPU")
        train_ensemble(job_for(tiny_store, tmp_path), should_stop=stop_after(5))
    with caplog.at_level(logging.WARNING):
        job = job_for(tiny_store, tmp_path)
        train_ensemble(job)
    assert f"resumes on {here}; its checkpoints were written on Other CPU" in caplog.text
    for m in job.ensemble.members:
        events = rundir.run_dir(tmp_path, m.run_id) / rundir.EVENTS
        (event,) = [json.loads(ln) for ln in events.read_text().splitlines()]
        assert event.pop("time") > 0
        assert event == {"event": "processor_change", "before": "Other CPU", "now": here}


def test_status_saved_is_where_the_ensemble_would_resume(tiny_store, tmp_path):
    """One member's newest checkpoint is gone (a kill between the members' saves): status
    says both continue from the older step they share, as the resume does."""
    from sweep.status import status_rows
    from tests.sweep_builder import write_manifest

    job = job_for(tiny_store, tmp_path)
    write_manifest(tmp_path, list(job.ensemble.members), tiny_store)
    train_ensemble(job, should_stop=stop_after(16))  # checkpoints at 14 and 16 (the stop)
    first, second = (rundir.run_dir(tmp_path, m.run_id) for m in job.ensemble.members)
    assert checkpoints.checkpoint_steps(first) == checkpoints.checkpoint_steps(second) == {14, 16}
    checkpoints.path_of(second, 16).unlink()
    saved = {r["run_id"]: r["rows_saved"] for r in status_rows(tmp_path)}
    assert saved == {first.name: 14 * 256, second.name: 14 * 256}
    cut = checkpoints.path_of(first, 14)  # a file cut short (a copy that stopped) counts not
    assert tensorfile.whole(cut)
    cut.write_bytes(cut.read_bytes()[:-1])
    assert not tensorfile.whole(cut)
    assert {r["rows_saved"] for r in status_rows(tmp_path)} == {0}


def test_status_saved_is_zero_for_every_run_that_would_start_over(tiny_store, tmp_path):
    from sweep.status import status_rows
    from tests.sweep_builder import write_manifest

    job = job_for(tiny_store, tmp_path)
    write_manifest(tmp_path, list(job.ensemble.members), tiny_store)
    rows = status_rows(tmp_path)
    assert [(r["state"], r["rows_saved"]) for r in rows] == [("pending", 0)] * len(rows)


def test_status_marks_metrics_of_training_batches(tiny_store, tmp_path, capsys):
    """A stopped run's l0/fvu come from its latest training batch: marked * and explained."""
    from sweep.status import print_status
    from tests.sweep_builder import write_manifest

    job = job_for(tiny_store, tmp_path)
    write_manifest(tmp_path, list(job.ensemble.members), tiny_store)
    train_ensemble(job, should_stop=stop_after(16))
    print_status(tmp_path)
    out = capsys.readouterr().out
    assert (
        re.search(r"\d \*", out)
        and "of the training batch it last logged (train.log_every); a finished" in out
    )


def test_a_task_ray_runs_again_counts_its_attempts(tiny_store, tmp_path):
    """The same Ray task id as the attempt that left placement.json: its worker died and Ray
    ran the task again. Each such attempt is counted and recorded in every member."""
    job = job_for(tiny_store, tmp_path)
    for attempt in (1, 2, 3):
        train_ensemble(
            replace(job, placement={"submission": "s", "task_id": "t1", "pid": attempt}),
            should_stop=stop_after(3),
        )
    # a new submission (a re-run sweep: Ray's task ids repeat across sessions)
    res = train_ensemble(
        replace(job, placement={"submission": "s2", "task_id": "t1"}), should_stop=stop_after(3)
    )
    assert res.attempt == 1
    for m in job.ensemble.members:
        events = rundir.run_dir(tmp_path, m.run_id) / rundir.EVENTS
        retried = [json.loads(ln) for ln in events.read_text().splitlines()]
        assert [(e["event"], e["attempt"], e["died"]["pid"]) for e in retried] == [
            ("worker_retried", 2, 1),
            ("worker_retried", 3, 2),
        ]


def test_memory_that_runs_out_is_one_line_naming_the_fix_and_keeps_checkpoints(
    tiny_store, tmp_path, monkeypatch
):
    """An allocation that fails mid-run (here the 10th step's; on a GPU a CUDA OOM) fails the
    ensemble with one line naming a smaller ensemble as the fix; its checkpoints stay and the
    same job continues from them."""
    from sweep.ensemble import Ensemble

    real, calls = Ensemble.step, iter(range(1, 1000))

    def step(self, *args, **kw):
        if next(calls) == 10:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(self, *args, **kw)

    monkeypatch.setattr(Ensemble, "step", step)
    job = job_for(tiny_store, tmp_path)
    with pytest.raises(SweepError) as err:
        train_ensemble(job)
    msg = str(err.value)
    assert "\n" not in msg
    assert "ensemble r2-e0 (2 member(s) of 16x32, batch 256, float32) ran out of memory" in msg
    assert "memory on cpu: re-run the command adding grid.max_members=1; its checkpoints" in msg
    monkeypatch.setattr(Ensemble, "step", real)
    assert train_ensemble(job).resumed_from == 7  # the checkpoint before the failure


def test_a_lone_member_that_does_not_fit_says_so(tiny_store, tmp_path, monkeypatch):
    from sweep.ensemble import Ensemble

    def step(self, *args, **kw):
        raise RuntimeError("[enforce fail] DefaultCPUAllocator: can't allocate memory: 9 GB")

    monkeypatch.setattr(Ensemble, "step", step)
    with pytest.raises(SweepError, match="ran out of host memory: one member alone does not fit"):
        train_ensemble(job_for(tiny_store, tmp_path, l1s=(1e-3,)))


def test_a_retried_ensemble_whose_results_are_written_keeps_them(tiny_store, tmp_path):
    """A worker killed after writing every result (checkpoints already cleared, e.g. while its
    tracker closed) is retried by Ray with the same job: it finishes at once, its results
    untouched, instead of training again from scratch over them; the retry is counted and
    recorded as any other (the driver says the worker died, not "done at step 0")."""
    job = replace(job_for(tiny_store, tmp_path), placement={"submission": "s", "task_id": "t"})
    train_ensemble(job)
    folders = [rundir.run_dir(tmp_path, m.run_id) for m in job.ensemble.members]
    before = [(digest(f), (f / "DONE").stat().st_mtime_ns) for f in folders]
    again = train_ensemble(job)
    assert (again.steps, again.attempt, set(again.states.values())) == (38, 2, {"done"})
    assert [(digest(f), (f / "DONE").stat().st_mtime_ns) for f in folders] == before
    for f in folders:
        assert json.loads((f / rundir.EVENTS).read_text())["event"] == "worker_retried"


def test_lm_metrics_that_cannot_run_are_recorded_and_never_cost_the_results(
    tiny_store, tmp_path, monkeypatch
):
    """A model that cannot be loaded, or LM metrics that fail midway (on a GPU: out of memory
    with the model beside the ensemble), leave every run finished with the reason in its
    metrics.json and events.jsonl; a failure does not block the ensemble on every re-run."""
    from sweep import lm_metrics

    gone = store_with_a_model(tiny_store, tmp_path / "a", str(tmp_path / "gone"))
    job = job_for(gone, tmp_path / "a" / "sw")
    assert set(train_ensemble(job).states.values()) == {"done"}
    for m in job.ensemble.members:
        run = rundir.run_dir(tmp_path / "a" / "sw", m.run_id)
        why = json.loads((run / "metrics.json").read_text())["lm_metrics_skipped"]
        assert "gone does not exist" in why
        assert "lm_metrics_skipped" in (run / "events.jsonl").read_text()

    def failing(ev, params, cfg):
        raise RuntimeError("CUDA error: out of memory")

    monkeypatch.setattr(lm_metrics.LMEval, "prepare", classmethod(lambda *a: (object(), None)))
    monkeypatch.setattr(lm_metrics, "members_metrics", failing)
    job = job_for(gone, tmp_path / "b")
    assert set(train_ensemble(job).states.values()) == {"done"}
    for m in job.ensemble.members:
        metrics_json = json.loads(
            (rundir.run_dir(tmp_path / "b", m.run_id) / "metrics.json").read_text()
        )
        assert metrics_json["lm_metrics_skipped"] == (
            "LM metrics failed (RuntimeError: CUDA error: out of memory)"
        )
        assert metrics_json["fvu"] < 1


def test_damaged_held_out_tokens_skip_lm_metrics_with_the_reason(tiny_store, tmp_path):
    import numpy as np

    from sweep import lm_metrics

    store = store_with_a_model(tiny_store, tmp_path, str(tmp_path / "model"))
    np.save(store.path / lm_metrics.EVAL_TOKENS_FILE, np.zeros(8, dtype=np.int32))  # 1-D
    ev, why = lm_metrics.LMEval.prepare(store, "cpu")
    assert ev is None and "unreadable (shape (8,), not (contexts, positions))" in why
    for bad in (b"garbage", b"PK\x03\x04 a truncated zip"):
        (store.path / lm_metrics.EVAL_TOKENS_FILE).write_bytes(bad)
        assert "unreadable" in lm_metrics.LMEval.prepare(store, "cpu")[1]
    np.save(store.path / lm_metrics.EVAL_TOKENS_FILE, np.zeros((4, 0), dtype=np.int32))
    assert "unreadable" in lm_metrics.LMEval.prepare(store, "cpu")[1]


def test_progress_is_each_members_rows_so_far_and_never_counts_rows_twice(tiny_store, tmp_path):
    """The worker reports the rows its members reached (absolute, from the step it continues
    from); the driver's counter keeps each run's most, so an ensemble continued from a
    checkpoint (a retry, a split, a resumed sweep) adds no rows it already counted."""
    from sweep.actors import ProgressCounter

    job = job_for(tiny_store, tmp_path)
    first: list[int] = []
    train_ensemble(job, progress=first.append, should_stop=stop_after(10))
    rest: list[int] = []
    result = train_ensemble(job, progress=rest.append)
    bs = job.train.batch_size
    assert first == sorted(first) and first[-1] == 10 * bs
    assert rest == sorted(rest) and rest[-1] == result.steps * bs
    assert result.resumed_from * bs < rest[0] <= (result.resumed_from + job.train.log_every) * bs
    ids = [m.run_id for m in job.ensemble.members]
    counter = ProgressCounter({ids[0]: 4 * bs})  # seeded with an earlier attempt's rows
    for rows in first + rest:
        counter.reach(ids, rows)
    assert counter.total() == len(ids) * result.steps * bs


def test_the_progress_bar_starts_where_each_ensemble_continues(tiny_store, tmp_path):
    """Seeded from checkpoint files: the newest step every member of an ensemble has (what
    the worker picks), not a curve that may run ahead of it; 0 without one."""
    from types import SimpleNamespace

    from sweep import execution

    runs = grid.expand([1e-3, 3e-3, 1e-2], [2.0], 1, tiny_store.width, "untied")
    two, one = grid.group(runs[:2], {2.0: 2}), grid.group(runs[2:], {2.0: 1})
    folder = SweepFolder(tmp_path)
    for run, steps in zip(runs, ((10, 20), (10,), ()), strict=True):
        for step in steps:
            path = checkpoints.path_of(folder.run(run.run_id).path, step)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"")
    cfg = SimpleNamespace(train=SimpleNamespace(batch_size=256))
    me = SimpleNamespace(cfg=cfg, folder=folder, plan=SimpleNamespace(ensembles=two + one))
    seeded = execution.Execution._rows_trained(me)  # type: ignore[arg-type]
    assert seeded == {runs[0].run_id: 2560, runs[1].run_id: 2560, runs[2].run_id: 0}


def cut_pair(store, tmp_path):
    """Two runs trained as one ensemble: finished in ``ref``, stopped at step 20 in ``cut``."""
    runs = grid.expand([1e-3, 3e-2], [2.0], 1, store.width, "untied")
    ens = grid.EnsembleSpec("r2-e0", 2.0, runs[0].dict_size, tuple(runs))
    for name in ("ref", "cut"):
        (tmp_path / name).mkdir()
        recorded = {r.run_id: ens.ensemble_id for r in runs}
        SweepFolder(tmp_path / name).write_manifest([r.as_dict() for r in runs], recorded, store)
    train_ensemble(spec_job(store, tmp_path / "ref", ens))
    train_ensemble(spec_job(store, tmp_path / "cut", ens), should_stop=stop_after(20))
    return runs, tmp_path / "cut"


def pair_cfg(sweep_dir, l1s: str = "1e-3,3e-2", *extra: str):
    overrides = [f"sweep_dir={sweep_dir}", f"grid.l1=[{l1s}]", "grid.dict_ratio=[2]"]
    train = ["train.batch_size=256", "train.lr=1e-2"]
    return to_sweep_config(compose([*overrides, "grid.seeds=1", *train, *extra]))


def test_a_deleted_manifest_loses_neither_the_ensembles_nor_the_store_check(tiny_store, tmp_path):
    """What a damaged manifest's message says to do (delete it, re-run): the runs' spec.json
    still say which ensemble each trained in and on which store."""
    runs, cut = cut_pair(tiny_store, tmp_path)
    (cut / "manifest.json").unlink()
    p = planning.plan(pair_cfg(cut), tiny_store.width, 1e12, on_gpu=False)
    assert [(e.ensemble_id, e.members) for e in p.ensembles] == [("r2-e0", tuple(runs))]
    other = tmp_path / "other"
    shutil.copytree(tiny_store.path, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["provenance"] = {**manifest["provenance"], "seed": 7}
    (other / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(SweepError, match="is not the store the runs in .* were trained on"):
        planning.check_store(SweepFolder(cut), ChunkStore(other))
    planning.check_store(SweepFolder(cut), tiny_store)
    train_ensemble(spec_job(tiny_store, cut, p.ensembles[0]))
    for r in runs:
        assert digest(rundir.run_dir(cut, r.run_id)) == digest(
            rundir.run_dir(tmp_path / "ref", r.run_id)
        )


def test_a_run_dropped_with_its_learning_rate_is_put_back_by_naming_it(tiny_store, tmp_path):
    runs = grid.expand([1e-3], [2.0], 1, tiny_store.width, "untied", lrs=[1e-3, 1e-2])
    folder = SweepFolder(tmp_path)
    folder.write_manifest([r.as_dict() for r in runs], {}, tiny_store)
    cfg = pair_cfg(tmp_path, "1e-3", "grid.lr=[1e-3]")
    assert planning._put_back(folder, runs[1].run_id, cfg) == "put grid.lr value 0.01 back"


def test_a_deleted_config_still_refuses_other_settings(tiny_store, tmp_path):
    runs, cut = cut_pair(tiny_store, tmp_path)
    folder = SweepFolder(cut)
    assert not (cut / "config.yaml").exists()  # as after deleting a damaged one
    planning.check_compatible(folder, pair_cfg(cut, "1e-3,3e-2", "train.log_every=3"))
    for change, diff, restore in [
        ("train.lr=1e-3", "train.lr 0.01 -> 0.001", "train.lr=0.01"),
        (
            "sae.init_decoder_norm=0.5",
            "sae.init_decoder_norm null -> 0.5",
            "sae.init_decoder_norm=null",
        ),
    ]:
        said = rf"different settings \({diff}\); use a new sweep_dir or restore those values \({restore}\)$"
        with pytest.raises(SweepError, match=said):
            planning.check_compatible(folder, pair_cfg(cut, "1e-3,3e-2", change))
    for r in runs:  # recorded by an older version: no sae settings, no recipe
        path = rundir.run_dir(cut, r.run_id) / rundir.SPEC
        spec = json.loads(path.read_text())
        for key in ("sae_settings", "recipe"):
            del spec[key]
        path.write_text(json.dumps({**spec, "train": {**spec["train"], "dtype": "bfloat16"}}))
    planning.check_compatible(folder, pair_cfg(cut))
    assert planning.recorded_dtype(folder) == "bfloat16"  # what train.dtype=auto keeps


def test_a_partial_ensembles_member_dropped_from_the_grid_is_warned_about(
    tiny_store, tmp_path, caplog
):
    """Said on the CPU (bit-identical all the same in float32), warned about on a GPU; the
    fix names the setting that dropped the run."""
    runs, cut = cut_pair(tiny_store, tmp_path)
    with caplog.at_level(logging.INFO, logger="sweep.planning"):
        p = planning.plan(pair_cfg(cut, "1e-3"), tiny_store.width, 1e12, on_gpu=False)
    assert [e.members for e in p.ensembles] == [(runs[0],)]
    assert (
        f"runs {runs[0].run_id} trained as one ensemble with {runs[1].run_id}, which the grid "
        "no longer holds: they resume without it, bit-identical all the same (float32 on the "
        f"CPU); put grid.l1 value {runs[1].l1:g} back to resume them together"
    ) in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="sweep.planning"):
        planning.plan(pair_cfg(cut, "1e-3"), tiny_store.width, 1e12, on_gpu=True)
    assert "resume without it and will not be bit-identical" in caplog.text


def test_only_ensembles_all_members_recorded_alike_are_trusted_from_spec_json():
    """A run whose attempt never started keeps an older record; ids are handed out per plan."""
    from sweep.sweepdir import _agreed_ensembles

    def spec(ens, *members):
        return {"ensemble": ens, "ensemble_members": list(members)}

    specs = {
        "a": spec("r2-e0", "a", "b"), "b": spec("r2-e0", "a", "b"),  # an earlier plan's r2-e0
        "c": spec("r2-e0", "c", "d"), "d": spec("r2-e0", "c", "d"),  # a later plan's r2-e0
        "e": spec("r2-e1", "e", "f"), "f": spec("r2-e2", "f"),  # f moved on: e's record is stale
        "g": {"ensemble": "r2-e3"},  # recorded before members were
    }  # fmt: skip
    got = _agreed_ensembles(specs)
    assert got["a"] == got["b"] != got["c"] == got["d"]
    assert got["f"] == "r2-e2" and "e" not in got and "g" not in got


def test_status_percentages_round_down_until_a_run_is_whole():
    from sweep.status import _percent

    assert [_percent(p, 288) for p in (0, 1, 287, 288)] == ["0%", "0%", "99%", "100%"]
    assert _percent(None, 288) == _percent(5, 0) == ""


def test_status_shows_only_the_states_asked_for(tiny_store, tmp_path, capsys, monkeypatch):
    from sweep.cli import main
    from sweep.status import print_status
    from tests.sweep_builder import write_manifest

    job = job_for(tiny_store, tmp_path)
    write_manifest(tmp_path, list(job.ensemble.members), tiny_store)
    ids = [m.run_id for m in job.ensemble.members]
    print_status(tmp_path, ("done", "failed"))
    out = capsys.readouterr().out
    assert "runs done, failed: 0 of 2)\n" in out and not any(i in out for i in ids)
    assert "┏" not in out  # no empty table: the title alone, on one line
    assert "pending: 2  total: 2" in out  # the totals count every run
    assert main(["status", str(tmp_path), "--state", "pending"]) == 0
    shown = capsys.readouterr().out
    assert all(i in shown for i in ids), shown
    monkeypatch.setenv("COLUMNS", "60")  # piped (pytest's capture): COLUMNS, when set, holds
    assert main(["status", str(tmp_path), "--state", "pending"]) == 0
    assert max(map(len, capsys.readouterr().out.splitlines())) <= 60
    with pytest.raises(SystemExit) as refused:  # (argparse's exit)
        main(["status", str(tmp_path), "--state", "pending,donee"])
    assert refused.value.code == 2
    assert "error: argument --state: unknown run state donee" in capsys.readouterr().err


def test_a_task_that_begins_after_the_stop_trains_nothing(tiny_store, tmp_path):
    """The stop file was written before Ray started the task: it returns at once, every member
    interrupted, marked not started (the log says so, not 'interrupted at step 0')."""
    from sweep.launcher import train_task

    job = job_for(tiny_store, tmp_path)
    (stop := tmp_path / "STOP").write_text("")
    result = train_task(job, None, str(stop))
    assert not result.started and result.steps == 0
    assert set(result.states.values()) == {"interrupted"}
    assert not any((tmp_path / "runs").glob("*/checkpoint-*"))


def test_runs_of_other_dictionary_sizes_start_independently():
    """train.init_seeding=per_ratio (the default): a run's initial atoms are not the leading
    atoms of the same seed's larger dictionary (that would inflate mmcs_next_ratio); runs
    that differ in l1 alone start alike. ``shared`` is what sweeps recorded before it did."""
    from sweep.config import TrainConfig
    from sweep.restore import init_member

    runs = grid.expand([1e-3, 1e-2], [2, 4], 2, 16, "untied")
    b_dec = torch.zeros(16)

    def start(run, seeding):
        return init_member(run, TrainConfig(seed=3, init_seeding=seeding), b_dec)["W_dec"]

    by = {(r.dict_ratio, r.l1, r.seed): r for r in runs}
    small, large, other_l1 = by[(2, 1e-3, 0)], by[(4, 1e-3, 0)], by[(2, 1e-2, 0)]
    shared_small, shared_large = start(small, "shared"), start(large, "shared")
    assert torch.equal(shared_small, shared_large[:32])  # the confound per_ratio removes
    g = torch.Generator().manual_seed(3 * 1_000_003 + 0)  # the recorded derivation, unchanged
    assert torch.equal(shared_small, init_params_of(small, g)["W_dec"])
    assert not torch.equal(start(small, "per_ratio"), start(large, "per_ratio")[:32])
    assert torch.equal(start(small, "per_ratio"), start(other_l1, "per_ratio"))
    assert not torch.equal(start(small, "per_ratio"), start(by[(2, 1e-3, 1)], "per_ratio"))


def init_params_of(run: grid.RunSpec, g: torch.Generator) -> dict:
    from sweep import archs

    return archs.get(run.arch).init_params(run.width, run.dict_size, g, torch.zeros(run.width))
