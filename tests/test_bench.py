"""The benchmark script runs end to end in its smoke mode (no timing is asserted)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_quick_runs_every_section(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "TQDM_DISABLE": "1", "PYTHONPATH": str(ROOT)}
    cmd = [
        sys.executable,
        str(ROOT / "scripts" / "bench.py"),
        "--quick",
        "--skip-ray",
        "--threads",
        "1",
    ]
    cmd += ["--device", "cpu", "--json", str(out), "--tmp", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for title in (
        "== 1. Ensemble vs loop ==",
        "== 2. Achieved FLOP/s ==",
        "== 3. Streamed vs in-memory ==",
        "== 4. Checkpoint cost ==",
        "== 7. Architectures vs loop ==",
        "== 8. The step against the chip (issue 10) ==",
    ):
        assert title in proc.stdout
    assert "5. Scheduling makespan" not in proc.stdout  # --skip-ray
    assert "torch.set_num_threads(1)" in proc.stdout
    figures = json.loads(out.read_text())
    assert figures["info"]["threads"] == 1
    assert {"section1", "section2", "section3", "section4"} <= set(figures)
    for r in figures["section1"]["results"]:
        assert r["fast_over_loop"] > 0 and r["vmap_over_loop"] > 0
    assert figures["section3"]["ratio"] > 0
    assert [f["width"] for f in figures["section3"]["feed"]] == [512, 2304]
    assert all(r["batchtopk_over_loop"] > 0 for r in figures["section7"]["results"])
    assert all(r["matryoshka_over_loop"] > 0 for r in figures["section7"]["results"])
    assert all(
        r["tied_over_loop"] > 0 < r["tied_over_vmap"] for r in figures["section7"]["results"]
    )
    assert figures["section8"]["results"][0]["rows_x_members_per_s"]["loop_compiled"] > 0
    # section 4, per variant and repeat: [wall seconds, the worker's checkpoint figures]
    runs = figures["section4"]["runs"]
    assert runs["with"][0][1]["calls"] > 0  # checkpoints really were taken
    assert runs["with"][0][1]["periodic"] > 0  # ... by the periodic policy, not only the final one
    assert runs["without"][0][1]["periodic"] == 0  # and "off" really was off


def test_jumprelu_speed_script_times_every_precision(tmp_path: Path) -> None:
    out = tmp_path / "j.json"
    cmd = [sys.executable, str(ROOT / "scripts" / "jumprelu_speed.py"), "--device", "cpu"]
    cmd += ["--size", "16x64", "--members", "2", "--batch", "64", "--repeats", "1"]
    cmd += ["--min-time", "0.01", "--json", str(out)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rate = json.loads(out.read_text())["rate"]
    assert set(rate) == {"linear bfloat16", "log bfloat16", "log tf32", "log float32"}
    assert all(r > 0 for r in rate.values())
