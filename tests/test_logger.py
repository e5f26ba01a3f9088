"""wandb logging: one wandb run per grid point (offline here), resume ids, and a backend that
hangs or raises never blocks or fails training."""

from __future__ import annotations

import logging
import threading
import time

import pytest

from sweep import logger as tracking
from sweep import rundir
from sweep.cli import compose
from sweep.config import ConfigError, LoggerConfig, to_sweep_config
from sweep.io import read_json
from sweep.worker import train_ensemble
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


def test_mode_is_offline_without_api_key(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.setenv("NETRC", str(tmp_path / "none"))
    assert tracking.resolve_mode("auto") == "offline"
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
        wid = read_json(rundir.run_dir(tmp_path, m.run_id) / tracking.ID_FILE)["wandb_id"]
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
    assert tracking.run_wandb_id(d, "ignored") == read_json(d / tracking.ID_FILE)["wandb_id"]


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
    assert entered.is_set() and set(res.states.values()) == {"done"}
    assert took < 10, f"training waited {took:.1f}s for a hung wandb"
    text = caplog.text
    assert "dropping log events" in text and "no progress" in text
    for m in job.ensemble.members:
        assert rundir.is_done(rundir.run_dir(tmp_path, m.run_id))


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
    assert sorted(calls) == [
        "r1-l1_1e-02-s0",
        "r1-l1_1e-03-s0",
    ]  # one try per run, then it is left alone
    assert "wandb init failed (ConnectionError: wandb is down); ignoring" in caplog.text


def test_log_call_that_raises_is_ignored(tmp_path, monkeypatch):
    lg = tracking.WandbLogger(wandb_cfg(timeout=10), tmp_path)
    folder = tmp_path / "runs" / "a"
    folder.mkdir(parents=True)
    lg.start("a", folder, {"l1": 1.0})

    class Broken:
        def __init__(self):
            self.summary = {}

        def define_metric(self, *a, **k):
            pass

        def log(self, *a, **k):
            raise ValueError("bad value")

        def finish(self):
            pass

    import wandb

    monkeypatch.setattr(wandb, "init", lambda **k: Broken())
    lg.log({"a": {"step": 1, "fvu": 0.5}})
    lg.log({"a": {"step": 2, "fvu": 0.4}})
    lg.summary("a", {"fvu": 0.4})
    assert lg.close() is True


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
