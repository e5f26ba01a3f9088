"""Ray processes a killed local driver left behind.

A local sweep's driver starts its own Ray. Killed outright (SIGKILL, an OOM kill), it cannot
shut Ray down; Ray's raylet and workers then end, but its dashboard and runtime-env agents
stay, re-parented to init, about 170 MB each pair, until the machine reboots (measured with
Ray 2.60). The next driver of the same sweep takes over the dead one's stale lock, which
names its host, pid and Ray folder (its ``launch.temp_dir``); Ray's session folder there ends
with that pid (``session_<time>_<pid>``), and each agent keeps its logs there open. Those
processes of this user, and only those, are ended before the new driver starts its Ray. A
driver that exits at once on a signal before training (while Ray starts, or plans) ends its
own session's agents itself (:func:`end_own_session`). Linux only (``/proc``); elsewhere
nothing is done.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import time
from pathlib import Path

from sweep.lock import pid_alive

log = logging.getLogger(__name__)

GRACE = 3.0
"""Seconds the agents get to exit after SIGTERM before SIGKILL."""
WIND_DOWN = 15.0
"""Seconds a dead driver's Ray (its raylet, GCS: they end a few seconds after it, and its
workers with them) is waited for before a new one starts beside its last writes."""


def ray_temp_root(temp_dir: str | None) -> Path:
    """Where a local Ray puts its session folders: ``launch.temp_dir``, else Ray's default
    (``$RAY_TMPDIR``, ``$TMPDIR`` or /tmp, then ``ray``); real, as ``/proc`` names files."""
    if temp_dir:
        return Path(temp_dir).resolve()
    base = os.environ.get("RAY_TMPDIR") or os.environ.get("TMPDIR") or "/tmp"
    return (Path(base) / "ray").resolve()


def reap(temp_dir: str | None, stale: dict | None) -> int:
    """End the processes still holding the Ray session of the dead driver ``stale`` (a stale
    lock's holder, on this host) open; returns how many there were."""
    if not stale or stale.get("host") != socket.gethostname() or not Path("/proc").is_dir():
        return 0
    pid = stale.get("pid")
    if not isinstance(pid, int) or pid <= 0 or pid_alive(pid):  # (a copied sweep's, or reused)
        return 0
    found = sorted(s for root in _roots(temp_dir, stale) for s in _sessions(root, pid))
    held = _wound_down({s: _holders(s) for s in found})
    sessions = [s for s, procs in held.items() if not _live(procs)]
    left = sorted({p for s in sessions for p, title, _ in held[s] if title.startswith(RAY)})
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


def _wound_down(held: dict[Path, list]) -> dict[Path, list]:
    """``held`` (each session's holders) once the sessions' raylets and GCS servers have
    ended, waiting up to :data:`WIND_DOWN` seconds: a killed driver's Ray ends seconds after
    it, and until then its workers may still train and write (a session still held by one
    after that is left: its name's pid may be a reused one's, a ``ray start`` that exited)."""
    deadline = time.monotonic() + WIND_DOWN
    if any(_live(procs) for procs in held.values()):
        log.info("waiting up to %g s for the killed driver's Ray to end", WIND_DOWN)
    while any(_live(procs) for procs in held.values()) and time.monotonic() < deadline:
        time.sleep(0.2)
        held = {s: _holders(s) if _live(procs) else procs for s, procs in held.items()}
    return held


def _live(procs: list[tuple[int, bytes, str]]) -> bool:
    """Whether a session's Ray still runs: its raylet or GCS holds it."""
    return any(name in LIVE for _, _, name in procs)


def _roots(temp_dir: str | None, stale: dict) -> set[Path]:
    """Where the dead driver's Ray may be: this run's Ray folder, and the one its lock names
    (its own ``launch.temp_dir``, maybe another; absolute, or it is no record of ours)."""
    roots = {ray_temp_root(temp_dir)}
    named = stale.get("ray_temp")
    if isinstance(named, str) and Path(named).is_absolute():
        roots.add(Path(named))
    return roots


def _sessions(root: Path, pid: int) -> list[Path]:
    """Ray's session folders of driver ``pid`` in ``root`` (none where it cannot be read)."""
    try:
        return list(root.glob(f"session_*_{pid}"))
    except OSError:
        return []


def end_own_session(temp_dir: str | None) -> None:
    """At an immediate exit (a signal before training: :func:`sweep.stop.exit_now`), SIGKILL
    the Ray processes (``ray::...``) holding this process's own Ray session open: its agents
    would outlive it (its raylet and GCS end with it); they ignore SIGTERM. Plain ``os``
    calls, no logging: it runs in a signal handler."""
    for session in ray_temp_root(temp_dir).glob(f"session_*_{os.getpid()}"):
        end_session(session)


def can_end() -> bool:
    """Whether this machine lets :func:`end_session` find a session's processes (``/proc``)."""
    return Path("/proc").is_dir()


def end_session(session: Path) -> None:
    """SIGKILL the Ray processes (``ray::...``) holding ``session`` open (where :func:`can_end`;
    elsewhere nothing is done)."""
    if not can_end():
        return
    for pid in holding(session):
        _signal(pid, signal.SIGKILL)


RAY = b"ray::"
"""How a Ray process's command line begins (its title): only those are ended (not a
``tail -f`` of the session's logs)."""
LIVE = ("raylet", "gcs_server")
"""Process names that, holding a session's files, say its Ray still runs: it is left."""


def holding(folder: Path) -> list[int]:
    """This user's Ray processes (titled ``ray::...``) with a file under ``folder`` open."""
    return [pid for pid, title, _ in _holders(folder) if title.startswith(RAY)]


def _holders(folder: Path) -> list[tuple[int, bytes, str]]:
    """(pid, command line, name) of this user's processes (but this one) with a file under
    ``folder`` open."""
    inside, me, uid = f"{folder.resolve()}/", os.getpid(), os.getuid()
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == me:
            continue
        try:
            if proc.stat().st_uid != uid:
                continue
            if any(_target(fd).startswith(inside) for fd in (proc / "fd").iterdir()):
                title, name = (proc / "cmdline").read_bytes(), (proc / "comm").read_text()
                found.append((int(proc.name), title, name.strip()))
        except OSError:  # (gone meanwhile, or not ours to read)
            continue
    return found


def _target(fd: Path) -> str:
    try:
        return os.readlink(fd)
    except OSError:  # (closed meanwhile)
        return ""


def _end(pids: list[int]) -> None:
    """SIGTERM, then SIGKILL what is left after :data:`GRACE` seconds; at once where SIGTERM
    is blocked (a local Ray's processes: :func:`sweep.shield.inherited`)."""
    for pid in pids:
        _signal(pid, signal.SIGKILL if _blocks_sigterm(pid) else signal.SIGTERM)
    deadline = time.monotonic() + GRACE
    while time.monotonic() < deadline and any(_running(p) for p in pids):
        time.sleep(0.1)
    for pid in pids:
        if _running(pid):
            _signal(pid, signal.SIGKILL)


def _blocks_sigterm(pid: int) -> bool:
    """Process ``pid`` has SIGTERM blocked (its main thread: ``SigBlk`` in its status)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("SigBlk:"):
                return bool(int(line.split()[1], 16) >> (signal.SIGTERM - 1) & 1)
    except (OSError, ValueError, IndexError):
        pass
    return False


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
