"""sweep.reaper: the Ray processes a killed local driver left are ended, and nothing else.
(The real case, Ray's agents after a SIGKILLed driver: tests/test_faults.py.)"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sweep import reaper

pytestmark = pytest.mark.skipif(not Path("/proc").is_dir(), reason="Linux only (/proc)")


def holder(
    log: Path,
    title: str = "ray::DashboardAgent",
    name: str = "",
    blocks: bool = False,
    lives: float = 60.0,
) -> subprocess.Popen:
    """A process with ``log`` open until killed (or ``lives`` seconds), its command line
    beginning with ``title`` (as Ray's processes title themselves), named ``name`` (as Ray's
    raylet is); ``blocks``: with SIGTERM blocked."""
    rename = f"open('/proc/self/comm', 'w').write({name!r})\n" if name else ""
    if blocks:
        rename += "import signal; signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})\n"
    code = f"{rename}f = open({str(log)!r}, 'a')\nprint('ready', flush=True)\nimport time\ntime.sleep({lives})"
    p = subprocess.Popen(
        [title, "-c", code], executable=sys.executable, stdout=subprocess.PIPE, text=True
    )
    assert p.stdout is not None and p.stdout.readline() == "ready\n"
    return p


def session(root: Path, pid: int) -> Path:
    logs = root / f"session_2026-12-05_15-26-24_019957_{pid}" / "logs"
    logs.mkdir(parents=True)
    return logs


def dead_pid() -> int:
    """A pid no process has now (a driver's that was killed)."""
    p = subprocess.Popen([sys.executable, "-c", ""])
    p.wait()
    return p.pid


def test_the_ray_processes_holding_a_dead_drivers_session_are_ended(tmp_path):
    pid = dead_pid()
    logs = session(tmp_path, pid)
    agent = holder(logs / "dashboard_agent.log")
    reader = holder(logs / "dashboard_agent.log", title=sys.executable)  # a `tail -f` of it
    other = holder(session(tmp_path, pid + 100000) / "dashboard_agent.log")  # another's
    try:
        assert reaper.reap(str(tmp_path), {"host": socket.gethostname(), "pid": pid}) == 1
        assert agent.wait(timeout=10) is not None
        assert reader.poll() is None and other.poll() is None
    finally:
        for p in (agent, reader, other):
            p.kill()
            p.wait()


def test_a_process_that_blocks_sigterm_gets_sigkill_at_once(tmp_path, monkeypatch):
    """A local Ray's agents start with SIGTERM blocked (sweep.shield.inherited): waiting for
    them to take it would only spend the grace."""
    monkeypatch.setattr(reaper, "GRACE", 600.0)
    pid = dead_pid()
    agent = holder(session(tmp_path, pid) / "dashboard_agent.log", blocks=True)
    try:
        start = time.monotonic()
        assert reaper.reap(str(tmp_path), {"host": socket.gethostname(), "pid": pid}) == 1
        assert agent.wait(timeout=10) == -9 and time.monotonic() - start < 300
    finally:
        agent.kill()
        agent.wait()


def test_the_dead_drivers_own_ray_folder_is_searched_too(tmp_path):
    """Its lock records where its Ray was (``ray_temp``): a re-run with another
    ``launch.temp_dir`` still ends what it left."""
    pid = dead_pid()
    agent = holder(session(tmp_path / "old", pid) / "dashboard_agent.log")
    stale = {"host": socket.gethostname(), "pid": pid, "ray_temp": str(tmp_path / "old")}
    try:
        for damaged in ("/" + "x" * 5000, "relative/folder", 7):  # (nothing to search, no error)
            assert reaper.reap(str(tmp_path / "new"), {**stale, "ray_temp": damaged}) == 0
        assert reaper.reap(str(tmp_path / "new"), stale) == 1
        assert agent.wait(timeout=10) is not None
    finally:
        agent.kill()
        agent.wait()


@pytest.mark.parametrize(
    "case", ["another host", "a live raylet", "no stale lock", "its driver alive"]
)
def test_a_session_that_may_not_be_a_dead_drivers_is_left(tmp_path, case, monkeypatch):
    monkeypatch.setattr(reaper, "WIND_DOWN", 1.0)  # (a raylet that outlives it: left)
    pid = os.getpid() if case == "its driver alive" else dead_pid()  # (alive: a copied sweep's)
    logs = session(tmp_path, pid)
    procs = [holder(logs / "dashboard_agent.log")]
    if case == "a live raylet":  # (a Ray still shutting down)
        procs.append(holder(logs / "raylet.out", title=sys.executable, name="raylet"))
    stale = {"host": "elsewhere" if case == "another host" else socket.gethostname(), "pid": pid}
    try:
        assert reaper.reap(str(tmp_path), None if case == "no stale lock" else stale) == 0
        time.sleep(0.2)
        assert all(p.poll() is None for p in procs)
    finally:
        for p in procs:
            p.kill()
            p.wait()


def test_a_dead_drivers_ray_still_winding_down_is_waited_for_then_its_agents_ended(tmp_path):
    """A killed driver's raylet ends seconds after it (its workers may train and write until
    then): the new driver waits for it (up to WIND_DOWN), then ends the agents left."""
    pid = dead_pid()
    logs = session(tmp_path, pid)
    agent = holder(logs / "dashboard_agent.log")
    raylet = holder(logs / "raylet.out", title=sys.executable, name="raylet", lives=1.5)
    try:
        start = time.monotonic()
        assert reaper.reap(str(tmp_path), {"host": socket.gethostname(), "pid": pid}) == 1
        assert 1.0 < time.monotonic() - start < reaper.WIND_DOWN
        assert raylet.poll() == 0 and agent.wait(timeout=10) is not None
    finally:
        for p in (agent, raylet):
            p.kill()
            p.wait()
