"""``sweep stop SWEEP_DIR``: ask a sweep's running driver, from any terminal or host that
sees the folder, to stop as a SIGINT would stop it (every running ensemble checkpoints).

The command writes ``SWEEP_DIR/.stop-request`` naming the driver's lock (host, pid, start);
the driver's :class:`StopRequestWatch` polls for it and sends itself SIGINT, so a stop asked
this way takes the very path of a signal in every phase (harvesting, planning, training,
evaluating). A request naming another lock (a driver that ended before it saw it) is
removed, never obeyed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from sweep.errors import SweepError
from sweep.io import atomic_write_json
from sweep.lock import activity
from sweep.stop import DriverSignals
from sweep.sweepdir import STOP_REQUEST, Preparing, StoppedPreparing, SweepFolder

log = logging.getLogger(__name__)

PICKUP = 90.0
"""Seconds a driver has to take a request before ``sweep stop`` says it did not (a driver on
another node sees a new file once its NFS client's directory cache expires: up to 60 s)."""
POLL = 1.0
"""How often a driver looks for a request (seconds)."""
WAIT_POLL = 0.5
"""How often a waiting ``sweep stop`` looks whether the driver ended (seconds)."""
LEFT_FOR_OTHERS = 2 * WAIT_POLL
"""Seconds a ``sweep stop`` leaves its request after the driver ended, for others waiting."""
LOCK_KEYS = ("host", "pid", "started")


def names(request: dict, lock: dict) -> bool:
    """Whether ``request`` asks the driver holding ``lock`` to stop."""
    held = request.get("lock")
    return isinstance(held, dict) and all(held.get(k) == lock.get(k) for k in LOCK_KEYS)


def request_for(sweep_dir: Path, lock: dict) -> dict | None:
    """The stop request in ``sweep_dir`` that names the driver of ``lock`` (None: none)."""
    request = _read(Path(sweep_dir) / STOP_REQUEST)
    return request if request is not None and names(request, lock) else None


def _read(path: Path) -> dict | None:
    try:
        got = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return got if isinstance(got, dict) else {}


def _asker(request: dict) -> str:
    by = request.get("by")
    by = by if isinstance(by, dict) else {}
    return f"'sweep stop' (pid {by.get('pid')} on {by.get('host')})"


class StopRequestWatch:
    """In the driver, while it holds the lock ``lock_info``: a thread that turns a request
    naming that lock into SIGINT to this process (its :class:`DriverSignals` handle it in the
    main thread), and marks the request taken (saying whether training had begun: what
    ``sweep stop`` then reports). Later requests are marked taken too (already stopping)."""

    def __init__(self, sweep_dir: Path, lock_info: dict, signals: DriverSignals) -> None:
        self.path = Path(sweep_dir) / STOP_REQUEST
        self.lock_info, self.signals = lock_info, signals
        self._closed = threading.Event()
        self._asked = False

    def __enter__(self) -> StopRequestWatch:
        self._thread = threading.Thread(target=self._watch, daemon=True, name="sweep-stop-request")
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._closed.set()  # (no signal once the driver's handlers are gone)
        self._thread.join(timeout=POLL + 5.0)

    def _watch(self) -> None:
        while not self._closed.is_set():
            self.check()
            self._closed.wait(POLL)

    def check(self) -> None:
        """Act on the request in the sweep folder, if any and not taken yet."""
        request = _read(self.path)
        if request is None:
            return
        if not names(request, self.lock_info):  # (for a driver that ended before this one)
            with contextlib.suppress(OSError):
                self.path.unlink()
            return
        if request.get("taken"):
            return
        training = not self.signals.immediate
        quiet = self._asked or self.signals.signum  # (stopping already: no second signal)
        with contextlib.suppress(OSError):
            atomic_write_json(self.path, {**request, "taken": {"training": training}})
        if quiet:
            log.info("%s asked: the sweep is already stopping", _asker(request))
            return
        self._asked = True
        self.signals.by = _asker(request)  # (the signal's handler says who asked)
        if not self._closed.is_set():
            os.kill(os.getpid(), signal.SIGINT)


def ask_to_stop(sweep_dir: Path, wait: bool = True) -> int:
    """``sweep stop``: ask the live driver of ``sweep_dir`` to stop; with ``wait``, return when
    it has ended, saying what it left. 0 also when no driver runs (nothing to stop)."""
    folder = SweepFolder(sweep_dir)
    held = folder.driver()
    if held is None:
        with contextlib.suppress(StoppedPreparing, Preparing):  # (Preparing: it just began)
            folder.run_ids()  # (not a sweep folder: its one-line error)
        held = folder.driver()
    if held is None:
        print(f"sweep {sweep_dir}: no driver is running it; nothing to stop")
        return 0
    lock = {k: held.get(k) for k in LOCK_KEYS}
    by = {"host": socket.gethostname(), "pid": os.getpid()}
    if not _untaken(folder.path, lock):  # (else another 'sweep stop' asked: its request stands)
        request = {"lock": lock, "by": by, "time": time.time()}
        atomic_write_json(folder.path / STOP_REQUEST, request)
    who = f"pid {held.get('pid')} on {held.get('host')}"
    print(f"asked the driver of sweep {sweep_dir} ({who}) to stop, as at Ctrl-C")
    if not wait:
        return 0
    try:
        with _interrupts_raise():
            seen = _wait_for_end(folder, lock, who)
    except KeyboardInterrupt:
        print(f"left waiting; the driver still stops ('sweep status {sweep_dir}' shows it)")
        return 130
    print(_ended(folder, held, _taken(folder, lock, by) or seen))
    return 0


@contextlib.contextmanager
def _interrupts_raise() -> Iterator[None]:
    """SIGINT/SIGTERM raise KeyboardInterrupt inside (the CLI's own handler would end the
    process with the line a driver prints)."""
    sigs = (signal.SIGINT, signal.SIGTERM)
    old = {sig: signal.signal(sig, signal.default_int_handler) for sig in sigs}
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def _taken(folder: SweepFolder, lock: dict, by: dict) -> dict | None:
    """How the driver of ``lock`` took the request (None: it ended first). The request goes
    when it is ours (``by``), after :data:`LEFT_FOR_OTHERS` (another 'sweep stop' waiting on
    it reads it once it sees the driver end); one a later 'sweep stop' wrote over it stays
    for that one (a next driver removes any left, as naming another lock)."""
    request = request_for(folder.path, lock)
    if request is None:
        return None
    if request.get("by") == by:
        time.sleep(LEFT_FOR_OTHERS)
        with contextlib.suppress(OSError):
            (folder.path / STOP_REQUEST).unlink()
    return _how_taken(request)


def _how_taken(request: dict | None) -> dict | None:
    taken = None if request is None else request.get("taken")
    return taken if isinstance(taken, dict) else None


def _ended(folder: SweepFolder, held: dict, taken: dict | None) -> str:
    """What the driver of lock ``held`` left once it ended (``taken``: how it took the
    request), and what to do next."""
    path = folder.path
    state, clause = _recorded(folder)
    if taken is None and state == "interrupted":  # (another 'sweep stop' or a signal: this
        return (  # one stalled past the request's removal, or the driver had a signal first)
            f"it stopped (asked by another 'sweep stop' or a signal); re-run its command (or "
            f"'sweep resume {path}') to continue"
        )
    if taken is None:
        return f"it ended before it took the request; {clause}"
    if activity(held) == "evaluating":
        return f"it stopped; 'sweep evaluate {path}' evaluates the runs it did not reach"
    if not taken.get("training"):
        resume = f" (or 'sweep resume {path}')" if _config_saved(folder) else ""
        return f"it stopped before training began; re-run its command{resume}"
    if state == "done":
        return "every run had finished before it stopped: the sweep is done"
    return (
        f"it stopped, its running ensembles checkpointed; re-run its command (or "
        f"'sweep resume {path}') to continue"
    )


def _config_saved(folder: SweepFolder) -> bool:
    """Whether the sweep's config.yaml is there (``sweep resume`` needs it: a sweep stopped
    while its first store was made has none yet)."""
    try:
        return folder.load_config() is not None
    except SweepError:
        return False


def _recorded(folder: SweepFolder) -> tuple[str | None, str]:
    """The sweep's recorded state, and as a clause (None: it has none yet)."""
    try:
        state = folder.activity()
    except SweepError as err:  # (stopped before it planned: the line says what to do)
        return None, str(err)
    return state, f"the sweep is {state}"


def _wait_for_end(folder: SweepFolder, lock: dict, who: str) -> dict | None:
    """Until the driver holding ``lock`` has ended; one line if it never takes the request.
    Returns how it took the request, as last seen (another 'sweep stop' may remove it)."""
    asked, seen = time.monotonic(), None
    request = folder.path / STOP_REQUEST
    while True:
        seen = _how_taken(request_for(folder.path, lock)) or seen
        held = folder.driver()
        if held is None or any(held.get(k) != lock[k] for k in LOCK_KEYS):
            return seen
        if time.monotonic() - asked > PICKUP and _untaken(folder.path, lock):
            with contextlib.suppress(OSError):
                request.unlink()
            raise SweepError(
                f"the driver ({who}) did not take the stop request in {PICKUP:.0f} s (a sweep "
                f"older than 'sweep stop', or stuck); unless 'sweep status {folder.path}' says "
                f"stopping, stop it there with kill -INT {lock['pid']}"
            )
        time.sleep(WAIT_POLL)


def _untaken(sweep_dir: Path, lock: dict) -> bool:
    request = request_for(sweep_dir, lock)
    return request is not None and not request.get("taken")
