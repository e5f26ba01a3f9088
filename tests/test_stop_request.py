"""``sweep stop``: the request file, the driver's watcher (a real SIGINT to this process) and
the command's answers. The whole journey with a real sweep is in test_faults.py."""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from pathlib import Path

import pytest

from sweep import stop_request
from sweep.cli import main
from sweep.errors import SweepError
from sweep.lock import folder_id
from sweep.stop import DriverSignals
from sweep.stop_request import STOP_REQUEST, StopRequestWatch, ask_to_stop
from sweep.sweepdir import SweepFolder


def _sweep(tmp_path: Path, state: str = "running") -> Path:
    sw = tmp_path / "sw"
    sw.mkdir()
    (sw / "manifest.json").write_text(json.dumps({"state": state, "runs": {}}))
    return sw


def _lock(sw: Path) -> dict:
    """A live lock held by this process (as a driver's)."""
    info = {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": time.time() - 1,
        "doing": "training",
        "folder": folder_id(sw),
    }
    (sw / ".lock").write_text(json.dumps(info))
    return info


def _until(cond, timeout: float = 10.0) -> None:
    end = time.time() + timeout
    while not cond() and time.time() < end:
        time.sleep(0.05)
    assert cond()


def _request(sw: Path, lock: dict) -> None:
    held = {k: lock[k] for k in ("host", "pid", "started")}
    by = {"host": "login1", "pid": 4242}
    (sw / STOP_REQUEST).write_text(json.dumps({"lock": held, "by": by, "time": time.time()}))


def test_a_request_naming_the_driver_stops_it_as_sigint_does(tmp_path):
    sw = _sweep(tmp_path)
    lock, asked = _lock(sw), []
    with DriverSignals(asked.append) as signals, StopRequestWatch(sw, lock, signals):
        signals.training()
        _request(sw, lock)
        _until(lambda: signals.signum != 0)
    assert asked == [signal.SIGINT] and signals.signum == signal.SIGINT
    assert signals.stopped_by == "'sweep stop' (pid 4242 on login1)"
    assert not (sw / STOP_REQUEST).exists()


def test_a_request_for_another_driver_is_removed_not_obeyed(tmp_path):
    sw = _sweep(tmp_path)
    lock, asked = _lock(sw), []
    with DriverSignals(asked.append) as signals:
        signals.training()
        watch = StopRequestWatch(sw, lock, signals)
        _request(sw, {**lock, "started": lock["started"] - 100})  # an earlier driver's
        watch.check()
        assert not (sw / STOP_REQUEST).exists()
        _request(sw, lock)
        watch.check()
        _until(lambda: signals.signum != 0)
        _request(sw, lock)  # asked again while stopping: removed, no second signal
        watch.check()
        time.sleep(0.2)
    assert asked == [signal.SIGINT] and not (sw / STOP_REQUEST).exists()


def test_sweep_stop_returns_when_the_driver_ended(tmp_path, capsys):
    sw = _sweep(tmp_path)
    lock = _lock(sw)

    def driver_stops(_signum: int) -> None:  # (as a driver ends: its lock goes)
        (sw / ".lock").unlink()

    with DriverSignals(driver_stops) as signals, StopRequestWatch(sw, lock, signals):
        signals.training()
        assert ask_to_stop(sw) == 0  # (main() would put its own SIGINT handler in place)
    out = capsys.readouterr().out
    assert f"asked the driver of sweep {sw} (pid {os.getpid()} on " in out
    assert "it stopped; re-run its command" in out and not (sw / STOP_REQUEST).exists()


def test_sweep_stop_with_no_driver_has_nothing_to_stop(tmp_path, capsys):
    sw = _sweep(tmp_path, state="done")
    assert main(["stop", str(sw)]) == 0
    assert "no driver is running it; nothing to stop" in capsys.readouterr().out
    assert not (sw / STOP_REQUEST).exists()
    assert main(["stop", str(tmp_path / "nothing")]) == 2
    assert "does not exist or is not a folder" in capsys.readouterr().err


def test_a_request_never_taken_is_withdrawn_naming_the_kill(tmp_path, monkeypatch):
    sw = _sweep(tmp_path)
    _lock(sw)  # a live driver with no watcher (stuck, or from before 'sweep stop')
    monkeypatch.setattr(stop_request, "PICKUP", 0.5)
    with pytest.raises(SweepError, match=f"did not take the stop request.*kill -INT {os.getpid()}"):
        ask_to_stop(sw)
    assert not (sw / STOP_REQUEST).exists()
    assert main(["stop", "--no-wait", str(sw)]) == 0  # asks, and leaves the request
    assert (sw / STOP_REQUEST).exists()


def test_status_says_stopping_once_the_driver_wrote_its_stop_file(tmp_path):
    sw = _sweep(tmp_path)
    _lock(sw)
    folder = SweepFolder(sw)
    assert folder.activity() == "running"
    folder.request_stop(signal.SIGINT)
    assert folder.activity() == "stopping"
    (sw / ".lock").unlink()
    assert folder.activity() == "running"  # (the manifest's state: what it recorded)
