"""wandb logging: one wandb run per grid point (offline here), resume ids, and a backend that
hangs or raises never blocks or fails training."""

from __future__ import annotations

import io
import json
import logging
import sys
import threading
import time

import pytest

from sweep import logger as tracking
from sweep import rundir
from sweep.cli import compose
from sweep.config import ConfigError, LoggerConfig, to_sweep_config
from sweep.io import read_json
from sweep.worker import train_ensemble
from tests.conftest import refused
from tests.sweep_builder import jobs

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb-data"))


def wandb_cfg(**kw) -> LoggerConfig:
    return LoggerConfig(**{"name": "wandb", "mode": "offline", **kw})


def one_job(store, sweep_dir, logger):
    (job,) = jobs(store, sweep_dir, l1s=(1e-3, 1e-2), ratios=(1.0,), seeds=1, logger=logger)
    return job


def flushed_runs(sweep_dir, done, timeout: float = 60) -> dict[str, bytes]:
    """Offline runs once ``done(runs)`` holds: wandb's own service process writes the files
    asynchronously (slow on a loaded machine)."""
    deadline = time.time() + timeout
    while True:
        runs = offline_runs(sweep_dir)
        if done(runs) or time.time() > deadline:
            return runs
        time.sleep(0.5)


def offline_runs(sweep_dir) -> dict[str, bytes]:
    """run_id -> bytes of its offline ``.wandb`` file (records are protobuf; keys appear verbatim)."""
    out = {}
    for d in (sweep_dir / "wandb").glob("offline-run-*"):
        (f,) = d.glob("*.wandb")
        out[d.name] = f.read_bytes()
    return out


def test_logger_config_group():
    cfg = to_sweep_config(compose(["sweep_dir=/tmp/x", "logger=wandb", "logger.mode=offline"]))
    assert cfg.logger.name == "wandb" and cfg.logger.mode == "offline"
    assert to_sweep_config(compose(["sweep_dir=/tmp/x"])).logger.name == "none"
    with pytest.raises(ConfigError, match="logger.mode"):
        to_sweep_config(compose(["sweep_dir=/tmp/x", "logger=wandb", "logger.mode=sometimes"]))


def test_the_runs_group_is_the_sweep_folders_name_unless_logger_group_is_set(tmp_path, monkeypatch):
    import wandb

    groups: list = []
    monkeypatch.setattr(wandb, "init", lambda **k: groups.append(k["group"]) or SlowRun([], 0))
    for cfg in (wandb_cfg(), wandb_cfg(group="layer3-lr")):
        lg = tracking.WandbLogger(cfg, tmp_path / "layer3")
        declared(lg, tmp_path / "layer3", str(cfg.group))
        lg.log({str(cfg.group): {"step": 1}})
        assert lg.close() is True
    assert groups == ["layer3", "layer3-lr"]
    cfg = to_sweep_config(compose(["sweep_dir=/tmp/x", "logger=wandb", "logger.group=g"]))
    assert cfg.logger.group == "g"


def test_mode_is_offline_without_api_key(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.setenv("NETRC", str(tmp_path / "none"))
    assert tracking.resolve_mode("auto") == "offline"
    netrc = tmp_path / "mine"  # (wandb reads NETRC's file: so does sweep)
    netrc.write_text(f"machine api.wandb.ai\n  login user\n  password {'k' * 40}\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    assert tracking.resolve_mode("auto") == "online"
    monkeypatch.setenv("NETRC", str(tmp_path / "none"))
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert tracking.resolve_mode("auto") == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert tracking.resolve_mode("auto") == "disabled"
    assert tracking.resolve_mode("offline") == "offline"


def test_each_grid_point_is_its_own_wandb_run(tiny_store, tmp_path):
    job = one_job(tiny_store, tmp_path, wandb_cfg())
    res = train_ensemble(job)
    assert set(res.states.values()) == {"done"}
    # the wandb dir lives inside the sweep folder
    runs = flushed_runs(
        tmp_path, lambda r: len(r) == 2 and all(b"gt_mmcs" in v for v in r.values())
    )
    assert len(runs) == 2
    for m in job.ensemble.members:
        wid = read_json(rundir.run_dir(tmp_path, m.run_id) / rundir.TRACKER)["wandb_id"]
        (data,) = [v for k, v in runs.items() if k.endswith(wid)]
        for key in (
            b"train/fvu",
            b"train/l0",
            b"train/step",
            b"dict_ratio",
            b"ensemble_id",
            b"r1-e0",
            b"gt_mmcs",
            b"dead_fraction",
        ):
            assert key in data, key
        assert m.run_id.encode() in data
    # a resumed sweep continues the same wandb runs
    d = rundir.run_dir(tmp_path, job.ensemble.members[0].run_id)
    assert tracking.run_wandb_id(d, "ignored") == read_json(d / rundir.TRACKER)["wandb_id"]


def test_logger_comes_from_sweep_config_when_job_has_none(tiny_store, tmp_path):
    (tmp_path / "config.yaml").write_text(
        "logger:\n  name: wandb\n  mode: offline\n  project: p\n  entity: null\n  timeout: 10\n  queue_size: 50\n"
    )
    assert tracking.sweep_logger_config(tmp_path) == LoggerConfig(
        "wandb", "p", None, "offline", 10.0, 50
    )
    train_ensemble(one_job(tiny_store, tmp_path, None))
    assert len(offline_runs(tmp_path)) == 2


def test_hanging_backend_never_blocks_training(tiny_store, tmp_path, monkeypatch, caplog):
    import wandb

    release = threading.Event()
    entered = threading.Event()

    def hang(*args, **kwargs):
        entered.set()
        release.wait(60)
        raise RuntimeError("gave up")

    monkeypatch.setattr(wandb, "init", hang)
    job = one_job(tiny_store, tmp_path, wandb_cfg(timeout=0.5, queue_size=2))
    t0 = time.perf_counter()
    with caplog.at_level(logging.WARNING, logger="sweep.logger"):
        res = train_ensemble(job)
    took = time.perf_counter() - t0
    release.set()
    for t in threading.enumerate():  # its sender gives up now: not in a later test's output
        if t.name == tracking.WANDB_THREAD:
            t.join(10)
    assert entered.is_set() and set(res.states.values()) == {"done"}
    assert took < 10, f"training waited {took:.1f}s for a hung wandb"
    text = caplog.text
    assert "dropping log events" in text and "did not finish in time" in text
    for m in job.ensemble.members:
        assert rundir.RunFolder(rundir.run_dir(tmp_path, m.run_id)).is_done()


def test_raising_backend_never_fails_training(tiny_store, tmp_path, monkeypatch, caplog):
    import wandb

    calls = []

    def boom(*args, **kwargs):
        if str(kwargs.get("dir", "")).startswith(
            str(tmp_path)
        ):  # not a sender left by another test
            calls.append(kwargs.get("name"))
        raise ConnectionError("wandb is down")

    monkeypatch.setattr(wandb, "init", boom)
    with caplog.at_level(logging.WARNING, logger="sweep.logger"):
        res = train_ensemble(one_job(tiny_store, tmp_path, wandb_cfg(timeout=5)))
    assert set(res.states.values()) == {"done"}
    assert sorted(calls) == ["r1-l1_1e-02-s0", "r1-l1_1e-03-s0"]  # one quick try per run
    assert "wandb init failed (ConnectionError: wandb is down); ignoring" in caplog.text


def test_an_init_that_times_out_is_not_tried_again_for_the_other_runs(tmp_path, monkeypatch):
    """Online mode without a network: each init would wait out logger.timeout in turn."""
    calls = unreachable_wandb(monkeypatch)
    lg = tracking.WandbLogger(wandb_cfg(timeout=0.3), tmp_path)
    declared(lg, tmp_path, "a", "b", "c")
    lg.log({r: {"step": 1} for r in "abc"})
    lg.close()
    lg._thread.join(10)
    assert not lg._thread.is_alive() and calls == ["a"]


def unreachable_wandb(monkeypatch) -> list[str]:
    """wandb.init waits out a 0.3 s timeout and fails, as online without a network; returns
    the names of the runs it was asked for."""
    import wandb

    calls: list[str] = []

    def timed_out(**kwargs):
        calls.append(kwargs["name"])
        time.sleep(0.3)
        raise TimeoutError("wandb.init timed out")

    monkeypatch.setattr(wandb, "init", timed_out)
    return calls


def test_the_sweeps_next_loggers_do_not_wait_for_a_wandb_found_unreachable(
    tmp_path, monkeypatch, caplog
):
    """Each ensemble has its own logger: once one waited out logger.timeout, the sweep's
    others (other processes too) skip wandb for DOWN_FOR s instead of each waiting again."""
    calls = unreachable_wandb(monkeypatch)
    for run_id in ("a", "b"):  # two ensembles, one after the other
        lg = tracking.WandbLogger(wandb_cfg(timeout=0.3), tmp_path)
        declared(lg, tmp_path, run_id)
        with caplog.at_level(logging.WARNING, logger="sweep.logger"):
            lg.log({run_id: {"step": 1}})
            lg.close()
        lg._thread.join(10)
    assert calls == ["a"] and "wandb was unreachable" in caplog.text
    (tmp_path / "wandb" / tracking.DOWN_FILE).write_text(f"{time.time() - tracking.DOWN_FOR}\n")
    lg = tracking.WandbLogger(wandb_cfg(timeout=0.3), tmp_path)  # long enough ago: tried again
    declared(lg, tmp_path, "c")
    lg.log({"c": {"step": 1}})
    lg.close()
    lg._thread.join(10)
    assert calls == ["a", "c"]


def test_an_init_that_hangs_past_close_is_taken_for_an_unreachable_wandb(tmp_path, monkeypatch):
    """A ``wandb.init`` that hangs past its own timeout: the ensemble's close gives up on it,
    and the sweep's next loggers skip wandb instead of each waiting out its close. One that
    is only slow, cut short by a failed ensemble's shorter close, says nothing of wandb."""
    import wandb

    hang = threading.Event()
    monkeypatch.setattr(wandb, "init", lambda **k: hang.wait(60))
    slow = tracking.WandbLogger(wandb_cfg(timeout=5), tmp_path / "slow")
    declared(slow, tmp_path / "slow", "a")
    slow.log({"a": {"step": 1}})
    assert slow.close(timeout=0.3) is False
    assert not (tmp_path / "slow" / "wandb" / tracking.DOWN_FILE).exists()
    lg = tracking.WandbLogger(wandb_cfg(timeout=0.3), tmp_path)
    declared(lg, tmp_path, "a")
    lg.log({"a": {"step": 1}})
    assert lg.close() is False
    assert (tmp_path / "wandb" / tracking.DOWN_FILE).is_file()
    hang.set()
    for done in (slow, lg):  # (their threads end here, not after this test: they log)
        done._thread.join(10)
    assert tracking.WandbLogger(wandb_cfg(timeout=0.3), tmp_path)._sender.down


def test_offline_wandb_writes_its_file_every_second():
    """(Its default, 15 s, left a killed worker's wandb run without its last 15 s of points.)"""
    assert tracking._settings(30).x_transaction_log_flush_interval == tracking.FLUSH_SECONDS == 1


def test_a_run_that_could_not_be_declared_is_skipped_alone(tmp_path, monkeypatch):
    """Its folder could not hold logger.json: its events are ignored, the others logged."""
    import wandb

    record: list = []
    monkeypatch.setattr(wandb, "init", lambda **k: SlowRun(record, 0.0))
    lg = tracking.WandbLogger(wandb_cfg(timeout=5), tmp_path)
    declared(lg, tmp_path, "a")
    lg.log({"a": {"step": 1}, "undeclared": {"step": 1}})
    lg.summary("undeclared", {"fvu": 0.3})
    lg.summary("a", {"fvu": 0.1})
    assert lg.close() is True
    assert ("summary", {"fvu": 0.1}) in record and ("summary", {"fvu": 0.3}) not in record


def test_log_call_that_raises_is_ignored(tmp_path, monkeypatch, caplog):
    """A failing ``run.log`` is logged once and skipped: the sender goes on (the summary and
    the finish after it still reach wandb)."""
    lg = tracking.WandbLogger(wandb_cfg(timeout=10), tmp_path)
    folder = tmp_path / "runs" / "a"
    folder.mkdir(parents=True)
    lg.start("a", folder, {"l1": 1.0})
    finished = []

    class Broken:
        def __init__(self):
            self.summary = {}

        def define_metric(self, *a, **k):
            pass

        def log(self, *a, **k):
            raise ValueError("bad value")

        def finish(self):
            finished.append(dict(self.summary))

    import wandb

    monkeypatch.setattr(wandb, "init", lambda **k: Broken())
    lg.log({"a": {"step": 1, "fvu": 0.5}})
    lg.log({"a": {"step": 2, "fvu": 0.4}})
    lg.summary("a", {"fvu": 0.4})
    assert lg.close() is True
    assert finished == [{"fvu": 0.4}]
    failed = [r for r in caplog.records if "bad value" in r.getMessage()]
    assert len(failed) == 1 and "ignoring" in failed[0].getMessage()


def test_none_logger_is_a_no_op(tmp_path):
    lg = tracking.make_logger(LoggerConfig(), tmp_path)
    assert type(lg) is tracking.RunLogger
    lg.start("a", tmp_path, {})
    lg.log({"a": {"step": 1}})
    assert lg.close() is True and not (tmp_path / "wandb").exists()


def test_report_plots_go_to_a_wandb_report_run(tiny_store, tmp_path):
    from sweep.report import build_report

    train_ensemble(one_job(tiny_store, tmp_path, wandb_cfg()))
    (tmp_path / "config.yaml").write_text("logger:\n  name: wandb\n  mode: offline\n")
    build_report(tmp_path)

    def report_flushed(runs: dict[str, bytes]) -> bool:
        return any(b"report/mmcs_heatmap" in v for k, v in runs.items() if "-report-" in k)

    report_runs = {
        k: v for k, v in flushed_runs(tmp_path, report_flushed).items() if "-report-" in k
    }
    assert len(report_runs) == 1
    (data,) = report_runs.values()
    assert b"report/frontier" in data and b"report/mmcs_heatmap" in data
    (run_dir,) = [d for d in (tmp_path / "wandb").glob("offline-run-*-report-*")]
    assert list(run_dir.glob("files/media/images/report/frontier*.png"))
    (table,) = run_dir.glob("files/media/table/**/*.table.json")
    t = json.loads(table.read_text())
    fvu = [row[t["columns"].index("fvu")] for row in t["data"]]
    assert fvu and all(isinstance(v, float) for v in fvu)  # numbers: sortable in wandb


def test_a_read_only_sweep_reported_elsewhere_sends_nothing_to_wandb(
    tiny_store, tmp_path, monkeypatch, caplog
):
    """Its report run would be kept in the sweep folder: wandb would write it in /tmp."""
    from sweep import report

    train_ensemble(one_job(tiny_store, tmp_path, wandb_cfg()))
    (tmp_path / "config.yaml").write_text("logger:\n  name: wandb\n  mode: offline\n")
    before = sorted(p.name for p in (tmp_path / "wandb").iterdir())
    monkeypatch.setattr(report.os, "access", lambda path, mode: False)  # a read-only sweep
    monkeypatch.setattr("sweep.logger.log_report", lambda *a: pytest.fail("sent to wandb"))
    report.build_report(tmp_path, out=tmp_path / "elsewhere")
    assert sorted(p.name for p in (tmp_path / "wandb").iterdir()) == before
    assert "keep their values and no report is sent to wandb" in caplog.text
    assert (tmp_path / "elsewhere" / "index.html").is_file()


class SlowRun:
    """A wandb run whose log takes ``delay`` seconds and whose finish may hang."""

    def __init__(self, record: list, delay: float, hang: threading.Event | None = None):
        self.record, self.delay, self.hang = record, delay, hang
        self.summary = self

    def update(self, metrics):
        self.record.append(("summary", dict(metrics)))

    def define_metric(self, *a, **k):
        pass

    def log(self, data):
        time.sleep(self.delay)
        self.record.append(("log", data))

    def mark_preempting(self):
        self.record.append(("preempting",))

    def finish(self, exit_code=0):
        if self.hang is not None:
            self.hang.wait(60)
        self.record.append(("finish", exit_code))


def declared(lg, tmp_path, *run_ids):
    for rid in run_ids:
        folder = tmp_path / "runs" / rid
        folder.mkdir(parents=True)
        lg.start(rid, folder, {"l1": 1.0})


def test_online_without_an_api_key_logs_offline_and_says_so(tmp_path, monkeypatch, caplog):
    """``logger.mode=online`` where wandb finds no API key: every run was dropped (an init
    failure per run, exit 0, nothing logged); now they are logged offline, said once per
    driver (its other ensembles' loggers stay quiet; the sweep's next run says it again)."""
    from sweep.lock import SweepLock

    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.setenv("NETRC", str(tmp_path / "none"))

    def ensemble(*run_ids: str) -> list[str]:
        caplog.clear()
        lg = tracking.WandbLogger(wandb_cfg(mode="online", timeout=20), tmp_path)
        declared(lg, tmp_path, *run_ids)
        with caplog.at_level(logging.WARNING, logger="sweep.logger"):
            for rid in run_ids:
                lg.log({rid: {"step": 1, "loss": 0.5}})
                lg.summary(rid, {"fvu": 0.1})
            assert lg.close() is True
        return [r.getMessage() for r in caplog.records if r.name == "sweep.logger"]

    with SweepLock(tmp_path):
        said = ensemble("a", "b")
        assert len(said) == 1 and said[0].startswith("wandb has no API key: logging offline")
        assert ensemble("c") == []  # the same driver's next ensemble
    assert len(flushed_runs(tmp_path, lambda runs: len(runs) == 3)) == 3
    with SweepLock(tmp_path):  # the sweep run again
        assert len(ensemble("d")) == 1


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_online_without_credentials_never_asks_wandb_to_log_in(tmp_path, monkeypatch):
    """(At a terminal, wandb.init(mode="online") prompts for a key on stdin: `sweep report`
    waited 30 s on it, then aborted at exit, 134.)"""
    import wandb

    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.setenv("NETRC", str(tmp_path / "none"))
    monkeypatch.setattr(sys, "stdin", Terminal())  # (pytest's stdin is none)
    modes, real = [], wandb.init

    def init(**kw):
        modes.append(kw["mode"])
        return real(**kw)

    monkeypatch.setattr(wandb, "init", init)
    lg = tracking.WandbLogger(wandb_cfg(mode="online", timeout=20), tmp_path)
    declared(lg, tmp_path, "a")
    lg.summary("a", {"fvu": 0.1})
    assert lg.close() is True
    assert modes == ["offline"]


def test_steps_redone_after_a_resume_are_not_logged_twice(tmp_path, monkeypatch):
    """A worker retried from an older checkpoint redoes steps it logged: wandb gets each step
    once, the first time (an exact resume redoes them bit for bit). A re-run sweep whose wandb
    run already holds steps (its summary's ``train/step``, online) skips those too."""
    import wandb

    record: list = []

    def init(**kw):
        run = SlowRun(record, 0.0)
        run.get = lambda key, default=None: 3 if kw["name"] == "b" else default
        return run

    monkeypatch.setattr(wandb, "init", init)
    lg = tracking.WandbLogger(wandb_cfg(timeout=5), tmp_path)
    declared(lg, tmp_path, "a", "b")
    for step in (1, 2, 3, 2, 3, 4):
        lg.log({"a": {"step": step}, "b": {"step": step}})
    assert lg.close() is True
    logged = [entry[1]["train/step"] for entry in record if entry[0] == "log"]
    assert logged == [1, 2, 3, 4, 4]  # a: each once; b: only past its resumed 3


def logged_steps(record: list) -> list[int]:
    return [entry[1]["train/step"] for entry in record if entry[0] == "log"]


def test_a_segment_that_finished_says_what_it_logged_to_the_next_one(tmp_path, monkeypatch):
    """Offline, wandb cannot say what a run holds: an ensemble that failed (or ran out of
    memory and goes on as halves, in new workers) records its last step logged, and the next
    segment skips the steps it redoes up to there."""
    import wandb

    record: list = []
    monkeypatch.setattr(wandb, "init", lambda **k: SlowRun(record, 0.0))
    first = tracking.WandbLogger(wandb_cfg(timeout=5), tmp_path)
    declared(first, tmp_path, "a")
    for step in (1, 2, 3, 4):
        first.log({"a": {"step": step}})
    folder = rundir.RunFolder(tmp_path / "runs" / "a")
    wid = folder.tracker_id()
    monkeypatch.setattr(rundir, "read_json", refused(rundir.read_json, folder.path / "logger.json"))
    assert first.close() is True  # (failed: exit 1; logger.json could not be read meanwhile)
    monkeypatch.setattr(rundir, "read_json", read_json)
    assert folder.tracker_step() == 4 and folder.tracker_id() == wid  # (its id kept)
    record.clear()
    second = tracking.WandbLogger(wandb_cfg(timeout=5), tmp_path)
    second.start("a", folder.path, {"l1": 1.0})
    for step in (3, 4, 5):  # resumed from the checkpoint at 2
        second.log({"a": {"step": step}})
    assert second.close() is True
    assert logged_steps(record) == [5]


def test_final_metrics_are_never_dropped_for_curve_points(tmp_path, monkeypatch):
    import wandb

    record: list = []
    monkeypatch.setattr(wandb, "init", lambda **k: SlowRun(record, 0.02))
    lg = tracking.WandbLogger(wandb_cfg(timeout=10, queue_size=3), tmp_path)
    declared(lg, tmp_path, "a", "b")
    for step in range(40):  # far more than the queue holds: most are dropped
        lg.log({"a": {"step": step}, "b": {"step": step}})
    lg.summary("a", {"fvu": 0.1})
    lg.summary("b", {"fvu": 0.2})
    assert lg.close() is True and lg.dropped > 20
    assert [e for e in record if e[0] == "summary"] == [
        ("summary", {"fvu": 0.1}),
        ("summary", {"fvu": 0.2}),
    ]


def test_queue_size_counts_waiting_curve_events_only(tmp_path, monkeypatch):
    """Run declarations waiting behind a slow wandb do not take the curve's places: with
    ``logger.queue_size=1`` the first curve point of runs declared meanwhile is kept."""
    import wandb

    gate, busy, record = threading.Event(), threading.Event(), []

    def init(**kw):
        if kw["name"] == "x":
            busy.set()
            gate.wait(30)  # wandb busy starting another run
        return SlowRun(record, 0.0)

    monkeypatch.setattr(wandb, "init", init)
    lg = tracking.WandbLogger(wandb_cfg(timeout=5, queue_size=1), tmp_path)
    declared(lg, tmp_path, "x")
    lg.log({"x": {"step": 0}})
    assert busy.wait(10)  # the sender is inside x's init now
    declared(lg, tmp_path, "a", "b")
    lg.log({"a": {"step": 1}, "b": {"step": 1}})
    gate.set()
    assert lg.close() is True and lg.dropped == 0
    assert [e[1]["train/step"] for e in record if e[0] == "log"] == [0, 1, 1]


def test_runs_left_unfinished_end_preempted_after_a_stop_else_failed(tmp_path, monkeypatch):
    """wandb's states: a run with final metrics ``finished`` (exit 0); one a stop left
    unfinished ``preempted`` (marked preempting, exit 1: the sweep resumes it); one a failure
    left unfinished ``failed`` (exit 1)."""
    import wandb

    record: list = []
    monkeypatch.setattr(wandb, "init", lambda **k: SlowRun(record, 0.0))
    for stopped, ends in ((True, [("preempting",), ("finish", 1)]), (False, [("finish", 1)])):
        record.clear()
        lg = tracking.WandbLogger(wandb_cfg(timeout=5), tmp_path / str(stopped))
        declared(lg, tmp_path / str(stopped), "a", "b")
        lg.log({"a": {"step": 1}, "b": {"step": 1}})
        lg.summary("a", {"fvu": 0.1})
        assert lg.close(stopped=stopped) is True
        assert [e for e in record if e[0] != "log"] == [
            ("summary", {"fvu": 0.1}), ("finish", 0), *ends
        ]  # fmt: skip


def test_close_waits_a_bounded_time_for_a_slow_wandb(tmp_path, monkeypatch):
    """Events that keep completing (slowly) and a finish that hangs: close gives up after
    CLOSE_TIMEOUTS x logger.timeout in all (it waited as long as events kept completing)."""
    import wandb

    hang = threading.Event()
    monkeypatch.setattr(wandb, "init", lambda **k: SlowRun([], 0.1, hang))
    lg = tracking.WandbLogger(wandb_cfg(timeout=0.5, queue_size=1000), tmp_path)
    declared(lg, tmp_path, "a")
    for step in range(200):  # 20 s of work at 0.1 s each
        lg.log({"a": {"step": step}})
    t0 = time.perf_counter()
    assert lg.close() is False
    took = time.perf_counter() - t0
    hang.set()
    assert took < tracking.CLOSE_TIMEOUTS * 0.5 + 1.5, took


def test_a_wandb_that_cannot_be_imported_means_no_logging(tmp_path, monkeypatch, caplog):
    """A broken install raises other errors than ImportError (protobuf: TypeError)."""
    import builtins
    import sys

    real = builtins.__import__

    def broken(name, *args, **kwargs):
        if name == "wandb":
            raise TypeError("Descriptors cannot be created directly")
        return real(name, *args, **kwargs)

    monkeypatch.delitem(sys.modules, "wandb", raising=False)
    monkeypatch.setattr(builtins, "__import__", broken)
    with caplog.at_level(logging.WARNING, logger="sweep.logger"):
        lg = tracking.make_logger(wandb_cfg(), tmp_path)
    assert type(lg) is tracking.RunLogger
    assert "wandb cannot be imported (TypeError: Descriptors" in caplog.text


def test_a_wandb_login_on_either_default_host_is_an_api_key(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_BASE_URL", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert not tracking._has_api_key()
    for host in tracking.DEFAULT_HOSTS:
        (tmp_path / ".netrc").write_text(f"machine {host}\n  login user\n  password {'x' * 40}\n")
        (tmp_path / ".netrc").chmod(0o600)
        assert tracking._has_api_key(), host
