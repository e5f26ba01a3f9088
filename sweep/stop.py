"""Stopping a sweep cleanly: the driver's signal handling and the workers' stop watch.

SIGTERM/SIGINT (what SLURM sends before pre-emption) reaches the driver, which writes the
sweep's stop file at once; each worker's :class:`StopWatch` polls that file (it still works
when the job's signal took Ray's own processes down, and polling a file, unlike a blocking
``ray.get`` on an actor, never hands the task's CPUs back to Ray's scheduler) and the worker
checkpoints and returns.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sweep.errors import SweepError

log = logging.getLogger(__name__)


class _BySignal:
    """An exception raised because of signal ``signum``."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)  # type: ignore[call-arg]
        self.signum = signum


class Interrupted(_BySignal, SweepError):
    """The sweep was stopped by a signal; every running ensemble checkpointed."""


class StopNow(_BySignal, BaseException):
    """A second signal: stop waiting for the ensembles. A BaseException, as KeyboardInterrupt
    is, so that no ``except Exception`` swallows it (logging's ``emit``, when the signal lands
    in a log call, would print a traceback and carry on); the CLI prints its one line."""


_AT_EXIT_NOW: list[Callable[[str], None]] = []


@contextlib.contextmanager
def at_exit_now(call: Callable[[str], None]) -> Iterator[None]:
    """Inside, :func:`exit_now` calls ``call(its line)`` before the process ends (last
    registered first). It runs in a signal handler: quick, and no lock that the interrupted
    code may hold (plain ``os`` calls, not logging)."""
    _AT_EXIT_NOW.append(call)
    try:
        yield
    finally:
        _AT_EXIT_NOW.remove(call)


def exit_now(signum: int, _frame: object = None, by: str | None = None) -> None:
    """A signal handler for when nothing is training: one line, then exit 128+signal at once.

    It exits rather than raising: the signal may land inside C++ code (torch's imports,
    ``ray.init``), through which a Python exception ends in ``std::terminate`` (SIGABRT).
    Nothing is lost: every write is atomic (a temp file of a killed write is removed by the
    next run) and Ray's processes fate-share with this one; what registered with
    :func:`at_exit_now` (the sweep's lock, its log) is tidied first.
    """
    name = by or signal.Signals(signum).name
    line = (
        f"interrupted: stopped by {name}; nothing was lost (every write is atomic): "
        "re-run the same command to continue"
    )
    try:
        sys.stderr.write(line + "\n")
        sys.stderr.flush()
        for call in reversed(_AT_EXIT_NOW):
            with contextlib.suppress(Exception):
                call(line)
    finally:
        os._exit(128 + signum)


@contextlib.contextmanager
def interruptible() -> Iterator[None]:
    """SIGTERM/SIGINT end the process with one line (:func:`exit_now`) inside, also SIGTERM,
    whose default would kill the process without a word."""
    old = _install(exit_now)
    try:
        yield
    finally:
        _restore(old)


def quietly(call: Callable[[], object]) -> None:
    """Run ``call``, ignoring errors (Ray may be going down with the job; the disk may be full)."""
    try:
        call()
    except Exception as err:
        log.debug("ignored: %s", err)


STOPS = (signal.SIGTERM, signal.SIGINT)


@dataclass
class _Installed:
    """What :func:`_install` replaced: the handlers, and the main thread's blocked signals."""

    handlers: dict[int, object] = field(default_factory=dict)
    blocked: set[int] | None = None


def _install(handler: Callable[[int, object], None]) -> _Installed:
    """Install ``handler`` for SIGTERM and SIGINT (main thread only), and unblock them there (a
    process started with them blocked would never run it), except in the workers of a Ray
    started by :mod:`sweep.shield`, where SIGTERM stays blocked: SLURM's stops the sweep
    through its driver, and a pre-emption's first one, which reaches Ray but not the driver,
    would only stop each ensemble for a retry."""
    from sweep.shield import SHIELDED

    old = _Installed()
    for sig in STOPS:
        try:
            old.handlers[sig] = signal.signal(sig, handler)
        except ValueError:  # not the main thread: rely on the flag and the stop file
            return old
    if not os.environ.get(SHIELDED):
        old.blocked = set(signal.pthread_sigmask(signal.SIG_UNBLOCK, STOPS))
    return old


def _restore(old: _Installed) -> None:
    for sig, handler in old.handlers.items():
        signal.signal(sig, handler)  # type: ignore[arg-type]
    if old.blocked is not None:
        signal.pthread_sigmask(signal.SIG_SETMASK, old.blocked)


def raised_by(err: BaseException, kind: type | tuple[type, ...]) -> Any:
    """``err`` if it is a ``kind``, else the ``kind`` it was raised from: a signal handler's
    exception raised inside Ray's C code (``ray.wait``) reaches us as a SystemError."""
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, kind):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


SAME_STOP = 1.0
"""Seconds after a stop in which another signal is the same stop (a plain ``scancel`` signals
the driver and the batch script, which forwards its own), not a second one."""


class DriverSignals:
    """In the driver, installed before anything slow starts. Until :meth:`training` is called
    a SIGTERM/SIGINT ends the process at once (:func:`exit_now`: nothing is training, nothing
    to save). Afterwards the first one calls ``on_stop(signum)`` (which writes the stop file) and
    is remembered instead of killing the driver; a second one (a second or more later:
    :data:`SAME_STOP`) stops waiting for the workers."""

    def __init__(
        self, on_stop: Callable[[int], None], asking: str = "every ensemble to checkpoint and stop"
    ) -> None:
        self.on_stop, self.asking = on_stop, asking
        self.signum, self.when = 0, 0.0
        self.by: str | None = None
        """Who asked for the stop, when not a signal sent by hand (:mod:`sweep.stop_request`)."""
        self.immediate = True
        self._old = _Installed()

    def __enter__(self) -> DriverSignals:
        self._old = _install(self._handle)
        return self

    def training(self) -> None:
        """From now on a signal asks the running ensembles to checkpoint and stop."""
        self.immediate = False

    def _handle(self, signum: int, _frame: object) -> None:
        if self.immediate:
            self.signum = signum
            exit_now(signum, by=self.by)
        if self.signum and time.time() - self.when < SAME_STOP:
            return  # the same stop again: SLURM's scancel signals every process of the job
        if self.signum:  # a second signal: stop waiting for the workers
            raise StopNow(
                f"stopped by a second {signal.Signals(signum).name} without waiting for the "
                "ensembles; what they checkpointed is kept: re-run the same command to continue",
                signum,
            )
        self.signum, self.when = signum, time.time()
        quietly(lambda: self.on_stop(signum))
        log.warning("received %s: asking %s", self.stopped_by, self.asking)

    @property
    def stopped_by(self) -> str:
        """What stopped the sweep, as its lines say it."""
        return self.by or signal.Signals(self.signum).name

    def __exit__(self, *exc: object) -> None:
        _restore(self._old)


class StopWatch:
    """Inside a worker: a threading.Event set by SIGTERM/SIGINT or by the driver's stop file
    in the sweep folder."""

    def __init__(self, stop_file: Path, poll: float = 0.5) -> None:
        self.stop_file, self.poll = stop_file, poll
        self.event = threading.Event()
        self._closed = threading.Event()
        self._old = _Installed()

    def is_set(self) -> bool:
        return self.event.is_set()

    def requested(self) -> bool:
        return self.stop_file.exists()

    def _watch(self) -> None:
        while not self.event.is_set() and not self._closed.is_set():
            if self.requested():
                self.event.set()
            self._closed.wait(self.poll)

    def __enter__(self) -> StopWatch:
        self._old = _install(lambda *_: self.event.set())
        self._thread = threading.Thread(target=self._watch, daemon=True, name="sweep-stop-watch")
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._closed.set()  # the watcher thread ends
        _restore(self._old)
