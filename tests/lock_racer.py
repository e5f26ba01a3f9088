"""A process racing others for a sweep's lock (started by ``test_integrity`` with ``spawn``):
this module imports only the lock, not torch, so each of the racers starts in a fraction of
a second."""

from __future__ import annotations

import time

from sweep.errors import RunDirError
from sweep.lock import SweepLock


def take_lock(folder: str, barrier, results) -> None:
    """Wait for every racer, then try the lock: put "held" (and keep it a second) or "refused"."""
    barrier.wait()
    try:
        with SweepLock(folder):
            results.put("held")
            time.sleep(1.0)
    except RunDirError:
        results.put("refused")
