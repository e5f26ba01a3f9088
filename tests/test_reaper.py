"""sweep.reaper: the Ray processes a killed local driver left are ended, and nothing else.
(The real case, Ray's agents after a SIGKILLed driver: tests/test_faults.py.)"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sweep import reaper

pytestmark = pytest.mark.skipif(not Path("/proc").is_dir(), reason="Linux only (/proc)")


def holder(log: Path, name: str = "") -> subprocess.Popen:
    """A process with ``log`` open (named ``name``, as Ray's raylet is), until killed."""
    rename = f"open('/proc/self/comm', 'w').write({name!r})\n" if name else ""
    code = f"{rename}f = open({str(log)!r}, 'a')\nprint('ready', flush=True)\nimport time\ntime.sleep(60)"
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None and p.stdout.readline() == "ready\n"
    return p


def session(root: Path, pid: int) -> Path:
    logs = root / f"session_2026-12-05_15-26-24_019957_{pid}" / "logs"
    logs.mkdir(parents=True)
    return logs


def test_the_processes_holding_a_dead_drivers_session_are_ended(tmp_path):
    agent = holder(session(tmp_path, 4242) / "dashboard_agent.log")
    other = holder(session(tmp_path, 4243) / "dashboard_agent.log")  # another driver's
    try:
        stale = {"host": socket.gethostname(), "pid": 4242}
        assert reaper.reap(str(tmp_path), stale) == 1
        assert agent.wait(timeout=10) is not None and other.poll() is None
    finally:
        for p in (agent, other):
            p.kill()
            p.wait()


@pytest.mark.parametrize("case", ["another host", "a live raylet", "no stale lock"])
def test_a_session_that_may_not_be_a_dead_drivers_is_left(tmp_path, case):
    logs = session(tmp_path, 4242)
    procs = [holder(logs / "dashboard_agent.log")]
    if case == "a live raylet":  # (the pid in its name reused by a running Ray)
        procs.append(holder(logs / "raylet.out", name="raylet"))
    stale = {"host": "elsewhere" if case == "another host" else socket.gethostname(), "pid": 4242}
    try:
        assert reaper.reap(str(tmp_path), None if case == "no stale lock" else stale) == 0
        time.sleep(0.2)
        assert all(p.poll() is None for p in procs)
    finally:
        for p in procs:
            p.kill()
            p.wait()
