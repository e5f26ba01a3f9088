"""``sweep stop``: the request file, the driver's watcher (a real SIGINT to this process) and
the command's answers. The whole journey with a real sweep is in test_faults.py."""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
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


def _line(proc: subprocess.Popen, timeout: float) -> str:
    """The next line ``proc`` writes (an unbuffered one), or "" after ``timeout`` s."""
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    return proc.stdout.readline() if ready else ""


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
    assert json.loads((sw / STOP_REQUEST).read_text())["taken"] == {"training": True}


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
    assert asked == [signal.SIGINT]  # (the third: taken, no signal)
    assert json.loads((sw / STOP_REQUEST).read_text())["taken"] == {"training": True}


DRIVER = """
import json, os, socket, sys, time
from pathlib import Path
from sweep.lock import folder_id
from sweep.stop import DriverSignals, at_exit_now
from sweep.stop_request import StopRequestWatch
sw, doing, left = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
release = Path(sys.argv[4]) if len(sys.argv) > 4 else None  # (it ends once that file is there)
lock = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time() - 1,
        "doing": doing, "folder": folder_id(sw)}
def stops(_signum):  # as a driver ends: its outcome recorded, then its lock released
    while release is not None and not release.exists():
        time.sleep(0.05)
    (sw / "manifest.json").write_text(json.dumps({"state": left, "runs": {}}))
    (sw / ".lock").unlink()
released = at_exit_now(lambda _line: (sw / ".lock").unlink())
with released, DriverSignals(stops) as signals, StopRequestWatch(sw, lock, signals):
    if left != "starting":  # (else a signal ends it at once, its lock released as it exits)
        signals.training()
    (sw / "lock.tmp").write_text(json.dumps(lock))  # complete, then in place (as sweep.lock:
    os.replace(sw / "lock.tmp", sw / ".lock")  # a 'sweep stop' never reads an empty lock)
    while (sw / ".lock").exists():
        time.sleep(0.05)
"""
"""A stand-in driver: it holds the lock and stops on a request as the real one does (the
whole journey with a real sweep: test_faults.py)."""


@pytest.mark.parametrize(
    "doing, left, said",
    [
        ("training", "interrupted", "it stopped, its running ensembles checkpointed; re-run its"),
        ("evaluating", "interrupted", "it stopped; 'sweep evaluate "),
        ("training", "done", "every run had finished before it stopped: the sweep is done"),
        ("training", "starting", "it stopped before training began; re-run its command"),
    ],
)
def test_sweep_stop_returns_when_the_driver_ended_saying_what_it_left(
    tmp_path, capsys, doing, left, said
):
    sw = _sweep(tmp_path)
    driver = subprocess.Popen([sys.executable, "-c", DRIVER, str(sw), doing, left])
    try:
        _until(lambda: (sw / ".lock").exists(), timeout=60)
        assert ask_to_stop(sw) == 0
        assert driver.wait(timeout=30) == (130 if left == "starting" else 0)
    finally:
        driver.kill()
    out = capsys.readouterr().out
    assert f"asked the driver of sweep {sw} (pid {driver.pid} on " in out
    assert said in out and not (sw / STOP_REQUEST).exists()


def test_two_sweep_stops_at_once_both_say_what_the_driver_left(tmp_path):
    """The request file holds the last asker's request: each 'sweep stop' removes only its
    own, so the other still reads how the driver took it (it said "it ended before it took
    the request" when the first one had removed it)."""
    sw = _sweep(tmp_path)
    driver = subprocess.Popen([sys.executable, "-c", DRIVER, str(sw), "training", "interrupted"])
    try:
        _until(lambda: (sw / ".lock").exists(), timeout=60)
        lock = json.loads((sw / ".lock").read_text())
        _request(sw, lock)  # another 'sweep stop' (pid 4242 on login1), already waiting
        assert driver.wait(timeout=30) == 0
    finally:
        driver.kill()
    mine = {"host": socket.gethostname(), "pid": os.getpid()}
    theirs = stop_request._taken(SweepFolder(sw), lock, mine)
    assert theirs == {"training": True} and (sw / STOP_REQUEST).exists()  # (left for 4242)
    request = json.loads((sw / STOP_REQUEST).read_text())
    assert stop_request._taken(SweepFolder(sw), lock, request["by"]) == {"training": True}
    assert not (sw / STOP_REQUEST).exists()


def test_two_sweep_stop_commands_a_moment_apart_both_say_it_stopped(tmp_path):
    """The second does not write over the first's request; each remembers how the driver took
    it, and the first leaves it a moment for the second (which said "it ended before it took
    the request" when the first had removed it)."""
    sw, release = _sweep(tmp_path), tmp_path / "release"
    argv = [sys.executable, "-c", DRIVER, str(sw), "training", "interrupted", str(release)]
    driver = subprocess.Popen(argv)
    stop = [sys.executable, "-m", "sweep", "stop", str(sw)]
    unbuffered = [sys.executable, "-u", *stop[1:]]
    try:
        _until(lambda: (sw / ".lock").exists(), timeout=60)
        first = subprocess.Popen(stop, stdout=subprocess.PIPE, text=True)
        _until(lambda: (sw / STOP_REQUEST).exists())
        second = subprocess.Popen(unbuffered, stdout=subprocess.PIPE, text=True)
        asked = _line(second, timeout=60)  # (it found the driver: a slow start under load
        _until(lambda: "taken" in json.loads((sw / STOP_REQUEST).read_text()))  # had let the
        release.touch()  # driver end first: "nothing to stop" or "it ended before it took")
        said = [p.communicate(timeout=60)[0] for p in (first, second)]
        said[1] = asked + said[1]
        assert driver.wait(timeout=30) == 0
    finally:
        driver.kill()
    for out in said:
        assert "it stopped, its running ensembles checkpointed" in out, out
    assert not (sw / STOP_REQUEST).exists()


def test_a_second_sweep_stop_leaves_a_request_not_yet_taken_as_it_is(tmp_path):
    """Written over, the first command's request was gone when the second removed its own."""
    sw = _sweep(tmp_path)
    _request(sw, _lock(sw))  # another 'sweep stop' asked; the driver has not looked yet
    assert ask_to_stop(sw, wait=False) == 0
    assert json.loads((sw / STOP_REQUEST).read_text())["by"] == {"host": "login1", "pid": 4242}


def test_how_the_driver_took_the_request_is_remembered_while_waiting(tmp_path):
    """Another 'sweep stop' may remove the request before this one reads it at the end."""
    import threading

    sw = _sweep(tmp_path)
    lock = _lock(sw)
    _request(sw, lock)
    request = json.loads((sw / STOP_REQUEST).read_text())
    (sw / STOP_REQUEST).write_text(json.dumps({**request, "taken": {"training": True}}))

    def others_end() -> None:
        time.sleep(0.7)
        (sw / STOP_REQUEST).unlink()  # (the other command, done)
        time.sleep(0.7)
        (sw / ".lock").unlink()  # (the driver, ended)

    threading.Thread(target=others_end).start()
    held = {k: lock[k] for k in ("host", "pid", "started")}
    seen = stop_request._wait_for_end(SweepFolder(sw), held, "pid 1 on h")
    assert seen == {"training": True}


def test_a_driver_that_ended_before_it_took_the_request_is_said_so(tmp_path):
    sw = _sweep(tmp_path, state="done")
    held = {"host": "h", "pid": 1, "started": 1.0, "doing": "training"}
    said = stop_request._ended(SweepFolder(sw), held, None)
    assert said == "it ended before it took the request; the sweep is done"


def test_a_driver_stopped_by_another_asker_is_not_said_to_have_ended_before_it_took_it(tmp_path):
    """A 'sweep stop' that stalled past the first one's removal of the request (or a driver
    that a signal stopped first) saw no request taken: the sweep is interrupted all the same."""
    sw = _sweep(tmp_path, state="interrupted")
    held = {"host": "h", "pid": 1, "started": 1.0, "doing": "training"}
    said = stop_request._ended(SweepFolder(sw), held, None)
    assert said == (
        "it stopped (asked by another 'sweep stop' or a signal); re-run its command (or "
        f"'sweep resume {sw}') to continue"
    )


def test_a_sweep_stopped_before_its_config_was_saved_is_not_told_to_resume(tmp_path):
    """Stopped while its first store is made, a sweep has no config.yaml: 'sweep resume'
    would fail ("before it planned any run"), so only its command is named."""
    sw = _sweep(tmp_path, state="starting")
    held = {"host": "h", "pid": 1, "started": 1.0, "doing": "training"}
    said = stop_request._ended(SweepFolder(sw), held, {"training": False})
    assert said == "it stopped before training began; re-run its command"
    saved = "data:\n  name: synthetic\nsae:\n  name: untied\nsweep_dir: sw\n"
    (sw / "config.yaml").write_text(saved)  # (a sweep run before)
    said = stop_request._ended(SweepFolder(sw), held, {"training": False})
    assert said == f"it stopped before training began; re-run its command (or 'sweep resume {sw}')"


def test_a_request_to_a_driver_a_signal_stops_already_sends_no_second_one(tmp_path):
    """(A second signal would stop the driver's wait for the checkpoints.)"""
    sw = _sweep(tmp_path)
    lock, asked = _lock(sw), []
    with DriverSignals(asked.append) as signals:
        signals.training()
        os.kill(os.getpid(), signal.SIGTERM)  # SLURM's, or a Ctrl-C
        _until(lambda: signals.signum != 0)
        _request(sw, lock)
        StopRequestWatch(sw, lock, signals).check()
        time.sleep(0.2)
    assert asked == [signal.SIGTERM] and signals.stopped_by == "SIGTERM"
    assert json.loads((sw / STOP_REQUEST).read_text())["taken"] == {"training": True}


def test_ctrl_c_of_a_waiting_sweep_stop_leaves_the_request_standing(tmp_path):
    sw = _sweep(tmp_path)
    driver = subprocess.Popen(["sleep", "60"])  # a live driver that is slow to stop
    try:
        info = {**_lock(sw), "pid": driver.pid}
        (sw / ".lock").write_text(json.dumps(info))
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        cmd = [sys.executable, "-m", "sweep", "stop", str(sw)]
        stop = subprocess.Popen(
            cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        _until(lambda: (sw / STOP_REQUEST).exists(), timeout=60)
        time.sleep(1.0)  # (waiting)
        stop.send_signal(signal.SIGINT)
        out, err = stop.communicate(timeout=30)
    finally:
        driver.kill()
    assert stop.returncode == 130, out + err
    assert "left waiting; the driver still stops" in out and not err
    assert (sw / STOP_REQUEST).exists()


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


def test_status_says_stopping_once_asked(tmp_path):
    sw = _sweep(tmp_path)
    lock = _lock(sw)
    folder = SweepFolder(sw)
    assert folder.activity() == "running"
    _request(sw, {**lock, "pid": 1})  # another driver's: not this one's stop
    assert folder.activity() == "running"
    _request(sw, lock)  # before the driver takes it (its poll: 1 s)
    assert folder.activity() == "stopping"
    (sw / STOP_REQUEST).unlink()
    folder.request_stop(signal.SIGINT)
    assert folder.activity() == "stopping"
    (sw / ".lock").unlink()
    assert folder.activity() == "running"  # (the manifest's state: what it recorded)
