"""What the GPUs are, asked where they are (:mod:`sweep.gpuinfo`): ``nvidia-smi`` and torch
on every GPU node of a Ray cluster whose driver sees no GPU. A script stands in for
``nvidia-smi``, and ``tests/hooks`` makes torch see CUDA in the Ray workers; the Ray tasks,
the parsing and the planning that follows are real."""

from __future__ import annotations

import json
import logging
import os
import stat
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml

from sweep import gpuinfo
from tests.test_faults import finish, start
from tests.test_out_of_memory import HOOK

GiB, MiB = 2**30, 2**20
no_cuda_here = pytest.mark.skipif(
    torch.cuda.is_available(), reason="the driver's own GPU answers where CUDA is present"
)


def fake_nvidia_smi(folder: Path, lines: str, code: int = 0) -> Path:
    """A ``nvidia-smi`` printing ``lines`` as ``--format=csv,noheader,nounits`` does."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "nvidia-smi"
    path.write_text(f"#!/bin/sh\ncat <<'END'\n{lines}\nEND\nexit {code}\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


EIGHT = "\n".join(  # a node of 8 GPUs in every state that matters
    [
        "0, GPU-a0, 81000, 81559, Default, [N/A]",
        "1, GPU-a1, 40960, 81559, Exclusive_Process, Disabled",
        "2, GPU-a2, 81559, 81559, Default, Enabled",  # MIG: whole-GPU memory
        "3, GPU-a3, 81559, 81559, Prohibited, [N/A]",  # no CUDA context allowed
        "4, GPU-a4, [N/A], [N/A], Default, [N/A]",
        "5, GPU-a5, 20480, 81559, Default, [N/A]",
        "warning: a line nvidia-smi may print",
        "6, GPU-a6, 70000, 81559, Default",  # too few fields
    ]
)


def test_nvidia_smi_rows_are_the_usable_gpus_this_process_may_use(tmp_path, monkeypatch):
    smi = str(fake_nvidia_smi(tmp_path / "a", EIGHT))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert gpuinfo.read_nvidia_smi(smi) == [
        (81000 * MiB, 81559 * MiB, "Default"),
        (40960 * MiB, 81559 * MiB, "Exclusive_Process"),
        (20480 * MiB, 81559 * MiB, "Default"),
    ]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-a1,0")  # by UUID or index
    assert [r[0] for r in gpuinfo.read_nvidia_smi(smi)] == [81000 * MiB, 40960 * MiB]
    failing = fake_nvidia_smi(tmp_path / "b", "NVIDIA-SMI has failed", code=9)
    assert gpuinfo.read_nvidia_smi(str(failing)) == []
    assert gpuinfo.read_nvidia_smi(str(tmp_path / "absent")) == []


def test_the_gpu_nodes_answer_from_ray_tasks(ray_cluster, tmp_path):
    """A task on the test cluster's (one) GPU node runs the node's nvidia-smi and says
    whether torch sees CUDA there."""
    smi = fake_nvidia_smi(tmp_path, "0, GPU-a0, 40960, 81559, Default, [N/A]")
    assert gpuinfo.cluster_answers(str(smi)) == [
        ([(40960 * MiB, 81559 * MiB, "Default")], torch.cuda.is_available())
    ]


@no_cuda_here
def test_the_smallest_gpu_plans_and_one_exclusive_makes_all_whole(monkeypatch, caplog):
    rows = [(40 * GiB, 80 * GiB, "Default"), (79 * GiB, 80 * GiB, "Exclusive_Process")]
    answers = [(rows[:1], True), (rows[1:], True), ([(1.0 * GiB, 80 * GiB, "Default")], False)]
    monkeypatch.setattr(gpuinfo, "cluster_answers", lambda command: answers)
    with caplog.at_level(logging.INFO):
        info = gpuinfo.ask(gpu_nodes=[False] * 3)
    assert info == gpuinfo.GpuInfo(free=40 * GiB, exclusive=True, real=True)
    assert "the cluster's GPUs differ (40.0 to 79.0 GiB free)" in caplog.text
    monkeypatch.setattr(gpuinfo, "cluster_answers", lambda command: answers[2:])
    assert gpuinfo.ask(gpu_nodes=[False] * 3) == gpuinfo.GpuInfo()  # torch sees no CUDA there
    said = " ".join(caplog.text.split())
    assert "none said what they are (no nvidia-smi, MIG, or a torch without CUDA there): " in said
    assert "if they are CUDA GPUs, set train.dtype=bfloat16 and launch.device_memory_gb" in said
    caplog.clear()
    # launch.device_memory_gb set: only the dtype
    gpuinfo.ask(gpu_nodes=[False] * 3, need_memory=False)
    said = " ".join(caplog.text.split())
    assert "train.dtype=auto means float32; if they are CUDA GPUs, set train.dtype=bfloat16" in said
    assert "16 GiB" not in said and "launch.device_memory_gb" not in said
    caplog.clear()
    with caplog.at_level(logging.INFO):  # both set: said, but no warning
        gpuinfo.ask(gpu_nodes=[False] * 3, need_memory=False, need_dtype=False)
    assert "WARNING" not in caplog.text and "none said what they are" in caplog.text


def sweep_on_fake_gpus(tmp_path, tmp_path_factory, node_cuda: bool) -> tuple[dict, str]:
    smi = fake_nvidia_smi(tmp_path / "bin", "0, GPU-a0, 20480, 81559, Default, [N/A]")
    environ = {"PATH": f"{smi.parent}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(HOOK)}
    if node_cuda:
        environ["SWEEP_TEST_NODE_CUDA"] = "1"
    sw = tmp_path / "sw"
    args = ["launch.num_gpus=1", "train.device=auto", "grid.dict_ratio=[4]", "train.epochs=1"]
    ray_tmp = tmp_path_factory.getbasetemp() / f"gi{int(node_cuda)}"
    code, out = finish(start(sw, ray_tmp, *args, environ=environ))
    assert code == 0, out
    return yaml.safe_load((sw / "config.yaml").read_text()), (sw / "sweep.log").read_text()


@no_cuda_here
def test_a_driver_without_a_gpu_plans_bf16_for_the_nodes_cuda_gpus(tmp_path, tmp_path_factory):
    """`sweep run` on a (fake) GPU node where torch sees CUDA: ``train.dtype=auto`` is
    recorded as bfloat16 though the driver sees no GPU, and the memory model plans with the
    node's memory, not the 16 GiB default."""
    cfg, said = sweep_on_fake_gpus(tmp_path, tmp_path_factory, node_cuda=True)
    assert cfg["train"]["dtype"] == "bfloat16"
    assert "1 GPU(s) on 1 node(s), the least free 20.0 GiB" in said, said


@no_cuda_here
def test_gpus_torch_cannot_use_keep_float32_and_say_so(tmp_path, tmp_path_factory):
    """nvidia-smi answers but torch there has no CUDA (a CPU wheel, or a driver too old for
    it): the ensembles will train on the CPU, so auto stays float32, said aloud."""
    cfg, said = sweep_on_fake_gpus(tmp_path, tmp_path_factory, node_cuda=False)
    assert cfg["train"]["dtype"] == "float32"
    assert "none said what they are" in said, said


def test_an_empty_cuda_visible_devices_hides_no_gpu_from_the_probe(tmp_path, monkeypatch):
    smi = str(fake_nvidia_smi(tmp_path, EIGHT))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert len(gpuinfo.read_nvidia_smi(smi)) == 3


def exclusive_gpus_here(tmp_path, monkeypatch) -> None:
    smi = fake_nvidia_smi(tmp_path / "smi", "0, GPU-a0, 81000, 81559, Exclusive_Process, [N/A]")
    monkeypatch.setenv("PATH", f"{smi.parent}{os.pathsep}{os.environ['PATH']}")


def test_on_exclusive_gpus_the_driver_generates_without_one(tmp_path, monkeypatch, caplog):
    """A CUDA context the driver makes stays for the whole sweep, and on GPUs that take one
    process each it would keep GPU 0 from training: synthetic data is made on the CPU."""
    from sweep import driver
    from sweep.cli import compose
    from sweep.config import to_sweep_config

    exclusive_gpus_here(tmp_path, monkeypatch)
    over = [f"sweep_dir={tmp_path / 'sw'}", "data.rows=4096", "data.eval_rows=1024"]
    with caplog.at_level(logging.INFO):
        store = driver.prepare_store(to_sweep_config(compose(over)))
    assert "exclusive compute mode: the driver makes the store without one" in caplog.text
    assert store.provenance["generator"]["device"] == "cpu"


def test_a_partial_store_made_on_another_device_is_restarted_aloud(tmp_path, caplog):
    """CPU- and GPU-made stores differ bit-wise: a partial store's chunks cannot be continued
    on the other device, and losing them is said aloud."""
    from sweep.activations import synthetic
    from sweep.config import SyntheticDataConfig

    cfg = SyntheticDataConfig(rows=4096, eval_rows=1024, rows_per_chunk=1024)
    path = tmp_path / "store"
    path.mkdir()
    marker = {**synthetic.generator_params(cfg), "generator": {"device": "cuda", "version": 2}}
    (path / synthetic.PARAMS_FILE).write_text(json.dumps(marker))
    with caplog.at_level(logging.INFO):
        store = synthetic.ensure_synthetic_store(cfg, path, "cpu", owned=True)
    assert "it was being generated on cuda (generator version 2) and is now generated on cpu" in (
        caplog.text
    )
    assert store.total_rows == 4096


def test_a_local_gpus_memory_is_read_while_ray_starts(monkeypatch):
    """The driver begins reading this machine's GPU (a process that makes a CUDA context:
    seconds) before Ray starts; planning then takes that answer instead of asking again.
    Not for a cluster's GPUs (asked of its nodes once Ray is up), nor a sweep on the CPU."""
    from sweep import launcher
    from tests.test_config import cfg_of

    began = threading.Event()

    def read(need_memory: bool, command: str, gpus: int) -> gpuinfo.GpuInfo:
        assert gpus == 1  # (launch.num_gpus: the GPUs its Ray will give)
        began.set()
        time.sleep(0.2)  # (still reading when Ray would be up)
        return gpuinfo.GpuInfo(free=20 * GiB, real=True)

    def ask(*args: object, **kw: object) -> None:
        raise AssertionError("asked again")

    monkeypatch.setattr(gpuinfo, "_torch_sees_cuda", lambda: True)
    monkeypatch.setattr(gpuinfo, "_local", read)
    monkeypatch.setattr(gpuinfo, "ask", ask)
    for settings in (["launch.address=head:6379"], ["train.device=cpu"], ["launch.num_gpus=0"]):
        assert launcher.early_gpu_probe(cfg_of(*settings)) is None, settings
    assert not began.is_set()
    cfg = cfg_of("launch.num_gpus=1")
    early = launcher.early_gpu_probe(cfg)
    assert early is not None and began.wait(5)
    res = launcher.Resources(cfg, {"GPU": 1.0, "CPU": 4.0}, early=early)
    assert res.real_gpus and res.device_bytes == 20 * GiB


def test_the_local_probe_plans_the_visible_gpu_with_least_free_memory(
    tmp_path, monkeypatch, caplog
):
    """On one machine of several GPUs any that Ray gives may get an ensemble: the query the
    probe's process runs reads each of the first ``launch.num_gpus`` (a torch that reports
    three: one held by another job's exclusive process, one mostly full)."""
    fake = tmp_path / "torch"
    fake.mkdir()
    (fake / "__init__.py").write_text(
        "class cuda:\n"
        "    device_count = staticmethod(lambda: 3)\n"
        "    @staticmethod\n"
        "    def mem_get_info(i):\n"
        "        if i == 1:\n"
        "            raise RuntimeError('CUDA-capable device(s) is/are busy or unavailable')\n"
        "        return [(70, 80), None, (10, 80)][i]\n"
    )
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    with caplog.at_level(logging.WARNING):
        assert gpuinfo._local_free() == 10.0  # (all of them)
        assert gpuinfo._local_free(2) == 70.0  # (launch.num_gpus=2: Ray gives GPUs 0 and 1)
    assert "a GPU has 0.0 of 0.0 GiB free" in caplog.text  # (bytes: the fake's tiny GPUs)


def test_a_gpu_node_that_is_another_machine_is_asked_there(ray_cluster, monkeypatch, caplog):
    """A cluster's one GPU node is asked through Ray even where this machine's torch sees a
    GPU Ray was not given (a head started with --num-gpus=0), and never planned with it."""
    asked = []
    monkeypatch.setattr(gpuinfo, "_torch_sees_cuda", lambda: True)
    monkeypatch.setattr(gpuinfo, "_local", lambda *a: asked.append("here") or gpuinfo.GpuInfo())
    monkeypatch.setattr(gpuinfo, "cluster_answers", lambda c: asked.append("ray") or [])
    from sweep.launcher import alive_nodes

    def gpu_nodes() -> list[bool]:  # (as Resources asks)
        return [bool(n["here"]) for n in alive_nodes() if n["GPU"]]

    assert gpu_nodes() == [True]  # (the test Ray's node is this machine)
    gpuinfo.ask(gpu_nodes())
    nodes = ray_cluster.nodes()
    monkeypatch.setattr(ray_cluster, "nodes", lambda: [{**n, "NodeID": "ab" * 28} for n in nodes])
    assert gpu_nodes() == [False]
    with caplog.at_level(logging.WARNING):
        assert gpuinfo.ask(gpu_nodes()) == gpuinfo.GpuInfo()  # (no answer from the node)
    assert asked == ["here", "ray"] and "none said what they are" in caplog.text
