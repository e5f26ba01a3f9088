"""Exact resume and fault tolerance with REAL process kills of `sweep run` subprocesses.

Contract: a sweep interrupted at any point (SIGKILL of the driver, SIGKILL of a worker,
SIGTERM/SIGINT of the whole job) and resumed ends with dictionaries bit-identical to an
uninterrupted sweep.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from sweep import checkpoints, reaper
from sweep.errors import OutOfMemory, SweepError
from sweep.stop import SAME_STOP
from sweep.sweepdir import STOP

HOOK = Path(__file__).parent / "hooks"
ARGS = [
    "data.width=32",
    "data.n_features=64",
    "data.rows=40000",
    "data.rows_per_chunk=8192",
    "data.eval_rows=2048",
    "grid.l1=[1e-2,4e-2]",
    "grid.dict_ratio=[4,8]",
    "train.batch_size=512",
    "train.epochs=8",
    "train.log_every=5",
    "train.checkpoint_every=10",
    "train.device=cpu",
    "launch.num_cpus=2",
    "launch.cpus_per_ensemble=1",
    "progress=false",
]


def env(**extra: str) -> dict:
    e = dict(os.environ, RAY_AUTH_MODE="disabled", TQDM_DISABLE="1", PYTHONUNBUFFERED="1")
    e.pop("RAY_ADDRESS", None)
    return {**e, **extra}


def start(
    sweep_dir: Path, ray_tmp: Path, *extra: str, environ: dict | None = None
) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "sweep",
        "run",
        f"sweep_dir={sweep_dir}",
        f"launch.temp_dir={ray_tmp}",
        *ARGS,
        *extra,
    ]
    return subprocess.Popen(
        cmd,
        env=env(**(environ or {})),
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def finish(p: subprocess.Popen, timeout: float = 240) -> tuple[int, str]:
    try:
        out, _ = p.communicate(timeout=timeout)
    except BaseException:  # a timeout (ours or pytest-timeout's): leave nothing running
        kill_group(p)
        raise
    return p.returncode, out.decode(errors="replace")


def kill_group(p: subprocess.Popen) -> None:
    """SIGKILL a sweep started by :func:`start` and its process group (its own session)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(p.pid, signal.SIGKILL)
    p.wait()


def hashes(sweep_dir: Path) -> dict[str, str]:
    runs = sorted((sweep_dir / "runs").iterdir())
    return {r.name: hashlib.sha256((r / "sae.safetensors").read_bytes()).hexdigest() for r in runs}


def curve_len(sweep_dir: Path) -> int:
    """Training-curve records written so far by the slowest-logging run (0 before any)."""
    runs = sweep_dir / "runs"
    if not runs.exists():
        return 0
    lens = [
        len((r / "metrics.jsonl").read_text().splitlines()) if (r / "metrics.jsonl").exists() else 0
        for r in runs.iterdir()
    ]
    return min(lens) if len(lens) == 4 else 0


def wait_for(cond, p: subprocess.Popen | None = None, timeout: float = 120) -> None:
    """Until ``cond()``. Fails when the sweep ``p`` ends first, or after ``timeout`` s (then
    killed), with what it printed."""
    end = time.time() + timeout
    while time.time() < end:
        if cond():
            return
        if p is not None and p.poll() is not None:
            raise AssertionError(f"the sweep ended (exit {p.returncode}) first:\n{_said(p)}")
        time.sleep(0.05)
    if p is not None:
        kill_group(p)
    raise AssertionError(f"timed out waiting for the sweep to make progress\n{_said(p)}")


def _said(p: subprocess.Popen | None) -> str:
    """The last lines a finished sweep printed."""
    if p is None or p.stdout is None:
        return ""
    return p.stdout.read().decode(errors="replace")[-4000:]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[str, str]:
    base, ray_tmp = tmp_path_factory.mktemp("ref"), tmp_path_factory.getbasetemp() / "rr"
    code, out = finish(start(base / "sw", ray_tmp))
    assert code == 0, out
    assert not list(ray_tmp.glob("session_2*"))  # a session that went well: its folder removed
    assert not (ray_tmp / "session_latest").is_symlink()  # (and Ray's link to it)
    return hashes(base / "sw")


def _resume_and_compare(sweep_dir: Path, ray_tmp: Path, reference: dict[str, str]) -> None:
    code, out = finish(start(sweep_dir, ray_tmp))
    assert code == 0, out
    assert hashes(sweep_dir) == reference
    assert not (sweep_dir / ".lock").exists()


@pytest.mark.parametrize("records", [2, 20])
def test_sigkill_driver_then_rerun(reference, tmp_path, tmp_path_factory, records):
    sw, rt = tmp_path / "sw", tmp_path_factory.getbasetemp() / f"rk{records}"
    p = start(sw, rt)
    wait_for(lambda: curve_len(sw) >= records, p)
    os.kill(p.pid, signal.SIGKILL)  # the driver only: Ray's processes fate-share with it
    p.wait(timeout=60)
    assert not all((r / "DONE").exists() for r in (sw / "runs").iterdir())
    time.sleep(1.0)
    (session,) = rt.glob(f"session_*_{p.pid}")
    left = reaper.holding(session)  # Ray's agents outlive it (not its raylet nor workers)
    again = rt if records == 2 else rt.with_name(f"{rt.name}b")  # (another launch.temp_dir)
    code, out = finish(start(sw, again))  # a stale lock from the dead driver is taken over
    assert code == 0 and hashes(sw) == reference, out
    assert reaper.holding(session) == []  # and the agents the dead driver left are ended
    assert ("Ray process(es) that the killed driver" in out) == bool(left), out


def test_sigkill_worker_is_retried_from_checkpoint(reference, tmp_path, tmp_path_factory):
    sw, rt = tmp_path / "sw", tmp_path_factory.getbasetemp() / "rw"
    p = start(sw, rt)
    wait_for(lambda: curve_len(sw) >= 10, p)
    victim = next(iter((sw / "runs").iterdir()))
    pid = json.loads((victim / "placement.json").read_text())["pid"]
    os.kill(pid, signal.SIGKILL)
    code, out = finish(p)
    assert code == 0, out  # Ray retried the ensemble; it continued from its checkpoint
    assert hashes(sw) == reference
    said = "its worker died 1 time(s) and Ray ran it again; it continued from its checkpoints"
    assert said in (sw / "sweep.log").read_text() and "its worker died 1" in out  # (wrapped)
    events = [json.loads(ln) for ln in (victim / "events.jsonl").read_text().splitlines()]
    (retried,) = [e for e in events if e["event"] == "worker_retried"]
    assert retried["attempt"] == 2 and retried["died"]["pid"] == pid


@pytest.mark.parametrize(
    "sig, code",
    [  # (past start-up both take the same handler: SIGINT's own case runs with -m slow)
        (signal.SIGTERM, 143),
        pytest.param(signal.SIGINT, 130, marks=pytest.mark.slow),
    ],
)
def test_sigterm_sigint_checkpoint_and_exit_cleanly(
    reference, tmp_path, tmp_path_factory, sig, code
):
    sw, rt = tmp_path / "sw", tmp_path_factory.getbasetemp() / f"rs{int(sig)}"
    p = start(sw, rt)
    wait_for(lambda: curve_len(sw) >= 8, p)
    children = psutil.Process(p.pid).children(recursive=True)
    for c in children:  # the raylet a second ahead (on SIGTERM it killed its workers at once)
        if c.name() == "raylet":
            os.kill(c.pid, sig)
    time.sleep(1)
    job = [p.pid] + [c.pid for c in children]
    for pid in job:  # every process of the job (Ray's too), as SLURM does before pre-emption
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
    got, out = finish(p)
    assert got == code, out
    assert "re-run the same command" in out
    assert "stopped waiting" not in out  # every ensemble checkpointed: nothing was cut short
    assert "did not checkpoint for the stop" not in out  # (no worker was lost first)
    said = (sw / "sweep.log").read_text()
    assert f"sweep.details: interrupted: stopped by {sig.name}: " in said, said
    assert "running ensembles checkpointed" in said, said
    manifest = json.loads((sw / "manifest.json").read_text())
    assert manifest["state"] == "interrupted"
    runs = list((sw / "runs").iterdir())
    assert any(not (r / "DONE").exists() for r in runs)
    from sweep.status import status_rows

    rows = status_rows(sw)
    states = {r["state"] for r in rows}
    assert "interrupted" in states and states <= {"interrupted", "done", "pending"}
    for r in rows:  # each stopped run names the checkpoint it continues from
        if r["state"] == "interrupted":
            assert 0 < r["rows_saved"] < r["rows_total"], r
    # its newest checkpoint damaged: the ensemble continues from an older one (or the start),
    # still exact, and the worker's warning reaches sweep.log
    stopped = next(r["run_id"] for r in rows if r["state"] == "interrupted")
    ens = json.loads((sw / "runs" / stopped / "spec.json").read_text())["ensemble"]  # kept
    newest = checkpoints.list_checkpoints(sw / "runs" / stopped)[-1]
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0xFF
    newest.write_bytes(bytes(data))
    _resume_and_compare(sw, rt, reference)
    said = (sw / "sweep.log").read_text()
    workers = [ln for ln in said.splitlines() if "worker of ensemble" in ln]
    assert f"details: worker of ensemble {ens}: run {stopped} (ensemble {ens}): " in said, workers


def test_a_stop_whose_stop_file_cannot_be_written_reaches_the_workers_through_ray(
    reference, tmp_path, tmp_path_factory
):
    """A full disk (or a sweep folder made read-only) refuses the stop file, the workers'
    only stop signal: they trained on until killed at the grace's end, losing every step
    since their last checkpoint. Ray's cancel asks them instead: they checkpoint and stop."""
    sw, rt = tmp_path / "sw", tmp_path_factory.getbasetemp() / "rsf"
    environ = {"PYTHONPATH": str(HOOK), "SWEEP_TEST_STOP_FILE_FAILS": "1"}
    p = start(sw, rt, "train.checkpoint_every=100000", environ=environ)
    wait_for(lambda: curve_len(sw) >= 8, p)
    os.kill(p.pid, signal.SIGTERM)  # (the driver alone: its workers hear of it only from it)
    got, out = finish(p)
    assert got == 143, out
    assert "could not write the stop file" in out and "asking the ensembles through Ray" in out
    assert "running ensembles checkpointed" in (sw / "sweep.log").read_text()
    interrupted = [r for r in (sw / "runs").iterdir() if checkpoints.list_checkpoints(r)]
    assert interrupted and all((r / "interrupted.json").is_file() for r in interrupted)
    _resume_and_compare(sw, rt, reference)


def test_sweep_stop_from_another_terminal_checkpoints_and_resumes_exactly(
    reference, tmp_path, tmp_path_factory
):
    """`sweep stop` (another process) stops the driver as SIGINT does; it returns once the
    driver ended, and the re-run ends identical to the uninterrupted sweep."""
    sw, rt = tmp_path / "sw", tmp_path_factory.getbasetemp() / "rstop"
    slow = {"PYTHONPATH": str(HOOK), "SWEEP_TEST_STEP_SLEEP": "0.02"}  # (~12 s of training)
    p = start(sw, rt, environ=slow)
    wait_for(lambda: curve_len(sw) >= 8, p)
    asked = subprocess.run(
        [sys.executable, "-m", "sweep", "stop", str(sw)],
        env=env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert asked.returncode == 0, asked.stdout + asked.stderr
    assert "it stopped, its running ensembles checkpointed; re-run its command" in asked.stdout
    got, out = finish(p)
    assert got == 130, out
    said = (sw / "sweep.log").read_text()
    assert "interrupted: stopped by 'sweep stop' (pid " in said, said
    for ens in ("r4-e0", "r8-e0"):  # (each said, whether or not its result was waited for)
        assert f"ensemble {ens}: interrupted at step " in said, said
    assert json.loads((sw / "manifest.json").read_text())["state"] == "interrupted"
    assert not (sw / ".stop-request").exists()
    _resume_and_compare(sw, rt, reference)


def test_second_sigterm_exits_143_without_waiting(reference, tmp_path, tmp_path_factory):
    """The second signal stops the wait for the ensembles: 128 + that signal, one line, and
    the sweep still resumes to the uninterrupted result."""
    sw, rt = tmp_path / "sw", tmp_path_factory.getbasetemp() / "r2nd"
    slow = {"PYTHONPATH": str(HOOK), "SWEEP_TEST_STEP_SLEEP": "2.5"}  # (a stop takes a step)
    p = start(sw, rt, environ=slow)
    wait_for(lambda: curve_len(sw) >= 1, p)
    p.send_signal(signal.SIGTERM)
    # once the first is handled (its stop file is written): two signals that arrive while the
    # driver waits inside Ray are one call of the handler (Python keeps a flag, not a count);
    # one within SAME_STOP of the first is the same stop (a plain scancel's, forwarded)
    wait_for(lambda: (sw / STOP).exists() or p.poll() is not None)
    time.sleep(SAME_STOP + 0.1)
    p.send_signal(signal.SIGTERM)
    got, out = finish(p)
    assert got == 143, out
    # the second signal may land after the ensembles already checkpointed (a fast machine)
    assert "re-run the same command" in out
    assert "second SIGTERM" in out or "running ensembles checkpointed" in out
    assert json.loads((sw / "manifest.json").read_text())["state"] == "interrupted"
    _resume_and_compare(sw, rt, reference)


def test_a_worker_stopped_alone_continues_from_its_checkpoint(
    reference, tmp_path, tmp_path_factory
):
    """A SIGTERM to one worker (someone's kill, a node agent), not to the job: its ensemble
    checkpoints, and the driver continues it from there, as it would a crashed one."""
    sw, rt = tmp_path / "sw", tmp_path_factory.getbasetemp() / "ralone"
    p = start(sw, rt)
    wait_for(lambda: curve_len(sw) >= 10, p)
    victim = sw / "runs" / "r8-l1_1e-02-s0"
    os.kill(json.loads((victim / "placement.json").read_text())["pid"], signal.SIGTERM)
    code, out = finish(p)
    assert code == 0, out
    said = " ".join((sw / "sweep.log").read_text().split())
    assert (
        "r8-e0: its worker was stopped by a signal this driver did not send; it continues" in said
    )
    events = [json.loads(ln) for ln in (victim / "events.jsonl").read_text().splitlines()]
    outside = [e for e in events if e["event"] == "stopped_from_outside"]
    assert [(e["by"], e["times"]) for e in outside] == [("signal", 1)], events
    assert hashes(sw) == reference


def test_a_workers_unexpected_error_is_named_by_type_and_its_traceback_kept(
    tmp_path, tmp_path_factory
):
    """A bug's error in a worker (a KeyError while evaluating): the terminal and FAILED name
    its type, and sweep.log holds the worker's traceback (the one place to debug it from)."""
    sw = tmp_path / "sw"
    hook = {"PYTHONPATH": str(HOOK), "SWEEP_TEST_EVAL_RAISES": "W_dec_missing"}
    code, out = finish(start(sw, tmp_path_factory.getbasetemp() / "ke", environ=hook))
    assert code == 2 and "failed: KeyError: 'W_dec_missing'" in out, out
    reason = json.loads((sw / "runs" / "r8-l1_1e-02-s0" / "FAILED").read_text())["reason"]
    assert reason == "KeyError: 'W_dec_missing'"
    log = (sw / "sweep.log").read_text()
    raised = log[log.index("what its task raised:") :]
    assert 'sitecustomize.py", line' in raised and "in evaluate_members" in raised
    assert "\nKeyError: 'W_dec_missing'\n" in raised and "\x1b" not in raised
    assert list((tmp_path_factory.getbasetemp() / "ke").glob("session_2*"))  # (Ray's logs kept)


def test_a_run_that_finished_before_its_ensemble_failed_stays_done(tmp_path, tmp_path_factory):
    """An ensemble failing while it writes its members' final files (here the second's): the
    first member's results are final and stay so, with no FAILED beside its DONE."""
    sw = tmp_path / "sw"
    hook = {"PYTHONPATH": str(HOOK), "SWEEP_TEST_FINISH_RAISES": "r8-l1_4e-02-s0"}
    code, out = finish(start(sw, tmp_path_factory.getbasetemp() / "fr", environ=hook))
    assert code == 2 and "failed: KeyError: 'r8-l1_4e-02-s0'" in out, out
    first, second = sw / "runs" / "r8-l1_1e-02-s0", sw / "runs" / "r8-l1_4e-02-s0"
    assert (first / "DONE").is_file() and not (first / "FAILED").exists()
    assert (second / "FAILED").is_file() and not (second / "DONE").exists()
    from sweep.status import status_rows

    states = {r["run_id"]: r["state"] for r in status_rows(sw)}
    assert states["r8-l1_1e-02-s0"] == "done" and states["r8-l1_4e-02-s0"] == "failed"


def test_a_stop_says_which_ensembles_did_not_checkpoint_for_it(tmp_path, tmp_path_factory):
    """Pre-emption signals Ray's processes too: a worker lost before it checkpointed for the
    stop (here killed just before the driver's SIGTERM) continues from an older step; the
    driver's last line says so instead of "running ensembles checkpointed"."""
    sw, rt = tmp_path / "sw", tmp_path_factory.getbasetemp() / "lost"
    p = start(sw, rt)
    wait_for(lambda: curve_len(sw) >= 8, p)
    victim = sw / "runs" / "r8-l1_1e-02-s0"
    os.kill(json.loads((victim / "placement.json").read_text())["pid"], signal.SIGKILL)
    os.kill(p.pid, signal.SIGTERM)
    code, out = finish(p)
    assert code == 143, out
    assert "1 ensemble(s) (r8-e0) did not checkpoint for the stop" in out, out
    assert "the others: running ensembles checkpointed" in out
    from sweep.status import status_rows

    states = {r["run_id"]: r["state"] for r in status_rows(sw)}
    assert states["r8-l1_1e-02-s0"] == states["r8-l1_4e-02-s0"] == "interrupted", states


def test_a_worker_stopped_alone_past_its_retries_fails_its_runs(
    reference, tmp_path, tmp_path_factory
):
    """With no retry left, a worker stopped by a signal its driver did not send fails its
    ensemble as a crashed one does: its runs are marked failed with the reason (they were
    left interrupted, the sweep failed), and a re-run continues them from their checkpoint."""
    sw, rt = tmp_path / "sw", tmp_path_factory.getbasetemp() / "ralone0"
    victim, code, out = _worker_killed_without_retries(sw, rt, signal.SIGTERM)
    assert code == 2 and "1 ensemble(s) failed (r8-e0: its worker was stopped by a" in out, out
    for run in (victim, sw / "runs" / "r8-l1_4e-02-s0"):
        reason = json.loads((run / "FAILED").read_text())["reason"]
        assert reason.startswith("its worker was stopped by a signal this driver did not send")
    _resume_and_compare(sw, rt, reference)


def test_a_stop_while_an_ensemble_is_evaluated_says_its_training_is_saved(
    reference, tmp_path, tmp_path_factory
):
    """A stop whose grace runs out while an ensemble is evaluated (its end checkpoint on
    disk): the driver said it "did not checkpoint for the stop" and would continue "from its
    last periodic checkpoint"; its training is saved, and the re-run only evaluates it."""
    sw, rt, mark = tmp_path / "sw", tmp_path_factory.getbasetemp() / "ev", tmp_path / "evaluating"
    hook = {"PYTHONPATH": str(HOOK), "SWEEP_TEST_EVAL_SLEEP": f"60:{mark}",
            "SWEEP_TEST_STOP_GRACE": "2"}  # fmt: skip
    p = start(sw, rt, environ=hook)
    wait_for(mark.exists, p)
    os.kill(p.pid, signal.SIGTERM)
    code, out = finish(p)
    assert code == 143, out
    assert "did not checkpoint" not in out and "before they checkpointed" not in out, out
    assert "was being evaluated when the stop came: its training is saved (step 592)" in out
    _resume_and_compare(sw, rt, reference)


def test_a_stop_before_training_leaves_none_of_rays_processes(tmp_path, tmp_path_factory):
    """A signal while the driver's Ray is up but nothing trains yet (planning) exits at once
    (exit_now): Ray's dashboard and runtime-env agents outlived it, re-parented to init,
    ~170 MB for good (its raylet and GCS end with it). They are ended as it exits."""
    from sweep import reaper

    sw, rt, mark = tmp_path / "sw", tmp_path_factory.getbasetemp() / "pl", tmp_path / "planning"
    hook = {"PYTHONPATH": str(HOOK), "SWEEP_TEST_PLAN_SLEEP": f"60:{mark}"}
    p = start(sw, rt, environ=hook)
    wait_for(mark.exists, p)
    (session,) = rt.glob(f"session_*_{p.pid}")
    wait_for(lambda: len(reaper.holding(session)) >= 2, p)  # (its agents are up)
    os.kill(p.pid, signal.SIGTERM)
    code, out = finish(p)
    assert code == 143 and "interrupted: stopped by SIGTERM; nothing was lost" in out, out
    wait_for(lambda: not reaper.holding(session), timeout=15)


def _worker_killed_without_retries(
    sw: Path, rt: Path, sig: signal.Signals
) -> tuple[Path, int, str]:
    """A sweep with ``launch.max_retries=0`` whose r8 worker gets ``sig`` at its 10th curve
    record: (a run folder of that ensemble, the exit code, what the sweep printed)."""
    p = start(sw, rt, "launch.max_retries=0")
    wait_for(lambda: curve_len(sw) >= 10, p)
    victim = sw / "runs" / "r8-l1_1e-02-s0"
    os.kill(json.loads((victim / "placement.json").read_text())["pid"], sig)
    return victim, *finish(p)


def test_worker_dead_after_last_retry_marks_runs_failed(reference, tmp_path, tmp_path_factory):
    sw, rt = tmp_path / "sw", tmp_path_factory.getbasetemp() / "rf"
    _, code, out = _worker_killed_without_retries(sw, rt, signal.SIGKILL)
    assert code == 2, out
    assert "1 ensemble(s) failed" in out and "finished runs are kept" in out
    assert f"(Ray's logs: {rt}" in out  # where Ray's "python-core-worker-*.log files" are
    assert "ERROR sweep.details: error: 1 ensemble(s) failed (" in (sw / "sweep.log").read_text()
    for rid in ("r8-l1_1e-02-s0", "r8-l1_4e-02-s0"):  # the killed ensemble's members
        reason = json.loads((sw / "runs" / rid / "FAILED").read_text())["reason"]
        assert reason and not (sw / "runs" / rid / "DONE").exists()
    for rid in ("r4-l1_1e-02-s0", "r4-l1_4e-02-s0"):  # the other ensemble finished
        assert (sw / "runs" / rid / "DONE").exists()
    from sweep.status import status_rows

    states = {r["run_id"]: r["state"] for r in status_rows(sw)}
    assert states == {
        "r8-l1_1e-02-s0": "failed",
        "r8-l1_4e-02-s0": "failed",
        "r4-l1_1e-02-s0": "done",
        "r4-l1_4e-02-s0": "done",
    }
    _resume_and_compare(sw, rt, reference)  # a failed run continues from its checkpoint


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signals_while_starting_up_exit_cleanly(reference, tmp_path, tmp_path_factory, sig):
    """A stop during imports, store generation, Ray start-up or planning: one line, exit
    128+signal, within seconds, and the re-run ends identical."""
    sw, rt = tmp_path / "sw", tmp_path_factory.getbasetemp() / f"ru{int(sig)}"
    p = start(sw, rt)
    wait_for(lambda: (sw / ".lock").exists(), p)  # store, Ray and planning take seconds more
    os.kill(p.pid, sig)
    code, out = finish(p, timeout=90)
    assert code == 128 + sig, out
    assert not (sw / ".lock").exists()  # the next run need not take over a stale lock
    log = (sw / "sweep.log").read_text()
    assert f"WARNING sweep.driver: interrupted: stopped by {sig.name}" in log, log
    for delay in (0.7, 1.2, 1.8, 2.5, 3.5):  # after the interpreter itself has started
        p = start(sw, rt)
        time.sleep(delay)
        t0 = time.time()
        os.kill(p.pid, sig)
        code, out = finish(p, timeout=90)
        if code == 0:  # finished before the signal could matter (a fast machine)
            break
        assert code == 128 + sig, out
        assert time.time() - t0 < 45, out
        lines = [ln for ln in out.strip().splitlines() if ln.strip()]
        assert lines[-1].startswith("interrupted:"), out
        assert "Traceback" not in out and "SIGABRT" not in out, out
        time.sleep(0.5)
    _resume_and_compare(sw, rt, reference)


def test_stop_grace_grows_with_what_the_ensembles_must_write():
    from sweep import grid
    from sweep.execution import STOP_GRACE, stop_grace

    def ens(width: int, ratio: int) -> grid.EnsembleSpec:
        runs = grid.expand([1e-3, 2e-3], [ratio], 1, width, "untied")
        return grid.group(runs, {ratio: 2})[0]

    small, big = stop_grace([ens(16, 2)]), stop_grace([ens(2304, 8), ens(2304, 8)])
    assert STOP_GRACE <= small < STOP_GRACE + 1
    assert big > STOP_GRACE + 30  # 2 x 2 members of 2304 x 18432: 4 GB at 100 MB/s


def test_sweep_start_spares_a_live_temp_file_in_the_sweep_folder(tmp_path):
    """``sweep report`` writes summary.csv without the lock: a starting driver removes only
    temp files old enough to be the leftovers of a killed write."""
    from sweep.io import STALE_TEMP_SECONDS, remove_stale_temps

    live, dead = tmp_path / ".summary.csv.live.tmp", tmp_path / ".summary.csv.dead.tmp"
    live.write_text("being written")
    dead.write_text("left by a killed write")
    old = time.time() - 2 * STALE_TEMP_SECONDS
    os.utime(dead, (old, old))
    assert remove_stale_temps(tmp_path, older_than=STALE_TEMP_SECONDS) == 1
    assert live.exists() and not dead.exists()


def test_a_signal_within_a_second_of_the_stop_is_the_same_stop():
    """A plain ``scancel`` signals every process of the job: the driver, and the batch script,
    which forwards its own. Those two are one stop; one later stops the wait."""
    from sweep.stop import DriverSignals, StopNow

    stops: list[int] = []
    with DriverSignals(stops.append) as signals:
        signals.training()
        for _ in range(2):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)  # (each handled on its own: Python keeps a flag, not a count)
        assert stops == [signal.SIGTERM]
        signals.when -= SAME_STOP
        with pytest.raises(StopNow, match="second SIGTERM"):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)


BLOCKED = """
import os, signal, sys, time
from pathlib import Path
from sweep.stop import StopWatch
assert signal.SIGTERM in signal.pthread_sigmask(signal.SIG_BLOCK, [])  # (started so)
with StopWatch(Path(sys.argv[1])) as stop:
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.3)
    print("stopped by the signal" if stop.is_set() else "not by the signal")
    Path(sys.argv[1]).touch()  # the driver's stop file
    stop.event.wait(5)
    print("stopped by the driver" if stop.is_set() else "never stopped")
assert signal.SIGTERM in signal.pthread_sigmask(signal.SIG_BLOCK, [])  # (as it was)
"""


@pytest.mark.parametrize("shielded", [True, False])
def test_a_worker_started_with_sigterm_blocked(tmp_path, shielded):
    """launch/slurm.sbatch starts Ray with SIGTERM blocked (``python -m sweep.shield``): a
    scancel signals every process, and Ray's raylet would kill its workers at once. Its
    workers keep it blocked and stop when the driver says so (a pre-emption signals Ray a
    grace time before the driver). Any other process started with it blocked takes its stop."""
    cmd = [sys.executable, "-c", BLOCKED, str(tmp_path / "stop")]
    if shielded:
        cmd = [sys.executable, "-m", "sweep.shield", *cmd]
    else:
        block = "import os, signal, sys; signal.pthread_sigmask(signal.SIG_BLOCK, {15}); "
        cmd = [sys.executable, "-c", block + "os.execvp(sys.argv[1], sys.argv[1:])", *cmd]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env())
    said = done.stdout.split("\n")[0]
    assert done.returncode == 0, done.stderr
    assert said == ("not by the signal" if shielded else "stopped by the signal")


def test_a_stop_raised_inside_rays_c_code_is_still_a_stop(monkeypatch, capsys):
    """A second signal's exception raised while the driver sits in ``ray.wait`` comes out of
    Ray's Cython as "SystemError: ... returned a result with an exception set": the exit is
    128 + the signal with its one line, not a traceback (seen under load: exit 1)."""
    from sweep import cli
    from sweep.stop import StopNow

    def in_ray_wait(args):
        try:
            raise StopNow("stopped by a second SIGTERM; re-run the same command", 15)
        except StopNow as err:
            raise SystemError("<cyfunction CoreWorker.wait> returned a result") from err

    monkeypatch.setattr(cli, "cmd_status", in_ray_wait)
    assert cli.main(["status", "anywhere"]) == 143
    assert capsys.readouterr().err.strip() == (
        "interrupted: stopped by a second SIGTERM; re-run the same command"
    )
    monkeypatch.setattr(cli, "cmd_status", lambda args: (_ for _ in ()).throw(SystemError("x")))
    with pytest.raises(SystemError):
        cli.main(["status", "anywhere"])


WORKER_WARNS = """
import logging, threading
from sweep.launcher import _warnings_kept
late, go = logging.getLogger("sweep.logger"), threading.Event()
old = threading.Thread(
    target=lambda: go.wait() and late.warning("wandb init failed (r4)"), name="sweep-wandb"
)
old.start()  # (a previous task's abandoned wandb sender, late)
with _warnings_kept() as lines:
    logging.getLogger("sweep.restore").warning("checkpoint %s fails its checksum", 7)
    logging.getLogger("sweep.restore").warning("a bad call %s %s", 1)  # never stops training
    logging.getLogger("sweep.restore").info("not a warning")
    mine = threading.Thread(target=lambda: late.warning("wandb: this task's sender"), name="sweep-wandb")
    mine.start(), mine.join()
    go.set(), old.join()
print(lines)
"""


def test_a_workers_warnings_are_kept_and_still_reach_its_stderr():
    """A Ray worker sets up no logging: its warnings reach the terminal as stderr (logging's
    fallback, which Ray forwards), and keeping them for sweep.log must not silence that. A
    thread older than the task (an earlier task's abandoned wandb sender) is not this
    ensemble's: its late warnings reach stderr only."""
    done = subprocess.run(
        [sys.executable, "-c", WORKER_WARNS], capture_output=True, text=True, env=env()
    )
    assert done.returncode == 0, done.stderr
    kept = ["checkpoint 7 fails its checksum", "wandb: this task's sender"]
    assert done.stdout.strip() == repr(kept)  # (not an older thread's: another ensemble's)
    assert "checkpoint 7 fails its checksum" in done.stderr
    assert "wandb init failed (r4)" in done.stderr
    assert "not a warning" not in done.stderr


@pytest.mark.parametrize(
    "error", [RuntimeError("boom"), OutOfMemory("ran out", "device"), SweepError("disk full")]
)
def test_a_failing_worker_sends_its_warnings_with_its_error(error):
    """Ray pickles a task's error back to the driver: the warnings logged before it ride
    along (for sweep.log), whatever the error's kind."""
    import pickle

    from sweep.launcher import _warnings_with_error

    def train():
        raise error

    with pytest.raises(type(error)) as raised:
        _warnings_with_error(train, ["checkpoint 7 fails its checksum"])
    back = pickle.loads(pickle.dumps(raised.value))
    assert back.worker_warnings == ["checkpoint 7 fails its checksum"]
    assert str(back) == str(error) and getattr(back, "where", None) == getattr(error, "where", None)


def test_a_second_signal_inside_a_log_call_is_not_swallowed(monkeypatch, capsys):
    """A signal landing while the main thread logs: logging's emit catches every Exception
    (and prints a traceback); the second signal's StopNow is a BaseException and gets out."""
    import logging

    from sweep import cli
    from sweep.stop import StopNow

    class Emit(logging.Handler):
        def emit(self, record):
            try:
                raise StopNow("stopped by a second SIGINT; re-run the same command", 2)
            except Exception:  # what logging.Handler implementations do
                self.handleError(record)

    def logs(args):
        lg = logging.getLogger("sweep.test-signal")
        lg.addHandler(Emit())
        lg.warning("checkpointing")

    monkeypatch.setattr(cli, "cmd_status", logs)
    assert cli.main(["status", "anywhere"]) == 130
    assert (
        capsys.readouterr()
        .err.strip()
        .endswith("stopped by a second SIGINT; re-run the same command")
    )


RAY_INIT_KEEPS_HANDLER = """
import os, signal, sys, threading
import ray
from sweep.config import LaunchConfig
from sweep.launcher import ray_session
got = []
signal.signal(signal.SIGTERM, lambda s, f: got.append(s))
timer = threading.Timer(float(sys.argv[2]), os.kill, (os.getpid(), signal.SIGTERM))
timer.start()  # lands while ray.init runs (a few seconds)
with ray_session(LaunchConfig(num_cpus=1, temp_dir=sys.argv[1])):
    timer.join()
print(f"handled {len(got)}")
"""


@pytest.mark.parametrize("delay", [0.1, 1.0])
def test_a_sigterm_during_ray_init_reaches_our_handler(tmp_path_factory, delay):
    """ray.init installs a SIGTERM handler of its own (sys.exit); one that reached it while
    the interpreter ran a finalizer was printed and ignored, and the sweep went on. Our
    handler stays in place through ray.init."""
    assert_handled(RAY_INIT_KEEPS_HANDLER, tmp_path_factory.getbasetemp() / f"rih{delay}", delay, 1)


RAY_INIT_LEAVES_SIGTERM_TO_PYTHON = """
import os, signal, sys, time
from sweep import launcher
from sweep.config import LaunchConfig
got = []
signal.signal(signal.SIGTERM, lambda s, f: got.append(s))
launcher._start_ray(LaunchConfig(num_cpus=1, temp_dir=sys.argv[1]))  # (no re-registering)
os.kill(os.getpid(), signal.SIGTERM)
time.sleep(float(sys.argv[2]))
print(f"handled {len(got)}")
"""


def test_ray_init_leaves_no_c_handler_to_abort_the_driver(tmp_path_factory):
    """The core worker's failure-signal handler (absl's, in C) took SIGTERM from Python: a
    SIGTERM while ray.init ran printed a stack dump and its alarm aborted the driver 3 s
    later (SIGABRT, seen in CI). After ray.init a SIGTERM is Python's alone."""
    assert_handled(RAY_INIT_LEAVES_SIGTERM_TO_PYTHON, tmp_path_factory.getbasetemp() / "rnc", 4, 1)


def assert_handled(script: str, temp: Path, delay: float, signals: int) -> None:
    """``script`` (a temp folder, a delay) ends normally, its handler having had ``signals``."""
    p = subprocess.run(
        [sys.executable, "-c", script, str(temp), str(delay)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 0 and p.stdout.strip().endswith(f"handled {signals}"), (
        p.returncode,
        p.stdout[-300:],
        p.stderr[-2000:],
    )


RAY_SHUTDOWN_KEEPS_HANDLER = """
import os, signal, sys, threading, time
from sweep.config import LaunchConfig
from sweep.launcher import ray_session
got = []
signal.signal(signal.SIGTERM, lambda s, f: got.append(s))
with ray_session(LaunchConfig(num_cpus=1, temp_dir=sys.argv[1])):
    timer = threading.Timer(float(sys.argv[2]), os.kill, (os.getpid(), signal.SIGTERM))
    timer.start()  # lands while ray.shutdown runs (it takes ~1 s)
timer.join()
os.kill(os.getpid(), signal.SIGTERM)  # and one after it
time.sleep(0.5)
print(f"handled {len(got)}")
"""


@pytest.mark.parametrize("delay", [0.1, 0.4])
def test_the_signal_handlers_survive_ray_shutdown(tmp_path_factory, delay):
    """Ray's core worker resets SIGTERM in C as it shuts down, while getsignal still names
    the Python handler: a SIGTERM during or after it killed the driver without its message
    (exit -15)."""
    assert_handled(
        RAY_SHUTDOWN_KEEPS_HANDLER, tmp_path_factory.getbasetemp() / f"rsh{delay}", delay, 2
    )


@pytest.mark.parametrize("stop", [False, True])
def test_a_stop_while_a_finished_command_exits_leaves_its_exit_code(tmp_path, stop):
    """(The interpreter's finalization gave SIGTERM its default action: a SLURM job whose sweep
    had finished exited 143, without a word.) Its threads are joined and its exit hooks run,
    as ``sys.exit`` does; a stop in a hook exits at once."""
    code = f"""
import atexit, os, signal, threading, time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from sweep.cli import _exit_done

ThreadPoolExecutor(1).submit(int).result()  # (its idle thread is woken to end, as at exit)

def late():
    time.sleep(0.3)
    Path({str(tmp_path / "thread")!r}).touch()

threading.Thread(target=late).start()
atexit.register(lambda: Path({str(tmp_path / "hook")!r}).touch())
if {stop}:
    atexit.register(lambda: (os.kill(os.getpid(), signal.SIGTERM), time.sleep(1)))
_exit_done(3)
"""
    done = subprocess.run([sys.executable, "-c", code], timeout=60)
    assert done.returncode == 3
    assert (tmp_path / "thread").exists()
    assert (tmp_path / "hook").exists() is not stop  # (hooks run last first)
