"""Multi-node path: a Ray head and a second node started with `ray start` on this machine (each
with a fake GPU), and `sweep run launch=cluster` pointed at it. Ensembles must run on both."""

from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

RAY = str(Path(sys.executable).parent / "ray")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict:
    e = dict(os.environ, RAY_AUTH_MODE="disabled", TQDM_DISABLE="1")
    e.pop("RAY_ADDRESS", None)
    return e


@pytest.fixture
def two_node_cluster(tmp_path_factory):
    port = free_port()
    common = ["--num-cpus", "1", "--num-gpus", "1", "--disable-usage-stats", "--block"]
    head = subprocess.Popen(
        [
            RAY,
            "start",
            "--head",
            "--port",
            str(port),
            "--include-dashboard",
            "false",
            "--temp-dir",
            str(tmp_path_factory.getbasetemp() / "rc"),
            *common,
        ],
        env=env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    address = f"127.0.0.1:{port}"
    procs = [head]
    try:
        _wait_nodes(address, 1)  # (a head that fails to start makes this time out, not hang)
        procs.append(
            subprocess.Popen(
                [RAY, "start", "--address", address, *common],
                env=env(),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
        )
        _wait_nodes(address, 2)
        yield address
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()


def _wait_nodes(address: str, n: int, timeout: float = 90) -> None:
    probe = (
        "import ray, sys; ray.init(address=sys.argv[1], configure_logging=False); "
        "print(sum(1 for x in ray.nodes() if x['Alive']))"
    )
    end = time.time() + timeout
    while time.time() < end:
        try:
            out = subprocess.run(
                [sys.executable, "-c", probe, address],
                env=env(),
                capture_output=True,
                text=True,
                timeout=30,
            )
        except subprocess.TimeoutExpired:
            continue
        if out.returncode == 0 and out.stdout.strip().splitlines()[-1:] == [str(n)]:
            return
        time.sleep(1)
    raise AssertionError(f"Ray cluster at {address} never showed {n} nodes")


def test_sweep_runs_on_both_nodes(two_node_cluster, tmp_path):
    sw = tmp_path / "sw"
    cmd = [
        sys.executable,
        "-m",
        "sweep",
        "run",
        "launch=cluster",
        f"launch.address={two_node_cluster}",
        f"sweep_dir={sw}",
        "data.width=16",
        "data.n_features=32",
        "data.rows=20000",
        "data.rows_per_chunk=4096",
        "data.eval_rows=2048",
        "grid.l1=[1e-2,3e-2]",
        "grid.dict_ratio=[1,2,4,8]",
        "train.batch_size=256",
        "train.epochs=4",
        "progress=false",
    ]
    out = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    with open(sw / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 8 and {r["state"] for r in rows} == {"done"}
    placements = [
        json.loads((sw / "runs" / r["run_id"] / "placement.json").read_text()) for r in rows
    ]
    assert len({p["node_id"] for p in placements}) == 2, placements  # both nodes trained ensembles
    assert all(
        p["gpu_ids"] and p["cuda_visible_devices"] for p in placements
    )  # one fake GPU per task
