"""Two local sweeps on one machine's GPUs hear of each other (each Ray hands out every GPU)."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import time

import pytest

from sweep import gpuinfo, neighbours
from tests.test_gpuinfo import fake_nvidia_smi
from tests.test_sweep_e2e import sweep

HOST = socket.gethostname()


@pytest.fixture()
def other_driver(tmp_path):
    """A live process standing for another local sweep's driver, and its record."""
    proc = subprocess.Popen(["sleep", "60"])
    time.sleep(0.1)  # (its start time is before the record's)

    def record(gpus: list[str], pid: int | None = None, host: str = HOST) -> dict:
        info = {"host": host, "pid": pid or proc.pid, "started": time.time(), "gpus": gpus}
        info["sweep_dir"] = str(tmp_path / f"other-{info['pid']}")
        folder = neighbours.registry()
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{host}-{info['pid']}.json").write_text(json.dumps(info))
        return info

    yield record
    proc.kill()
    proc.wait()
    for path in neighbours.registry().glob("*.json"):
        path.unlink()


def test_the_registry_is_the_tests_own(tmp_path_factory):
    assert str(neighbours.registry()).startswith(str(tmp_path_factory.getbasetemp()))


def test_a_sweep_on_shared_gpus_warns_naming_them_and_the_other(other_driver, tmp_path, caplog):
    other = other_driver(["1", "2"])
    dead = other_driver(["0"], pid=2**22 + 4321)  # a driver that ended: removed, no warning
    node = other_driver(["0"], pid=1, host="node7")  # another node's (a shared temp folder)
    with caplog.at_level(logging.WARNING), neighbours.training_on(["0", "1"], tmp_path / "me"):
        mine = neighbours.registry() / f"{HOST}-{os.getpid()}.json"
        assert json.loads(mine.read_text())["gpus"] == ["0", "1"]
    said = [r.getMessage() for r in caplog.records if r.name == "sweep.neighbours"]
    assert len(said) == 1 and said[0].startswith("another sweep trains on GPU(s) 1 of this machine")
    assert f"(pid {other['pid']}, {other['sweep_dir']})" in said[0]
    assert "CUDA_VISIBLE_DEVICES=0 sweep run" in said[0]
    assert not mine.exists() and not (neighbours.registry() / f"{HOST}-{dead['pid']}.json").exists()
    assert (neighbours.registry() / f"node7-{node['pid']}.json").exists()  # (let be)


def test_sweeps_on_other_gpus_say_nothing(other_driver, tmp_path, caplog):
    other_driver(["2", "3"])
    with caplog.at_level(logging.WARNING), neighbours.training_on(["0", "1"], tmp_path):
        pass
    assert not [r for r in caplog.records if r.name == "sweep.neighbours"]


def test_the_gpus_a_local_ray_hands_out(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # (no nvidia-smi: as named)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert neighbours.visible_gpus(2) == ["0", "1"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert neighbours.visible_gpus(2) == ["2", "3"]


def test_a_gpu_named_by_index_or_by_uuid_is_one_gpu(monkeypatch, tmp_path):
    """One sweep started with CUDA_VISIBLE_DEVICES=1, another with that GPU's UUID (or a
    prefix of it, as CUDA takes it): both record its UUID, as nvidia-smi lists it."""
    two = "0, GPU-8932f937-d72c, 81000, 81559, Default, [N/A]\n"
    two += "1, GPU-77c0ffee-4106, 81000, 81559, Default, [N/A]"
    fake_nvidia_smi(tmp_path, two)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    by_index = neighbours.visible_gpus(1)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-77c0ffee")
    assert neighbours.visible_gpus(1) == by_index == ["GPU-77c0ffee-4106"]
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert neighbours.visible_gpus(2) == ["GPU-8932f937-d72c", "GPU-77c0ffee-4106"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-,7")  # (ambiguous, unknown: as named)
    assert neighbours.visible_gpus(2) == ["GPU-", "7"]


def test_a_real_sweep_hears_of_another_on_its_gpus(ray_cluster, other_driver, tmp_path, capsys):
    gpu = gpuinfo.uuids(["0"])  # (the test Ray has 2 fake GPUs, 0 and 1; on a GPU machine
    other = other_driver(gpu)  # its GPU 0 is recorded by UUID)
    assert sweep(tmp_path, "grid.l1=[1e-2]", "grid.dict_ratio=[1]") == 0
    said = (tmp_path / "sw" / "sweep.log").read_text()
    assert f"another sweep trains on GPU(s) {gpu[0]} of this machine (pid {other['pid']}" in said
    assert not list(neighbours.registry().glob(f"*-{os.getpid()}.json"))  # (gone at its end)
