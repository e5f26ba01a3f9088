"""What the GPUs are, asked where they are (:mod:`sweep.gpuinfo`): ``nvidia-smi`` on every
GPU node of a Ray cluster whose driver sees no GPU. Here a script stands in for
``nvidia-smi``; the Ray tasks, the parsing and the planning that follows are real."""

from __future__ import annotations

import json
import logging
import os
import stat
from pathlib import Path

import yaml

from sweep import gpuinfo
from tests.test_faults import finish, start

GiB = 2**30


def fake_nvidia_smi(folder: Path, lines: str, code: int = 0) -> Path:
    """A ``nvidia-smi`` that prints ``lines`` (MiB, as ``--format=csv,noheader,nounits``)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "nvidia-smi"
    path.write_text(f"#!/bin/sh\ncat <<'END'\n{lines}\nEND\nexit {code}\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def test_nvidia_smi_rows_are_read_and_what_it_cannot_say_is_skipped(tmp_path):
    smi = fake_nvidia_smi(tmp_path / "a", "81000, 81559, Default\n[N/A], [N/A], Default\n")
    assert gpuinfo.read_nvidia_smi(str(smi)) == [(81000 * 2**20, 81559 * 2**20, "Default")]
    failing = fake_nvidia_smi(tmp_path / "b", "NVIDIA-SMI has failed", code=9)
    assert gpuinfo.read_nvidia_smi(str(failing)) == []
    assert gpuinfo.read_nvidia_smi(str(tmp_path / "absent")) == []


def test_a_gpu_less_driver_asks_the_gpu_nodes_and_plans_for_the_smallest(
    ray_cluster, tmp_path, caplog
):
    """Ray's test cluster has GPUs but this machine has no CUDA: a task on its GPU node reads
    every GPU there; the plan takes the least free, any exclusive one makes all whole."""
    rows = "40960, 81559, Default\n81000, 81559, Exclusive_Process"
    smi = fake_nvidia_smi(tmp_path, rows)
    with caplog.at_level(logging.INFO):
        info = gpuinfo.ask(gpu_nodes=1, command=str(smi))
    assert info == gpuinfo.GpuInfo(free=40960 * 2**20, exclusive=True, real=True)
    assert "the cluster's GPUs differ (40.0 to 79.1 GiB free)" in caplog.text
    nothing = gpuinfo.ask(gpu_nodes=1, command=str(tmp_path / "absent"))
    assert nothing == gpuinfo.GpuInfo()  # Ray's fake GPUs: nothing known, not real


def test_a_sweep_on_a_gpu_cluster_without_a_gpu_on_its_driver_plans_bf16_for_its_gpus(
    tmp_path, tmp_path_factory
):
    """`sweep run` whose (fake) GPU node answers for 20 GiB free GPUs: ``train.dtype=auto``
    is recorded as bfloat16 (the ensembles train on CUDA GPUs, though the driver sees none)
    and the memory model plans with the node's memory, not the 16 GiB default."""
    smi = fake_nvidia_smi(tmp_path / "bin", "20480, 81559, Default")
    sw = tmp_path / "sw"
    environ = {"PATH": f"{smi.parent}{os.pathsep}{os.environ['PATH']}"}
    args = ["launch.num_gpus=1", "train.device=auto", "grid.dict_ratio=[4]", "train.epochs=1"]
    code, out = finish(start(sw, tmp_path_factory.getbasetemp() / "gi", *args, environ=environ))
    assert code == 0, out
    assert yaml.safe_load((sw / "config.yaml").read_text())["train"]["dtype"] == "bfloat16"
    said = (sw / "sweep.log").read_text()
    assert "1 GPU(s) on 1 node(s), the least free 20.0 GiB" in said, said
    for run in (sw / "runs").iterdir():
        assert json.loads((run / "placement.json").read_text())["gpu_share"] > 0
