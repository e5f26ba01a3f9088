"""A lock file in SWEEP_DIR so only one driver runs a sweep at a time.

``SWEEP_DIR/.lock`` holds the holder's host, pid and start time and is touched every few
seconds while the driver runs (a heartbeat). A lock is stale, and taken over, when its pid
is dead on this host, or when its heartbeat is older than ``STALE_AFTER`` seconds on
another host (whose processes we cannot see).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from pathlib import Path

from sweep.errors import RunDirError

log = logging.getLogger(__name__)

LOCK = ".lock"
STALE_AFTER = 120.0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_lock(sweep_dir: Path) -> dict | None:
    try:
        return json.loads((sweep_dir / LOCK).read_text())
    except (OSError, ValueError):
        return None


def holder_alive(info: dict, path: Path) -> bool:
    """Whether the driver that wrote lock ``info`` still runs."""
    if info.get("host") == socket.gethostname():
        return _alive(int(info.get("pid", -1)))
    try:
        return time.time() - path.stat().st_mtime < STALE_AFTER
    except OSError:
        return False


class SweepLock:
    """Context manager: acquire on enter (or raise RunDirError), release on exit."""

    def __init__(self, sweep_dir: str | Path) -> None:
        self.path = Path(sweep_dir) / LOCK
        self.info = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}
        self._last_beat = 0.0

    def __enter__(self) -> SweepLock:
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                held = read_lock(self.path.parent)
                if held is not None and holder_alive(held, self.path):
                    raise RunDirError(
                        f"sweep {self.path.parent} is being run by pid {held.get('pid')} on {held.get('host')}; "
                        "wait for it to finish (or stop it) before running this sweep again"
                    ) from None
                log.warning(
                    "taking over a stale lock left by pid %s on %s",
                    (held or {}).get("pid"),
                    (held or {}).get("host"),
                )
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(self.info, f)
            return self
        raise RunDirError(f"could not acquire {self.path}; another driver is starting this sweep")

    def heartbeat(self, every: float = 10.0) -> None:
        now = time.time()
        if now - self._last_beat >= every:
            os.utime(self.path)
            self._last_beat = now

    def __exit__(self, *exc: object) -> None:
        held = read_lock(self.path.parent)
        if held and held.get("pid") == self.info["pid"] and held.get("host") == self.info["host"]:
            self.path.unlink(missing_ok=True)
