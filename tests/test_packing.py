"""``launch.gpus_per_ensemble=auto``: small ensembles share a GPU, large or memory-heavy ones
get it whole; what each ensemble asked Ray for is in its runs' placement.json."""

from __future__ import annotations

import dataclasses
import json
import logging

import pytest

from sweep import execution, grid, packing
from sweep.config import ConfigError, LaunchConfig
from tests.test_sweep_e2e import sweep

GiB = 2**30


def ensemble(width: int, ratio: int, members: int) -> grid.EnsembleSpec:
    runs = grid.expand([1e-3 * (i + 1) for i in range(members)], [ratio], 1, width, "untied")
    return grid.group(runs, {ratio: members})[0]


def test_small_ensembles_share_a_gpu_and_large_ones_do_not():
    tiny = ensemble(128, 4, 8)  # 128 x 512: launch-bound
    big = ensemble(768, 32, 8)  # 768 x 24576: GEMM-bound
    assert packing.gpu_share(tiny, 1024, "bfloat16", 140 * GiB) == 0.25
    assert packing.gpu_share(big, 4096, "bfloat16", 140 * GiB) == 1.0
    assert (
        packing.gpu_load(128, 512, 1024, 8, "bfloat16")
        < 0.25
        <= packing.gpu_load(768, 24576, 4096, 8, "bfloat16")
    )


def test_memory_sets_the_share_when_the_load_is_small():
    e = ensemble(128, 4, 8)
    need = 8 * grid.bytes_per_member(128, 512, 1024, "bfloat16")
    gpu = need / packing.MEMORY_USE / 0.4  # the members fill 40% of what may be planned
    assert packing.gpu_share(e, 1024, "bfloat16", gpu) == 0.5
    assert packing.gpu_share(e, 1024, "bfloat16", gpu, stream_bytes=0.7 * need) == 1.0


def test_an_ensemble_planned_to_the_budget_fits_its_staged_chunks_within_80_percent():
    """The members and the batch stream's staged chunks together hold to 80% of the GPU, as
    ``auto`` sizes a share (the chunks were 80%-counted: a plan could print 64.76 GiB of a
    64 GiB limit)."""
    from types import SimpleNamespace

    from sweep.driver import device_budget

    gpu, staged = 80 * GiB, 4 * GiB
    res = SimpleNamespace(on_gpu=True, device_bytes=gpu, auto_share=True, num_gpus=1)
    per = grid.bytes_per_member(4096, 65536, 4096, "float32", buffers=4)
    budget = device_budget(staged, "store", res)
    members = grid.member_budget(4096, 65536, 4096, "float32", budget, True, 0, buffers=4)
    assert (members, 0.8 * gpu // per) == (3, 4)  # (4 would fit were the chunks not there)
    assert members * per + staged <= 0.8 * gpu < (members + 1) * per + staged
    e = ensemble(4096, 16, members)
    assert packing.gpu_share(e, 4096, "float32", gpu, staged, buffers=4) == 1.0


def test_gpus_per_ensemble_is_auto_by_default_and_checked():
    assert LaunchConfig().gpus_per_ensemble == "auto"
    LaunchConfig(gpus_per_ensemble=0.5).check()
    for bad in (0, -1, "half"):
        with pytest.raises(ConfigError, match="gpus_per_ensemble must be a number > 0 or auto"):
            LaunchConfig(gpus_per_ensemble=bad).check()


def test_a_fixed_fraction_that_leaves_gpus_idle_is_said():
    assert packing.packed_note(0.25, 6, 8).startswith("launch.gpus_per_ensemble=0.25: Ray fills")
    assert "these 6 ensembles share 2 of the 8 GPUs and 6 idle" in packing.packed_note(0.25, 6, 8)
    assert packing.packed_note(0.25, 8, 2) is None  # (every GPU busy)
    assert packing.packed_note(0.5, 1, 4) is None  # (one ensemble: nothing to spread)
    assert packing.packed_note(1.0, 4, 8) is None and packing.packed_note(0.5, 2, 1) is None


def test_snapshots_of_gpu_ensembles_over_half_the_host_memory_are_said():
    """On GPUs each ensemble keeps its weights and Adam moments in host memory for its
    checkpoints: those that may train at once (the largest first, as many as the GPUs hold
    at their shares) are said when they exceed half the host memory the sweep may use."""
    a, b, c, d = (ensemble(64, r, 2) for r in (16, 8, 4, 2))
    snapshots = {a: 10 * GiB, b: 8 * GiB, c: 6 * GiB, d: 4 * GiB}
    shares = {a: 1.0, b: 1.0, c: 0.5, d: 0.5}
    note = " ".join(packing.host_note(snapshots, shares, 2, 32 * GiB).split())
    assert note == (
        "the 2 ensemble(s) that may train at once keep 18.00 GiB of checkpoint snapshots in "
        "host memory (each its weights and Adam moments): 56% of the 32.00 GiB this "
        "machine lets the sweep use (a SLURM or container limit counts), a worker may be "
        "killed at its first checkpoint; give it more host memory (a SLURM job: --mem), or "
        "fewer GPUs at once (launch.num_gpus), or smaller ensembles (grid.max_members)"
    )
    assert packing.host_note(snapshots, shares, 2, 40 * GiB) is None  # (18 of 40)
    assert "the 4 ensemble(s) that may train at once keep 28.00 GiB" in packing.host_note(
        snapshots, shares, 4, 40 * GiB
    )
    one = ensemble(64, 16, 1)
    alone = packing.host_note({one: 10 * GiB}, {one: 1.0}, 1, 16 * GiB)
    assert alone.endswith("checkpoint; give it more host memory (a SLURM job: --mem)")


def test_the_host_memory_checked_is_of_this_machines_gpus(monkeypatch):
    """Checked where this machine is a GPU node (one box; a SLURM job's head), with its own
    GPUs; not from a cluster launcher's head, which has none."""
    from sweep.launcher import Resources
    from tests.test_config import cfg_of

    cfg, both = cfg_of("launch.device_memory_gb=80"), {"CPU": 64.0, "GPU": 8.0}
    monkeypatch.setattr(execution, "host_memory_bytes", lambda: 64 * GiB)
    assert Resources(cfg, both).gpus_here == 8  # (one machine)
    slurm = [{"CPU": 32.0, "GPU": 4.0, "here": 1.0}, {"CPU": 32.0, "GPU": 4.0, "here": 0.0}]
    assert Resources(cfg, both, slurm).gpus_here == 4
    launcher_head = [{"CPU": 8.0, "GPU": 0.0, "here": 1.0}, {"CPU": 56.0, "GPU": 8.0}]
    res = Resources(cfg, both, launcher_head)
    e, f = ensemble(4096, 32, 8), ensemble(4096, 16, 8)  # (~100 GiB of snapshots each)
    assert res.gpus_here == 0 and execution.host_note(cfg, res, {e: 1.0}, 4096) is None
    joined = cfg_of("launch=cluster", "launch.address=head:6379", "launch.device_memory_gb=80")
    note = execution.host_note(joined, Resources(joined, both, slurm), {e: 1.0, f: 1.0}, 4096)
    assert "fewer GPUs at once (ray start --num-gpus on its nodes)" in note  # (not num_gpus)
    evaluated = dataclasses.replace(e, evaluate="all")  # (evaluated only: no snapshot)
    assert execution.host_note(cfg, Resources(cfg, both), {evaluated: 1.0}, 4096) is None


def test_shares_are_raised_while_the_gpus_could_hold_them():
    """Ray puts fractional tasks on one GPU before the next: quarter shares on a 4-GPU node
    would leave three GPUs idle, so shares are raised in rounds, the costliest first (never
    three ensembles on one GPU while another has one)."""
    tiny = [ensemble(128, r, 2) for r in (6, 5, 4, 3, 2, 1)]  # costliest first
    quarter = dict.fromkeys(tiny, 0.25)
    assert packing.fill(quarter, 1) == quarter  # one GPU: they share it
    assert list(packing.fill(dict.fromkeys(tiny[:4], 0.25), 4).values()) == [1.0] * 4
    assert list(packing.fill(dict.fromkeys(tiny[:4], 0.25), 2).values()) == [0.5] * 4
    assert list(packing.fill(quarter, 4).values()) == [1.0, 1.0, 0.5, 0.5, 0.5, 0.5]
    assert list(packing.fill(dict.fromkeys(tiny[:3], 0.25), 2).values()) == [1.0, 0.5, 0.5]
    big = ensemble(768, 32, 8)
    assert packing.fill({big: 1.0, tiny[0]: 0.25}, 1) == {big: 1.0, tiny[0]: 0.25}


def test_auto_share_is_what_each_task_asked_ray_for(ray_cluster, tmp_path, capsys, monkeypatch):
    """The shared test cluster's two fake GPUs: three tiny ensembles (a quarter GPU each by
    the model) fill both GPUs, the costliest alone on one; a fixed fraction is asked for as
    given."""
    assert sweep(tmp_path, "grid.l1=[1e-2]", "grid.dict_ratio=[1,2,3]", name="auto") == 0
    capsys.readouterr()
    with monkeypatch.context() as m:  # (and a job of little host memory for its snapshots)
        m.setattr(execution, "host_memory_bytes", lambda: 2**16)
        assert sweep(tmp_path, "grid.l1=[1e-2]", "launch.gpus_per_ensemble=0.5", name="half") == 0
    said = " ".join(capsys.readouterr().err.split())  # (packed onto one of the two GPUs)
    assert "these 2 ensembles share 1 of the 2 GPUs and 1 idle" in said
    assert "the 2 ensemble(s) that may train at once keep" in said
    assert "checkpoint snapshots" not in (tmp_path / "auto" / "sweep.log").read_text()
    want = {"r3": 1.0, "r2": 0.5, "r1": 0.5}
    for name in ("auto", "half"):
        for run in (tmp_path / name / "runs").iterdir():
            share = json.loads((run / "placement.json").read_text())["gpu_share"]
            assert share == (want[run.name.split("-")[0]] if name == "auto" else 0.5), run.name


def test_an_ensemble_is_split_so_no_gpu_idles(ray_cluster, tmp_path):
    """Two L1 values of one shape fit one ensemble, but the cluster has two GPUs: two
    ensembles, each on a whole GPU of its own."""
    assert sweep(tmp_path, "grid.l1=[1e-2,1e-1]", "grid.dict_ratio=[2]", name="split") == 0
    placed = [
        json.loads((run / "placement.json").read_text())
        for run in (tmp_path / "split" / "runs").iterdir()
    ]
    assert [p["gpu_share"] for p in placed] == [1.0, 1.0]
    assert len({p["cuda_visible_devices"] for p in placed}) == 2
    assert len({p["pid"] for p in placed}) == 2


def test_a_store_whose_chunks_fill_the_gpu_is_refused(ray_cluster, tmp_path, capsys):
    """Two staged chunks (2 x 4096 rows x 16 floats + row orders: 0.6 MB) against a GPU of
    1 MB: one line naming the fix, exit 2, before any run folder exists."""
    capsys.readouterr()
    assert sweep(tmp_path, "launch.device_memory_gb=0.001", name="big") == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the store's generation log
    assert err.startswith("error: store") and "smaller data.rows_per_chunk" in err, err
    assert not (tmp_path / "big" / "runs").exists()


def test_every_gpu_ensemble_gets_a_fresh_worker_process(ray_cluster, tmp_path):
    """Ray reuses worker processes; one that trained on a GPU keeps that device and its cached
    memory, so GPU tasks run with max_calls=1: four ensembles, four processes."""
    assert sweep(tmp_path, "grid.l1=[1e-2]", "grid.dict_ratio=[1,2,3,4]", name="fresh") == 0
    runs = (tmp_path / "fresh" / "runs").iterdir()
    pids = {json.loads((run / "placement.json").read_text())["pid"] for run in runs}
    assert len(pids) == 4


def test_ensembles_are_split_to_fill_whole_devices_only():
    from sweep.launcher import Resources
    from tests.test_config import cfg_of

    gpus = {"GPU": 4.0, "CPU": 16.0}
    assert Resources(cfg_of("launch.device_memory_gb=80"), gpus).slots == 4  # auto
    for share, slots in (("0.25", 1), ("1", 4), ("2", 2)):  # a fixed fraction packs, as asked
        cfg = cfg_of(f"launch.gpus_per_ensemble={share}", "launch.device_memory_gb=80")
        assert Resources(cfg, gpus).slots == slots, share
    cpu = cfg_of("launch.cpus_per_ensemble=4", "train.device=cpu")
    assert Resources(cpu, {"CPU": 16.0}).slots == 4
    assert Resources(cfg_of("train.device=cpu"), {"CPU": 16.0}).slots == 1  # one takes all


def test_a_gpu_share_on_the_cpu_is_said_to_do_nothing(caplog):
    from sweep.launcher import Resources
    from tests.test_config import cfg_of

    with caplog.at_level(logging.WARNING, logger="sweep.launcher"):
        Resources(cfg_of("train.device=cpu"), {"CPU": 2.0})
        Resources(cfg_of("launch.gpus_per_ensemble=2", "train.device=cpu"), {"CPU": 2.0})
    said = [r.getMessage() for r in caplog.records]
    assert [m for m in said if "gpus_per_ensemble" in m] == [
        "launch.gpus_per_ensemble=2 does nothing here: the ensembles train on CPUs "
        "(launch.cpus_per_ensemble sets their share)"
    ]


def test_a_ratios_runs_split_into_ensembles_as_even_as_they_can_be():
    """(36 in ensembles of at most 8: 8, 7, 7, 7, 7; not 8, 8, 8, 8, 4, whose last ensemble
    would leave its device idle sooner), every run once, in grid order."""
    from sweep import grid

    runs = grid.expand([1e-3 * (i + 1) for i in range(12)], [4, 8], 3, 16, "untied")
    ensembles = grid.group(runs, {4: 8, 8: 36})
    assert [(e.dict_ratio, len(e.members)) for e in ensembles] == [(8, 36)] + [
        (4, n) for n in (8, 7, 7, 7, 7)
    ]
    assert [m for e in ensembles[1:] for m in e.members] == [r for r in runs if r.dict_ratio == 4]


def test_more_cpu_threads_than_cores_is_warned_about(monkeypatch, caplog):
    """Ray counts the CPUs it is told: launch.num_cpus=64 on 2 cores would give an ensemble
    64 threads (several times slower); a cluster's nodes are not this machine."""
    from sweep import launcher
    from tests.test_config import cfg_of

    monkeypatch.setattr(launcher, "cpu_count", lambda: 2)
    cpu = cfg_of("train.device=cpu")
    with caplog.at_level("WARNING", logger="sweep.launcher"):
        assert launcher.Resources(cpu, {"CPU": 2.0}).threads == 2
        on_a_cluster = cfg_of("train.device=cpu", "launch=cluster", "launch.cpus_per_ensemble=64")
        assert launcher.Resources(on_a_cluster, {"CPU": 64.0}).threads == 64
        assert not caplog.records
        assert launcher.Resources(cpu, {"CPU": 64.0}).threads == 64
    assert "each ensemble would run 64 torch threads on this machine's 2 CPUs" in caplog.text


def test_a_request_no_node_can_grant_is_refused_not_waited_for():
    """Ray waits forever for a node with more GPUs (or CPUs) than any has; a multi-node CPU
    cluster's ensembles ask for one node's CPUs, not the whole cluster's."""
    from sweep.errors import SweepError
    from sweep.launcher import Resources
    from tests.test_config import cfg_of

    two_nodes, nodes = {"GPU": 2.0, "CPU": 32.0}, [{"GPU": 1.0, "CPU": 16.0}] * 2
    with pytest.raises(SweepError, match=r"gpus_per_ensemble=2 but no Ray node has 2 GPUs"):
        Resources(cfg_of("launch.gpus_per_ensemble=2"), two_nodes, nodes)
    with pytest.raises(SweepError, match=r"cpus_per_ensemble=20 but no Ray node has 20 CPUs"):
        Resources(cfg_of("launch.cpus_per_ensemble=20", "train.device=cpu"), two_nodes, nodes)
    assert Resources(cfg_of("train.device=cpu"), two_nodes, nodes).num_cpus == 16
    # the most CPUs on a node without GPUs, the GPUs on nodes with few CPUs: none has both
    mixed = [{"CPU": 64.0, "GPU": 0.0}, {"CPU": 8.0, "GPU": 4.0}]
    with pytest.raises(SweepError, match=r"cpus_per_ensemble=16 .* beside the GPUs asked for"):
        Resources(cfg_of("launch.cpus_per_ensemble=16"), {"CPU": 72.0, "GPU": 4.0}, mixed)
    head_only = [{"CPU": 0.0, "GPU": 0.0}]  # a cluster launcher's head before its workers
    with pytest.raises(SweepError, match="no CPUs for ensembles"):  # Ray omits a 0 total
        Resources(cfg_of("train.device=cpu"), {"memory": 1.0}, head_only)
    cluster = cfg_of("launch=cluster", "train.device=cpu")  # (its cpus_per_ensemble is 1)
    with pytest.raises(SweepError, match="no CPUs for ensembles .are its worker nodes up"):
        Resources(cluster, {"memory": 1.0}, head_only)
    assert (
        Resources(cfg_of("train.device=cpu"), {"CPU": 1.0}, head_only + [{"CPU": 4.0}]).num_cpus
        == 4
    )
    with pytest.raises(ConfigError, match="above 1 must be a whole number of GPUs, got 1.5"):
        cfg_of("launch.gpus_per_ensemble=1.5")


def test_a_cpu_planned_ensemble_trains_on_the_cpu_even_where_gpus_are_visible(tmp_path):
    """Ray (2.5x on) leaves CUDA_VISIBLE_DEVICES as is for a task asking for no GPU: a job
    planned for the CPU must say so, or its worker's ``auto`` would take GPU 0."""
    from types import SimpleNamespace

    from sweep import execution
    from sweep.launcher import Resources
    from tests.test_config import cfg_of

    cfg = cfg_of("train.device=auto")
    for cluster, device in (({"CPU": 16.0}, "cpu"), ({"CPU": 16.0, "GPU": 1.0}, "auto")):
        res = Resources(cfg, cluster)
        run = SimpleNamespace(path=tmp_path), SimpleNamespace(path=tmp_path)
        me = SimpleNamespace(cfg=cfg, folder=run[0], store=run[1], res=res)
        job = execution.Execution._job(me, ensemble(16, 2, 1))  # type: ignore[arg-type]
        assert job.train.device == device


def test_exclusive_gpus_take_one_ensemble_each():
    """GPUs in exclusive compute mode start one process each: auto gives every ensemble a
    whole GPU, a fixed fraction is refused in one line (it would fail at the second task)."""
    from sweep.errors import SweepError
    from sweep.gpuinfo import GpuInfo
    from sweep.launcher import Resources
    from tests.test_config import cfg_of

    gpus, exclusive = {"GPU": 2.0, "CPU": 16.0}, GpuInfo(exclusive=True, real=True)
    res = Resources(cfg_of("launch.device_memory_gb=80"), gpus, gpu=exclusive)
    assert not res.auto_share and res.num_gpus == 1.0 and res.slots == 2
    with pytest.raises(SweepError, match=r"gpus_per_ensemble=0.25 shares a GPU, but .* exclusive"):
        Resources(cfg_of("launch.gpus_per_ensemble=0.25"), gpus, gpu=exclusive)
    assert Resources(cfg_of("launch.device_memory_gb=80"), gpus, gpu=GpuInfo()).auto_share


def test_the_gpu_budget_is_its_free_memory_said_aloud_when_others_hold_some(caplog):
    from sweep.gpuinfo import usable_gpu_bytes

    GiB = 2**30
    assert usable_gpu_bytes(139 * GiB, 140 * GiB) == 139 * GiB
    assert "free" not in caplog.text
    assert usable_gpu_bytes(60 * GiB, 140 * GiB) == 60 * GiB
    assert "a GPU has 60.0 of 140.0 GiB free" in caplog.text


def _cgroup_tree(tmp_path, lines: str, limits: dict[str, str]):
    """A /proc/self/cgroup and a /sys/fs/cgroup with ``limits`` (path -> file content)."""
    proc = tmp_path / "cgroup"
    proc.write_text(lines)
    for rel, value in limits.items():
        (tmp_path / "fs" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "fs" / rel).write_text(value)
    return proc, tmp_path / "fs"


@pytest.mark.parametrize(
    "lines, limits",
    [  # a SLURM job step under a job with --mem=2G (v2), the limit on the parent
        ("0::/slurm/job_1/step_0\n", {"slurm/job_1/memory.max": "2147483648\n",
                                      "slurm/job_1/step_0/memory.max": "max\n"}),
        # cgroup v1: the memory controller's own hierarchy
        ("4:memory:/slurm/uid_0/job_1\n1:cpu:/\n",
         {"memory/slurm/uid_0/job_1/memory.limit_in_bytes": "2147483648\n",
          "memory/memory.limit_in_bytes": "9223372036854771712\n"}),
        # a container (v1, no cgroup namespace): its limit at the mount's root
        ("4:memory:/docker/abc\n", {"memory/memory.limit_in_bytes": "2147483648\n"}),
    ],
)  # fmt: skip
def test_host_memory_counts_a_cgroup_limit(tmp_path, lines, limits):
    from sweep.devices import host_memory_bytes

    proc, root = _cgroup_tree(tmp_path, lines, limits)
    assert host_memory_bytes(proc, root) == 2**31


def test_host_memory_without_a_limit_is_the_machines(tmp_path):
    import os

    from sweep.devices import host_memory_bytes

    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    proc, root = _cgroup_tree(tmp_path, "0::/user.slice\n", {"user.slice/memory.max": "max\n"})
    assert host_memory_bytes(proc, root) == physical
    assert host_memory_bytes(tmp_path / "absent", root) == physical


def test_cuda_graphs_asked_for_where_ensembles_train_on_cpus_is_refused():
    """``train.cuda_graphs=true`` with ``train.device=auto`` on a cluster without GPUs is
    refused before any training, as with ``train.device=cpu`` (not a warning per worker)."""
    from sweep import driver
    from sweep.errors import SweepError
    from sweep.gpuinfo import GpuInfo
    from sweep.launcher import Resources
    from tests.test_config import cfg_of

    cfg = cfg_of("train.compile=true", "train.cuda_graphs=true", "launch.device_memory_gb=8")
    with pytest.raises(SweepError, match="cuda_graphs=true needs a GPU but the ensembles would"):
        driver.on_hardware(cfg, Resources(cfg, {"CPU": 2.0}), 0, "store")
    gpus = Resources(cfg, {"CPU": 2.0, "GPU": 1.0}, gpu=GpuInfo(real=True))
    assert str(driver.on_hardware(cfg, gpus, 0, "store")[0].train.cuda_graphs).lower() == "true"
