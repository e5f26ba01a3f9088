"""`sweep run` end to end through real Hydra composition and a real (shared) Ray instance."""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

import sweep as sweep_api
from sweep import rundir, startup
from sweep.cli import main
from tests.conftest import rehash_chunk

TINY = [
    "data.width=16",
    "data.n_features=32",
    "data.mean_active=3",
    "data.rows=12000",
    "data.rows_per_chunk=4096",
    "data.eval_rows=2048",
    "train.batch_size=256",
    "train.log_every=5",
    "train.checkpoint_every=10",
    "progress=false",
]


def sweep(tmp_path, *extra: str, name: str = "sw") -> int:
    return main(["run", f"sweep_dir={tmp_path / name}", *TINY, *extra])


def read_summary(path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def test_sweep_writes_every_run_and_summary(ray_cluster, tmp_path, capsys):
    assert sweep(tmp_path, "grid.l1=[1e-3,1e-2,1e-1]", "grid.dict_ratio=[1,2]") == 0
    out, err = capsys.readouterr()
    assert "generating synthetic store" not in err  # progress=false: no bars at all
    sw = tmp_path / "sw"
    assert "sweep summary" in out and "r2-l1_1e-02-s0" in out
    rows = read_summary(sw / "summary.csv")
    assert len(rows) == 6 and {r["state"] for r in rows} == {"done"}
    assert {
        "l1",
        "dict_ratio",
        "seed",
        "l0",
        "fvu",
        "dead_fraction",
        "gt_mmcs",
        "gt_recovered",
    } <= set(rows[0])
    manifest = json.loads((sw / "manifest.json").read_text())
    assert len(manifest["runs"]) == 6 and manifest["state"] == "done" and manifest["width"] == 16
    assert (sw / "config.yaml").exists() and (sw / "store" / "manifest.json").exists()
    assert not (sw / ".lock").exists()
    began = manifest["startup"]["began"]  # the driver's start-up phases, timed (sweep.startup)
    assert set(manifest["startup"]) == {"began", *startup.PHASES}
    assert "start-up took" in (sw / "sweep.log").read_text()
    for r in rows:
        d = sw / "runs" / r["run_id"]
        assert rundir.RunFolder(d).is_done() and (d / "sae.safetensors").exists()
        placement = json.loads((d / "placement.json").read_text())
        # the shared test cluster has 2 fake GPUs: tasks get one each (CUDA_VISIBLE_DEVICES set) and,
        # with no real CUDA, train on the CPU
        assert (
            placement["gpu_ids"]
            and placement["cuda_visible_devices"]
            and placement["device"] == "cpu"
        )
        assert began <= placement["task_began"] <= placement["time"]  # then the worker's
    capsys.readouterr()
    assert main(["status", str(sw)]) == 0
    status = capsys.readouterr().out
    assert "r2-l1_1e-02-s0" in status and "100%" in status and "done: 6" in status
    # FVU falls and L0 rises as L1 decreases
    for ratio in ("1.0", "2.0"):
        sel = sorted((r for r in rows if r["dict_ratio"] == ratio), key=lambda r: float(r["l1"]))
        fvu, l0 = [float(r["fvu"]) for r in sel], [float(r["l0"]) for r in sel]
        assert fvu == sorted(fvu) and l0 == sorted(l0, reverse=True)


def test_rerun_skips_done_and_adds_new_points(ray_cluster, tmp_path, monkeypatch, capsys):
    assert sweep(tmp_path, "grid.l1=[1e-2]", "grid.dict_ratio=[2]") == 0
    first = tmp_path / "sw" / "runs" / "r2-l1_1e-02-s0" / "sae.safetensors"
    stamp = first.stat().st_mtime_ns
    assert sweep(tmp_path, "grid.l1=[1e-2,3e-2]", "grid.dict_ratio=[2]") == 0
    assert first.stat().st_mtime_ns == stamp  # finished runs are never retrained
    rows = read_summary(tmp_path / "sw" / "summary.csv")
    assert [r["run_id"] for r in rows] == ["r2-l1_1e-02-s0", "r2-l1_3e-02-s0"]
    assert {r["state"] for r in rows} == {"done"}
    from sweep import launcher

    def no_ray(*_: object) -> None:
        raise AssertionError("Ray started for a grid with nothing to train")

    monkeypatch.setattr(launcher, "ray_session", no_ray)  # (it takes seconds to start)
    capsys.readouterr()
    assert sweep(tmp_path, "grid.l1=[3e-2]", "grid.dict_ratio=[2]") == 0  # a narrower grid
    assert (
        "every run of the grid (1) is already finished; nothing to train" in capsys.readouterr().err
    )
    assert read_summary(tmp_path / "sw" / "summary.csv") == rows  # the sweep's other run stays
    assert json.loads((tmp_path / "sw" / "manifest.json").read_text())["state"] == "done"
    shutil.rmtree(tmp_path / "sw" / "store")  # deleted to free the disk: not made again
    for plan in ([], ["--plan"]):
        args = [f"sweep_dir={tmp_path / 'sw'}", *TINY, "grid.l1=[3e-2]", "grid.dict_ratio=[2]"]
        assert main(["run", *plan, *args]) == 0
    assert not (tmp_path / "sw" / "store").exists()
    assert read_summary(tmp_path / "sw" / "summary.csv") == rows
    data = bytearray(first.read_bytes())  # a run outside the grid, damaged: hashed, not "done"
    data[-1] ^= 1
    first.write_bytes(bytes(data))
    assert main(["run", *args]) == 0
    (row,) = [
        r for r in read_summary(tmp_path / "sw" / "summary.csv") if r["run_id"] == first.parent.name
    ]
    assert row["state"] != "done" and "fails its checksum" in row["note"]
    shutil.rmtree(first.parent)  # a run outside the last grid: status says what continues it
    capsys.readouterr()
    assert main(["status", str(tmp_path / "sw")]) == 0
    said = " ".join(capsys.readouterr().out.split())
    assert (
        "its last grid was done when its driver ended; 1 run(s) outside that grid are not" in said
    )


def test_changed_settings_are_refused(ray_cluster, tmp_path, capsys):
    assert sweep(tmp_path, "grid.l1=[1e-2]", "grid.dict_ratio=[1]") == 0
    capsys.readouterr()
    assert (
        sweep(tmp_path, "grid.l1=[1e-2]", "grid.dict_ratio=[1]", "train.lr=0.5", "data.seed=3") == 2
    )
    err = capsys.readouterr().err
    assert "train.lr" in err and "data.seed" in err and len(err.strip().splitlines()) == 1


def test_a_learning_rate_axis_trains_names_and_reports_each_rate(ray_cluster, tmp_path, capsys):
    """``grid.lr``: each (l1, ratio) point at each rate, one ensemble per ratio; the rate in
    run ids, summary.csv, cfg.json and the report's lr.png; the sweep keeps its axis."""
    grid = ["grid.l1=[1e-2,3e-2]", "grid.dict_ratio=[2]", "grid.lr=[1e-3,1e-2]"]
    assert sweep(tmp_path, *grid, "train.snapshots=[0.5]") == 0
    sw = tmp_path / "sw"
    rows = read_summary(sw / "summary.csv")
    assert [(r["run_id"], float(r["lr"])) for r in rows] == [
        ("r2-l1_1e-02-lr1e-03-s0", 1e-3), ("r2-l1_1e-02-lr1e-02-s0", 1e-2),
        ("r2-l1_3e-02-lr1e-03-s0", 1e-3), ("r2-l1_3e-02-lr1e-02-s0", 1e-2),
    ]  # fmt: skip
    assert {r["state"] for r in rows} == {"done"}
    spec = json.loads((sw / "runs" / rows[1]["run_id"] / "spec.json").read_text())
    assert spec["lr"] == spec["train"]["lr"] == 1e-2  # (its spec's train: what it trained with)
    assert rows[0]["run_id"] in spec["ensemble_members"]  # one program
    half = round(0.5 * spec["total_steps"])  # (train.snapshots: the weights halfway, loadable)
    (snap,) = sweep_api.load_sweep(sw).snapshots(rows[1]["run_id"])
    assert snap[0] == half and snap[1].cfg["lr"] == 1e-2
    capsys.readouterr()
    assert sweep(tmp_path, *grid, "train.lr=0.5") == 0  # inert beside grid.lr: said, not refused
    assert "train.lr=0.5 does nothing here: grid.lr sets each run's" in capsys.readouterr().err
    assert sweep(tmp_path, *grid[:2]) == 2  # without the axis its run ids would be others
    assert "holds a sweep with a learning rate axis (grid.lr)" in capsys.readouterr().err
    saved = (sw / "config.yaml").read_text()  # an edited config.yaml cannot drop it either
    (sw / "config.yaml").write_text(saved.replace("  lr:\n  - 0.001\n  - 0.01\n", "  lr: null\n"))
    assert main(["resume", str(sw)]) == 2
    assert "grid.lr [0.001,0.01] -> null): it was edited" in capsys.readouterr().err
    (sw / "config.yaml").write_text(saved)
    assert main(["report", str(sw)]) == 0
    assert (sw / "report" / "lr.png").stat().st_size > 10_000
    assert "lr.png" in (sw / "report" / "index.html").read_text()


def test_resume_command_uses_saved_config(ray_cluster, tmp_path, capsys):
    assert sweep(tmp_path, "grid.l1=[1e-2]", "grid.dict_ratio=[1]", "grid.seeds=2") == 0
    shutil.rmtree(tmp_path / "sw" / "runs" / "r1-l1_1e-02-s1")
    assert main(["resume", str(tmp_path / "sw")]) == 0
    rows = read_summary(tmp_path / "sw" / "summary.csv")
    assert len(rows) == 2 and {r["state"] for r in rows} == {"done"}


def test_a_relative_data_path_is_saved_absolute(ray_cluster, tmp_path, monkeypatch, capsys):
    """A resume from another folder finds the store given relative to the first one (else
    data=synthetic made a second store there, data=chunks found none)."""
    (tmp_path / "a").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    grid = ["grid.l1=[1e-2]", "grid.dict_ratio=[1]", "data.path=../a/./stores/s"]
    assert main(["run", f"sweep_dir={tmp_path / 'sw'}", *TINY, *grid]) == 0
    saved = yaml.safe_load((tmp_path / "sw" / "config.yaml").read_text())
    assert saved["data"]["path"] == str(tmp_path / "a" / "stores" / "s")  # (no '..' left)
    monkeypatch.chdir(tmp_path)
    shutil.rmtree(tmp_path / "sw" / "runs" / "r1-l1_1e-02-s0")
    assert main(["resume", str(tmp_path / "sw")]) == 0
    assert not (tmp_path / "stores").exists()


def test_a_data_path_naming_the_sweeps_own_store_moves_with_it(ray_cluster, tmp_path, capsys):
    """``data.path=<sweep_dir>/store`` is the sweep's own store: recorded as such, so a moved
    sweep resumes on it (it was recorded absolute: a resume made a whole store again at the
    old place)."""
    grid = ["grid.l1=[1e-2]", "grid.dict_ratio=[1]", f"data.path={tmp_path / 'sw' / 'store'}"]
    assert main(["run", f"sweep_dir={tmp_path / 'sw'}", *TINY, *grid]) == 0
    assert "path: null" in (tmp_path / "sw" / "config.yaml").read_text()
    shutil.move(tmp_path / "sw", tmp_path / "moved")
    assert main(["resume", str(tmp_path / "moved"), "grid.l1=[1e-2,2e-2]"]) == 0
    assert not (tmp_path / "sw").exists()
    assert f"reusing synthetic store {tmp_path / 'moved' / 'store'}" in capsys.readouterr().err
    # as a version before recorded it (the path itself): read as the sweep's own too
    config = tmp_path / "moved" / "config.yaml"
    config.write_text(config.read_text().replace("path: null", f"path: {tmp_path}/moved/store"))
    shutil.move(tmp_path / "moved", tmp_path / "again")
    assert main(["resume", str(tmp_path / "again"), "grid.l1=[1e-2,3e-2]"]) == 0
    assert not (tmp_path / "moved").exists()


def test_a_store_gone_from_its_data_path_is_said_before_it_is_made_again(
    ray_cluster, tmp_path, capsys
):
    grid = ["grid.l1=[1e-2]", "grid.dict_ratio=[1]", f"data.path={tmp_path / 'ext'}"]
    assert main(["run", f"sweep_dir={tmp_path / 'sw'}", *TINY, *grid]) == 0
    shutil.move(tmp_path / "ext", tmp_path / "moved")
    shutil.rmtree(tmp_path / "sw" / "runs" / "r1-l1_1e-02-s0")
    capsys.readouterr()
    assert main(["resume", str(tmp_path / "sw")]) == 0
    err = " ".join(capsys.readouterr().err.split())
    assert f"the store this sweep trained on is not at {tmp_path / 'ext'}: making it again" in err
    assert "if it was moved, stop (Ctrl-C) and pass data.path=<where it is now>" in err


def test_a_mistyped_data_path_is_refused_while_the_sweeps_store_is_where_it_was(
    ray_cluster, tmp_path, capsys
):
    """Not a new store made at the typo (minutes of generation; a harvest: hours); nor the
    typo recorded by a run of the finished grid (which needs no store), for the next grid
    to make a new store there."""
    sw, typo = tmp_path / "sw", tmp_path / "typo"
    grid = ["grid.l1=[1e-2]", "grid.dict_ratio=[1]"]
    assert main(["run", f"sweep_dir={sw}", *TINY, *grid]) == 0
    config = (sw / "config.yaml").read_bytes()
    finished = ["resume", str(sw)]
    for argv in (finished, ["evaluate", str(sw)], ["run", f"sweep_dir={sw}", *TINY, *grid]):
        if argv[0] == "run":  # (its run no longer finished)
            shutil.rmtree(sw / "runs" / "r1-l1_1e-02-s0")
        capsys.readouterr()
        assert main([*argv, f"data.path={typo}"]) == 2
        err = capsys.readouterr().err.strip()
        assert err == (
            f"error: data.path {typo} holds no store, and this sweep's store is still at "
            f"{sw / 'store'}; leave data.path out (or pass data.path={sw / 'store'})"
        )
        assert not typo.exists() and (sw / "config.yaml").read_bytes() == config


@pytest.mark.parametrize("plan", [["--plan"], []])
def test_a_store_to_be_made_in_the_sweep_folder_or_around_it_is_refused(tmp_path, capsys, plan):
    """(The store's folder would hold the sweep's files; the generator then refused it as
    "a non-empty folder", though the user named a new one, and --plan took it.)"""
    dotted = tmp_path / "c" / "x" / ".." / "sw"  # (its refused run left c/x behind)
    pairs = ((tmp_path / "a", tmp_path / "a"), (tmp_path / "b", tmp_path / "b" / "sw"))
    (tmp_path / "e" / "mine").mkdir(parents=True)  # a folder of the user's, empty: kept
    mine = (tmp_path / "e", tmp_path / "e" / "x" / ".." / "mine" / "sw")
    for store, sw in (*pairs, (tmp_path / "c", dotted), mine):
        capsys.readouterr()
        assert main(["run", *plan, f"sweep_dir={sw}", *TINY, f"data.path={store}"]) == 2
        where = "is sweep_dir itself" if store == sw else f"holds sweep_dir {sw}"
        assert capsys.readouterr().err.strip() == (
            f"error: data.path {store} {where}; leave data.path out (the store then goes in "
            f"{sw / 'store'}) or name a folder outside the sweep's"
        )
        assert not store.exists() or store == tmp_path / "e"
    assert [p.name for p in (tmp_path / "e").iterdir()] == ["mine"]
    assert not any((tmp_path / "e" / "mine").iterdir())
    sw = tmp_path / "d"  # a store in a folder the sweep writes: refused, data=chunks too
    for data in (TINY, ["data=chunks"]):
        argv = ["run", *plan, f"sweep_dir={sw}", *data, f"data.path={sw / 'report'}"]
        assert main(argv) == 2
        assert (
            capsys.readouterr()
            .err.strip()
            .startswith(
                f"error: data.path {sw / 'report'} lies in the sweep's report/ folder, which sweep "
                "writes;"
            )
        )
    assert not sw.exists()


@pytest.fixture
def nan_store(tmp_path):
    src = tmp_path / "made"
    assert (
        sweep(tmp_path, "grid.l1=[1e-2]", "grid.dict_ratio=[1]", "train.epochs=1", name="made") == 0
    )
    store = tmp_path / "nanstore"
    shutil.copytree(src / "store", store)
    arr = np.load(store / "chunk_00001.npy")
    arr[5, 2] = np.inf
    np.save(store / "chunk_00001.npy", arr)
    rehash_chunk(store, "chunk_00001.npy")  # (written so: not a changed chunk)
    return store


def test_bad_stores_fail_before_training(ray_cluster, tmp_path, nan_store, capsys):
    capsys.readouterr()
    cases = [
        ([f"data.path={tmp_path / 'nothing'}"], "does not exist"),
        ([f"data.path={nan_store}"], "contains NaN or inf"),
    ]
    for extra, needle in cases:
        code = main(
            ["run", "data=chunks", f"sweep_dir={tmp_path / 'bad'}", "progress=false", *extra]
        )
        err = capsys.readouterr().err
        assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "bad" / "runs").exists()


def test_width_mismatch_with_existing_sweep(ray_cluster, tmp_path, capsys):
    assert sweep(tmp_path, "grid.l1=[1e-2]", "grid.dict_ratio=[1]") == 0
    other = tmp_path / "other"
    assert (
        sweep(tmp_path, "grid.l1=[1e-2]", "grid.dict_ratio=[1]", "data.width=8", name="other") == 0
    )
    capsys.readouterr()
    code = main(
        [
            "run",
            "data=chunks",
            f"data.path={other / 'store'}",
            f"sweep_dir={tmp_path / 'sw'}",
            "grid.l1=[1e-2]",
            "grid.dict_ratio=[1]",
            "progress=false",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and ("width" in err), err


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_sweep_dir(tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o500)
    assert sweep(ro, "grid.l1=[1e-2]") == 2
    assert "not writable" in capsys.readouterr().err


def test_a_plan_refuses_a_sweep_dir_the_run_could_not_write(tmp_path, capsys, monkeypatch):
    """(a read-only mount: --plan planned what the run refused; os.access as it answers
    there, since root, which runs these tests, writes through file modes)"""
    from sweep import preview

    ro = tmp_path / "ro"
    ro.mkdir()
    real = os.access
    monkeypatch.setattr(preview.os, "access", lambda p, m: Path(p) != ro and real(p, m))
    assert main(["run", "--plan", f"sweep_dir={ro / 'sw'}", *TINY]) == 2
    err = capsys.readouterr().err
    assert f"error: sweep_dir {ro / 'sw'} is not writable ({ro} is not: read-only" in err


def test_unwritable_sweep_dir_under_a_file(tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    assert main(["run", f"sweep_dir={tmp_path / 'afile' / 'sw'}", *TINY]) == 2
    err = capsys.readouterr().err
    assert "sweep_dir" in err and "not writable" in err and len(err.strip().splitlines()) == 1


def test_second_driver_is_refused_while_lock_is_live(ray_cluster, tmp_path, capsys):
    import socket

    sw = tmp_path / "sw"
    sw.mkdir()
    (sw / ".lock").write_text(
        json.dumps({"host": socket.gethostname(), "pid": os.getppid(), "started": 0})
    )
    assert sweep(tmp_path, "grid.l1=[1e-2]", "grid.dict_ratio=[1]") == 2
    err = capsys.readouterr().err
    assert "is being run by pid" in err and f"stop it: 'sweep stop {sw}'" in err
    (sw / ".lock").write_text(
        json.dumps({"host": socket.gethostname(), "pid": 2**22 + 12345, "started": 0})
    )
    assert sweep(tmp_path, "grid.l1=[1e-2]", "grid.dict_ratio=[1]") == 0  # stale lock taken over
    assert not (sw / ".lock").exists()


def test_a_jumprelu_sweep_too_short_to_sparsify_is_warned_about(ray_cluster, tmp_path, capsys):
    """Adam moves a log-threshold ~lr a step: a few hundred steps cannot lift JumpReLU's
    thresholds from 1e-3 to where the L0 penalty acts; the sweep says so and trains."""
    capsys.readouterr()
    args = ("sae=jumprelu", "sae.recipe=log", "grid.l1=[1e-3]", "grid.dict_ratio=[1]")
    assert sweep(tmp_path, *args) == 0
    err = capsys.readouterr().err
    assert "jumprelu thresholds (sae.recipe=log) start at 0.001" in err, err


def test_a_renamed_sweep_keeps_its_wandb_group(ray_cluster, tmp_path):
    """logger.group defaults to the sweep folder's name when the sweep begins, and is kept
    (config.yaml): the runs of a sweep renamed since stay in one wandb group."""
    import shutil

    from omegaconf import OmegaConf

    def group(name: str) -> str:
        return OmegaConf.load(tmp_path / name / "config.yaml").logger.group

    assert sweep(tmp_path, "grid.l1=[1e-2]", "grid.dict_ratio=[1]", name="first") == 0
    assert group("first") == "first"
    shutil.move(tmp_path / "first", tmp_path / "renamed")
    assert sweep(tmp_path, "grid.l1=[1e-2,2e-2]", "grid.dict_ratio=[1]", name="renamed") == 0
    assert group("renamed") == "first"
    assert (
        sweep(
            tmp_path, "grid.l1=[1e-2]", "grid.dict_ratio=[1]", "logger.group=mine", name="renamed"
        )
        == 0
    )
    assert group("renamed") == "mine"
