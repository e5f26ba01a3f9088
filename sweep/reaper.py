"""Ray processes a killed local driver left behind.

A local sweep's driver starts its own Ray. Killed outright (SIGKILL, an OOM kill), it cannot
shut Ray down; Ray's raylet and workers then end, but its dashboard and runtime-env agents
stay, re-parented to init, about 170 MB each pair, until the machine reboots (measured with
Ray 2.60). The next driver of the same sweep takes over the dead one's stale lock, which
names its host and pid; Ray's session folder ends with that pid (``session_<time>_<pid>``),
and each agent keeps its logs there open. Those processes of this user, and only those, are
ended before the new driver starts its Ray. Linux only (``/proc``); elsewhere nothing is done.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import tempfile
import time
from pathlib import Path

log = logging.getLogger(__name__)

GRACE = 3.0
"""Seconds the agents get to exit after SIGTERM before SIGKILL."""


def ray_temp_root(temp_dir: str | None) -> Path:
    """Where a local Ray puts its session folders: ``launch.temp_dir``, else Ray's default."""
    if temp_dir:
        return Path(temp_dir).absolute()
    return Path(os.environ.get("RAY_TMPDIR") or tempfile.gettempdir()) / "ray"


def reap(temp_dir: str | None, stale: dict | None) -> int:
    """End the processes still holding the Ray session of the dead driver ``stale`` (a stale
    lock's holder, on this host) open; returns how many there were."""
    if not stale or stale.get("host") != socket.gethostname() or not Path("/proc").is_dir():
        return 0
    pid = stale.get("pid")
    found = sorted(ray_temp_root(temp_dir).glob(f"session_*_{pid}")) if pid else []
    held = {s: holding(s) for s in found}
    sessions = [s for s, pids in held.items() if pids and not any(map(_live_ray, pids))]
    left = sorted({p for s in sessions for p in held[s]})
    if not left:
        return 0
    log.warning(
        "ending %d Ray process(es) that the killed driver (pid %s) left running (%s)",
        len(left),
        pid,
        ", ".join(str(s) for s in sessions),
    )
    _end(left)
    return len(left)


def holding(folder: Path) -> list[int]:
    """This user's processes (but this one) with a file under ``folder`` open."""
    inside, me, uid = f"{folder.absolute()}/", os.getpid(), os.getuid()
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == me:
            continue
        try:
            if proc.stat().st_uid != uid:
                continue
            if any(os.readlink(fd).startswith(inside) for fd in (proc / "fd").iterdir()):
                found.append(int(proc.name))
        except OSError:  # (gone meanwhile, or not ours to read)
            continue
    return found


LIVE = {"raylet", "gcs_server"}
"""A session one of these still holds is a running Ray (its pid in the name reused): left."""


def _live_ray(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip() in LIVE
    except OSError:
        return False


def _end(pids: list[int]) -> None:
    """SIGTERM, then SIGKILL what is left after :data:`GRACE` seconds."""
    for pid in pids:
        _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + GRACE
    while time.monotonic() < deadline and any(_running(p) for p in pids):
        time.sleep(0.1)
    for pid in pids:
        if _running(pid):
            _signal(pid, signal.SIGKILL)


def _signal(pid: int, sig: signal.Signals) -> None:
    try:
        os.kill(pid, sig)
    except OSError:
        pass


def _running(pid: int) -> bool:
    """Alive and not a zombie (an agent's parent is init, which reaps it)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"
