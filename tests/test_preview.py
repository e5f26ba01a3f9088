"""``sweep run --plan``: the ensembles a run would train and what each asks for, planned as
``sweep run`` plans (real Ray resources, memory model, GPU shares), with nothing written."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from sweep import execution, launcher
from sweep.cli import main
from tests.test_sweep_e2e import TINY, sweep

GRID = ["grid.l1=[1e-2,1e-1]", "grid.dict_ratio=[1,2]"]


def plan(tmp_path, capsys, *extra: str) -> tuple[int, str, str]:
    code = main(["run", "--plan", f"sweep_dir={tmp_path / 'sw'}", *TINY, *GRID, *extra])
    said = capsys.readouterr()
    return code, said.out, said.err


def test_a_plan_shows_the_ensembles_and_writes_nothing(ray_cluster, tmp_path, capsys, monkeypatch):
    """The shared test cluster's two (fake) GPUs: two ensembles, one on each whole GPU (auto
    fills the GPUs), for a sweep whose store does not exist yet; nothing is created."""
    code, out, _ = plan(tmp_path, capsys)
    assert code == 0 and not (tmp_path / "sw").exists()
    assert "r2-e0" in out and "r1-e0" in out and "1 GPU" in out, out
    assert "4 runs: 0 already done, 4 to train in 2 ensemble(s) on GPUs" in out, out
    assert "compute dtype float32, step eager" in out, out  # (Ray's GPUs, not CUDA ones)
    code, out, _ = plan(tmp_path, capsys, "train.compile=true", "train.dtype=bfloat16")
    assert "compute dtype bfloat16, step compiled" in out, out
    real = launcher.gpuinfo.GpuInfo(free=2**34, real=True)  # as on a CUDA machine
    monkeypatch.setattr(launcher.gpuinfo, "ask", lambda *_, **__: real)
    code, out, _ = plan(tmp_path, capsys, "train.compile=true")
    assert "compute dtype bfloat16, step compiled + CUDA graphs" in out, out
    code, out, _ = plan(tmp_path, capsys, "train.device=cpu", "launch.cpus_per_ensemble=1")
    assert code == 0 and "1 CPU" in out and "on CPUs" in out, out
    assert "per ensemble, planned to 80%: " in out, out  # (the budget the grouping uses)
    assert "compute dtype float32, step eager" in out, out
    code, out, _ = plan(
        tmp_path, capsys, "launch.gpus_per_ensemble=0.5", "launch.device_memory_gb=8"
    )
    assert "memory budget 4.00 GiB per ensemble, planned to 80%: 3.20 GiB" in out, out
    said = " ".join(out.split())  # (Ray would pack both ensembles onto one of the two GPUs)
    assert "note: launch.gpus_per_ensemble=0.5: Ray fills one GPU with fractional tasks" in said
    assert (
        "these 2 ensembles share 1 of the 2 GPUs and 1 idle; launch.gpus_per_ensemble=auto" in said
    )


def test_a_plan_says_when_gpu_snapshots_would_crowd_the_host_memory(
    ray_cluster, tmp_path, capsys, monkeypatch
):
    """A job with little host memory for its GPUs (a SLURM --mem): the plan says that the
    ensembles' checkpoint snapshots may get a worker killed, and what to change."""
    monkeypatch.setattr(execution, "host_memory_bytes", lambda: 2**16)
    code, out, _ = plan(tmp_path, capsys)
    said = " ".join(out.split())
    assert code == 0 and "note: the 2 ensemble(s) that may train at once keep" in said, said
    assert "% of the 64.0 KiB this machine lets the sweep use" in said, said
    assert "host memory" not in " ".join(plan(tmp_path, capsys, "train.device=cpu")[1].split())


def test_a_local_plan_finds_the_resources_ray_would_have_without_starting_it(
    ray_cluster, tmp_path, capsys, monkeypatch
):
    """``launch=local``: the plan reads the CPUs and GPUs a new local instance would get from
    Ray's own resolver (Ray takes seconds to start); they equal what Ray reports once started
    (the shared test cluster: 2 CPUs, 2 fake GPUs)."""
    pytest.importorskip("ray._private.resource_and_label_spec")  # (without it --plan starts Ray)
    asked = {k: ray_cluster.cluster_resources().get(k, 0.0) for k in ("CPU", "GPU")}
    monkeypatch.setattr(ray_cluster, "is_initialized", lambda: False)  # as in a fresh process
    assert launcher.local_cluster(launcher.LaunchConfig(num_cpus=2, num_gpus=2)) == asked
    monkeypatch.setattr(launcher, "ray_session", lambda *_: pytest.fail("Ray started"))
    code, out, _ = plan(tmp_path, capsys, "launch.num_cpus=2", "launch.num_gpus=2")
    assert code == 0 and "4 to train in 2 ensemble(s) on GPUs" in out, out
    assert launcher.local_cluster(launcher.LaunchConfig(address="auto")) is None


def test_a_local_plans_resources_equal_a_started_rays_by_default(tmp_path_factory):
    """Ray's own detection (CPUs, GPUs) with nothing set, against a Ray started as a run
    starts it, in a fresh process."""
    pytest.importorskip("ray._private.resource_and_label_spec")
    temp = tmp_path_factory.mktemp("r")  # (short: Ray's socket paths)
    script = (
        f"from sweep import launcher; lc = launcher.LaunchConfig(temp_dir={str(temp)!r})\n"
        "found = launcher.local_cluster(lc)\n"
        "with launcher.ray_session(lc):\n"
        "    import ray; res = ray.cluster_resources()\n"
        "print(found == {k: res.get(k, 0.0) for k in ('CPU', 'GPU')}, found)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.stdout.startswith("True {'CPU': "), done.stdout + done.stderr


def test_a_plan_of_a_finished_sweep_trains_nothing_and_touches_nothing(
    ray_cluster, tmp_path, capsys, monkeypatch
):
    assert sweep(tmp_path, *GRID) == 0
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "sw").rglob("*") if p.is_file()}
    with monkeypatch.context() as m:  # nothing to train: Ray is not asked (seconds to start)
        m.setattr(launcher, "ray_session", lambda *_: pytest.fail("Ray asked for a finished plan"))
        code, out, _ = plan(tmp_path, capsys)
    assert code == 0 and "4 runs: all already finished, nothing to train" in out, out
    after = {p: p.stat().st_mtime_ns for p in (tmp_path / "sw").rglob("*") if p.is_file()}
    assert after == before
    store = [f"sweep_dir={tmp_path / 'e'}", f"data.path={tmp_path / 'sw' / 'store'}"]
    code, _, err = plan(tmp_path, capsys, "data.eval_rows=4096", *store)
    err = " ".join(err.split())
    assert code == 0 and "data.eval_rows=4096 holds out 34% of the store's 12000 rows" in err, err
    assert "data.eval_rows=2048" not in err and "holds out" not in plan(tmp_path, capsys, *store)[2]


def test_a_plan_refuses_what_the_run_would_refuse(ray_cluster, tmp_path, capsys):
    chunks = ["data=chunks", f"data.path={tmp_path / 'none'}", f"sweep_dir={tmp_path / 'c'}"]
    code = main(["run", "--plan", *chunks])
    err = capsys.readouterr().err
    assert code == 2 and "no chunk store at" in err and "\n" not in err.strip(), err
    (tmp_path / "afile").write_text("")
    code = main(["run", "--plan", f"sweep_dir={tmp_path / 'afile' / 'sub'}"])
    assert code == 2 and f"{tmp_path / 'afile'} is a file" in capsys.readouterr().err
    assert sweep(tmp_path, *GRID) == 0
    code, _, err = plan(tmp_path, capsys, "train.lr=1")
    assert code == 2 and "holds a sweep with different settings" in err, err
    # the store it would reuse, made with other parameters; too few rows for one batch
    code, _, err = plan(tmp_path, capsys, "data.n_features=64", f"sweep_dir={tmp_path / 'o'}",
                        f"data.path={tmp_path / 'sw' / 'store'}")  # fmt: skip
    assert code == 2 and "was made with different data parameters (n_features)" in err, err
    store = [f"sweep_dir={tmp_path / 'b'}", f"data.path={tmp_path / 'sw' / 'store'}"]
    code, _, err = plan(tmp_path, capsys, "train.batch_size=20000", *store)
    assert code == 2 and "fewer than one batch" in err, err
    manifest = json.loads((tmp_path / "sw" / "manifest.json").read_text())
    assert manifest["state"] == "done"
    truth = tmp_path / "sw" / "store" / "ground_truth.safetensors"
    truth.rename(tmp_path / "truth")  # (the run refuses it, naming the repair: so does a plan)
    code, _, err = plan(tmp_path, capsys)
    assert code == 2 and f"{truth} is missing; delete" in " ".join(err.split()), err


def test_a_plan_of_a_store_not_made_yet_warns_of_the_rows_the_run_leaves_out(
    ray_cluster, tmp_path, capsys
):
    """As the run warns once it has made the store: whole batches leaving much of each chunk
    out, and a held-out share too large (the chunks' rows follow from the config)."""
    code, _, err = plan(tmp_path, capsys, "train.batch_size=3000")  # 4096-row chunks
    err = " ".join(err.split())
    assert code == 0 and "3952 of the store's 9952 training rows (40%) are never trained on" in err
    code, _, err = plan(tmp_path, capsys, "data.eval_rows=4096")
    err = " ".join(err.split())
    assert code == 0 and "data.eval_rows=4096 holds out 34% of the store's 12000 rows" in err
    assert "holds out" not in plan(tmp_path, capsys)[2] and not (tmp_path / "sw").exists()


def test_a_plan_refuses_another_sweeps_incomplete_store_as_the_run_does(tmp_path, capsys):
    from sweep.activations.store import MANIFEST
    from sweep.activations.synthetic import ensure_synthetic_store
    from tests.conftest import tiny_data

    other = tmp_path / "other"
    ensure_synthetic_store(tiny_data(rows=9000), other)
    (other / MANIFEST).unlink()  # as a generation still under way leaves it
    before = {p.name: p.read_bytes() for p in other.iterdir()}
    for cmd in (["--plan"], []):
        code = main(["run", *cmd, f"sweep_dir={tmp_path / 'sw'}", *TINY, f"data.path={other}"])
        err = capsys.readouterr().err
        assert code == 2 and "(rows 9000 -> 12000); pass its values to finish it" in err, err
    assert {p.name: p.read_bytes() for p in other.iterdir()} == before
    assert not (tmp_path / "sw").exists()


def test_the_sweeps_own_store_is_its_own_however_named(tmp_path, monkeypatch):
    from sweep.cli import compose
    from sweep.config import to_sweep_config
    from sweep.driver import owns_store

    monkeypatch.chdir(tmp_path)
    own = (
        ["sweep_dir=sw", "data.path=sw/store"],
        ["sweep_dir=sw"],
        ["sweep_dir=sw", "data.path=./sw/../sw/store"],
    )
    for over in own:
        assert owns_store(to_sweep_config(compose(over)))
    assert not owns_store(to_sweep_config(compose(["sweep_dir=sw", "data.path=elsewhere"])))
