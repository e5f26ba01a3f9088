"""A lock file in SWEEP_DIR so only one driver runs a sweep at a time.

``SWEEP_DIR/.lock`` holds the holder's host, pid, start time and folder (device and inode)
and is touched every few seconds while the driver runs (a heartbeat). A lock is stale, and
taken over, when its pid is dead on this host or it names another folder there (a running
sweep copied with ``cp -r``), or when its heartbeat is older than ``STALE_AFTER`` seconds on
another host (whose processes we cannot see).

Taking the lock is atomic: drivers that start together serialise on an ``fcntl.flock`` of
``SWEEP_DIR/.lock-guard`` (released by the kernel when a process dies), look at ``.lock``,
and create it complete (a temp file hard-linked into place, which fails if one appeared).
Where the filesystem has no flock (some Lustre mounts without ``-o flock``) the hard link
alone still keeps two drivers from both creating a lock; only two drivers taking over the
same stale lock at the same moment could then race.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from pathlib import Path

from sweep.errors import MEND, RunDirError
from sweep.io import GONE, flock_held
from sweep.sweepdir import LOCK, LOCK_GUARD

log = logging.getLogger(__name__)

STALE_AFTER = 120.0
_HELD: set[Path] = set()
"""The sweep locks this process holds."""


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _left_by(held: dict | None) -> str:
    """Who left a stale lock, as the takeover's warning says it."""
    if not held or "pid" not in held:
        return "(unreadable: its driver died while writing it)"
    return f"left by pid {held.get('pid')} on {held.get('host')}"


def read_lock(sweep_dir: Path, strict: bool = False) -> dict | None:
    """The lock's record; None when it is missing, damaged or not a JSON object (a driver
    that died while writing it), or could not be read, unless ``strict``: then that is a
    one-line error (a live driver's lock another user's umask keeps from us, a network
    file system's error: taken for a dead driver's, two drivers would train the sweep)."""
    path = sweep_dir / LOCK
    try:
        info = json.loads(path.read_text())
    except GONE:
        return None
    except OSError as err:
        if strict:
            raise RunDirError(
                f"could not read the sweep's lock {path} ({type(err).__name__}: {err}); a "
                f"driver may be running it: {MEND}"
            ) from err
        return None
    except ValueError:
        return None
    return info if isinstance(info, dict) else None


def holder_alive(info: dict, path: Path) -> bool:
    """Whether the driver that wrote lock ``info`` still runs: on this host, its pid is alive
    and, unless its heartbeat is fresh, that process began before the lock was written (a
    dead driver's pid taken by another process, or by this one: a job re-queued in a
    container gets the same small pids again); elsewhere, its heartbeat is fresh."""
    try:
        fresh = time.time() - path.stat().st_mtime < STALE_AFTER
    except OSError:
        fresh = False
    if info.get("host") != socket.gethostname():
        return fresh
    pid = info.get("pid")
    if not isinstance(pid, int) or pid <= 0:  # (damaged: os.kill(-1, 0) would say alive)
        return fresh
    if not pid_alive(pid) or _copied(info, path):
        return False
    return fresh or same_process(pid, float(info.get("started", 0.0)))


def _doubtful(held: dict, path: Path, host: str) -> bool:
    """Whether lock ``held`` may be a dead driver's though its heartbeat is fresh (see
    :meth:`SweepLock._wait_while_doubtful`)."""
    if held.get("host") != host:
        return True
    pid, started = held.get("pid"), held.get("started")
    if not isinstance(pid, int) or pid == os.getpid() or not pid_alive(pid) or _copied(held, path):
        return False  # (taken over, or refused, at once)
    if not isinstance(started, (int, float)) or started <= 0:
        return False  # (when it began is unknown: a live driver's, as its heartbeat says)
    return not same_process(pid, float(started))


def same_process(pid: int, started: float) -> bool:
    """Whether process ``pid`` of this host is alive and had begun by ``started`` (when it
    wrote a record; a pid reused since belongs to a process that began later)."""
    if not pid_alive(pid):
        return False
    began = _began_at(pid)
    return began is None or began <= started + CLOCK_SLACK


def folder_id(folder: Path) -> list[int] | None:
    """The sweep folder's identity on this host: [device, inode] (a copy has another)."""
    try:
        st = folder.stat()
    except OSError:
        return None
    return [st.st_dev, st.st_ino]


def _copied(info: dict, path: Path) -> bool:
    """Whether lock ``info`` (from this host) was written in another folder: copied along with
    a running sweep, its driver runs that one, not this (a lock from before it said: no)."""
    held = info.get("folder")
    here = folder_id(path.parent)
    return isinstance(held, list) and here is not None and held != here


CLOCK_SLACK = 60.0
"""Seconds a process's start may seem to follow the lock it wrote (its start time is derived
from the boot time, which moves with the clock)."""


def _began_at(pid: int) -> float | None:
    """When process ``pid`` began (seconds since the epoch; Linux's /proc), None if unknown."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks = int(fields[19])  # starttime, field 22 of stat (after pid and comm)
        boot = next(
            int(line.split()[1])
            for line in Path("/proc/stat").read_text().splitlines()
            if line.startswith("btime ")
        )
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


TRAINING, EVALUATING = "training", "evaluating"
"""What a lock's driver does (its ``doing``): a ``sweep run``/``resume``, or a ``sweep evaluate``."""


def activity(info: dict) -> str:
    """What the driver of lock ``info`` does, in ``sweep status``'s words: ``evaluating``, or
    ``running`` (training; also a lock from before it said)."""
    return "evaluating" if info.get("doing") == EVALUATING else "running"


class SweepLock:
    """Context manager: acquire on enter (or raise RunDirError), release on exit."""

    def __init__(
        self, sweep_dir: str | Path, doing: str = TRAINING, ray_temp: str | None = None
    ) -> None:
        """``ray_temp``: where this driver's local Ray keeps its sessions, for the next driver
        to end what a SIGKILL of this one leaves there (:mod:`sweep.reaper`)."""
        self.path = Path(sweep_dir) / LOCK
        self.info = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": time.time(),
            "doing": doing,
        }
        if ray_temp is not None:
            self.info["ray_temp"] = ray_temp
        self.stale: dict | None = None
        """The lock this one took over: a driver that died without releasing it."""
        self._last_beat = 0.0
        self._stop = threading.Event()
        self._touching = threading.RLock()
        """Held while the heartbeat touches (or writes back) the lock, and while it is released:
        a touch in flight never writes a released lock back. (Re-entrant: a signal's
        immediate exit releases it from the main thread, which may be inside a touch.)"""
        self._warned = False

    def __enter__(self) -> SweepLock:
        self.info["folder"] = folder_id(self.path.parent)
        self._wait_while_doubtful()
        with flock_held(self.path.parent / LOCK_GUARD, create=True):
            held = read_lock(self.path.parent, strict=True)
            if held is not None and holder_alive(held, self.path) and not self._own_stale(held):
                raise RunDirError(
                    f"sweep {self.path.parent} is being run by pid {held.get('pid')} on {held.get('host')}; "
                    f"wait for it to finish (or stop it: 'sweep stop {self.path.parent}', which "
                    f"checkpoints every run) before {activity(self.info)} this sweep again"
                )
            if self.path.exists():
                log.warning("taking over a stale lock %s", _left_by(held))
                self.path.unlink(missing_ok=True)
                self.stale = held
            self._create()
        _HELD.add(self.path)
        beat = threading.Thread(target=self._beat, daemon=True, name="sweep-lock-heartbeat")
        beat.start()
        return self

    def _own_stale(self, held: dict) -> bool:
        """A lock naming this very process, which holds none of this sweep: a dead driver's
        whose pid came back to us (a job re-queued in a container gets the same pids)."""
        mine = held.get("host") == self.info["host"] and held.get("pid") == self.info["pid"]
        return mine and self.path not in _HELD

    def _wait_while_doubtful(self) -> None:
        """A lock whose heartbeat is fresh may be a driver that just died: from another host
        (a SLURM job re-queued on another node), or on this one with its pid taken since by
        a process that began after the lock (a job re-queued in a container gets the same
        small pids; a clock stepped forward since the driver began looks the same, so the
        heartbeat decides). Wait until it goes stale (at most :data:`STALE_AFTER` s) rather
        than fail; one still fresh after that is refused."""
        held = read_lock(self.path.parent, strict=True)
        if held is None or not _doubtful(held, self.path, self.info["host"]):
            return
        deadline, said = time.monotonic() + STALE_AFTER + 5.0, False
        while time.monotonic() < deadline and holder_alive(held, self.path):
            if not said:
                said = True
                log.warning(
                    "sweep %s is locked by pid %s on %s, whose heartbeat is fresh; waiting up "
                    "to %.0f s for it to end or go stale (a driver that died leaves it stale)",
                    self.path.parent, held.get("pid"), held.get("host"), STALE_AFTER,
                )  # fmt: skip
            time.sleep(2.0)
            held = read_lock(self.path.parent, strict=True)
            if held is None:
                return

    def _beat(self) -> None:
        """Keep the lock fresh for as long as it is held (a harvest or a store scan can take
        longer than STALE_AFTER, and a driver on another host must not take it over)."""
        while not self._stop.wait(STALE_AFTER / 12):
            self._touch()

    def _touch(self) -> None:
        """Refresh the heartbeat; a lock removed meanwhile (by hand, thought stale) is written
        again, as another driver could otherwise start on this sweep while this one runs."""
        with self._touching:
            if self._stop.is_set():  # (released meanwhile)
                return
            try:
                os.utime(self.path)
            except FileNotFoundError:
                self._restore()
            except OSError as err:
                self._warn_once(f"cannot refresh the sweep's lock {self.path} ({err})")

    def _restore(self) -> None:
        try:
            self._create()
        except (RunDirError, OSError) as err:
            self._warn_once(f"the sweep's lock {self.path} was removed and is not ours now ({err})")
            return
        log.warning(
            "the sweep's lock %s was removed while this driver runs; wrote it again", self.path
        )

    def _warn_once(self, message: str) -> None:
        if not self._warned:
            self._warned = True
            log.warning("%s; another driver could start on this sweep meanwhile", message)

    def _create(self) -> None:
        """Write the lock complete, then link it into place (fails if another appeared)."""
        tmp = self.path.with_name(f"{LOCK}.{os.getpid()}.tmp")
        try:
            with open(tmp, "w") as f:  # (on disk before it is linked: never an empty lock)
                f.write(json.dumps(self.info))
                f.flush()
                os.fsync(f.fileno())
            os.link(tmp, self.path)
        except FileExistsError:
            raise RunDirError(
                f"could not acquire {self.path}; another driver is starting this sweep"
            ) from None
        finally:
            tmp.unlink(missing_ok=True)

    def heartbeat(self, every: float = 10.0) -> None:
        now = time.time()
        if now - self._last_beat >= every:
            self._touch()
            self._last_beat = now

    def __exit__(self, *exc: object) -> None:
        self.release()

    def release(self) -> None:
        """Stop the heartbeat; remove the lock if it is still ours."""
        self._stop.set()
        with self._touching:  # (a heartbeat in flight ends first; then it sees the stop)
            _HELD.discard(self.path)
            try:
                held = read_lock(self.path.parent, strict=True)
            except RunDirError as err:  # (left: the next driver reads it, or says why not)
                log.warning("the lock is left: %s", err)
                return
            mine = held and held.get("pid") == self.info["pid"]
            if mine and held.get("host") == self.info["host"]:
                try:
                    self.path.unlink(missing_ok=True)
                except OSError as err:  # (the next driver takes a dead one's lock over)
                    log.warning("could not remove the lock %s (%s)", self.path, err)
