"""Experiment tracking (wandb), best-effort: it never blocks or fails training.

Each grid point is its own wandb run (config: l1, dict_ratio, seed, ensemble id, ...; group:
``logger.group``, by default the sweep folder's name; job type ``train``), so wandb's grouping
and parallel-coordinates plots work across the grid. The worker hands over one batch of curve
records per logging step (already on the host: one device sync for all members) and the final
metrics per member.

All wandb calls happen on one background thread fed by a queue. The training thread never
waits on it: when ``logger.queue_size`` curve events are waiting (wandb slow or hung), new
curve events are dropped and counted (a run's declaration, final metrics and finish are
always queued); errors in wandb are logged once per kind and ignored. A run whose
``wandb.init`` fails is not logged; once one fails after its whole ``logger.timeout`` (no
network in online mode), the logger stops calling wandb, so an ensemble pays that wait
once, not once per member, and says so in ``SWEEP_DIR/wandb/unreachable``: the sweep's
other ensembles (and its report) do not try wandb for 15 minutes after.
:meth:`WandbLogger.close` waits while wandb keeps handling events, at most
``CLOSE_TIMEOUTS`` x ``logger.timeout`` in all. wandb writes its runs under ``SWEEP_DIR/wandb``
(its own debug logs and caches go where wandb keeps them, ``~/.cache/wandb``); without an
API key it runs offline (``wandb sync SWEEP_DIR/wandb/offline-run-*`` uploads later). Each
run's wandb id is kept in its run folder (``logger.json``), so a resumed sweep continues the
same wandb runs: steps a resumed run redoes are skipped up to the newest one its wandb run
holds (online, its summary; offline, where wandb can tell nothing, the step ``logger.json``
records as held by a segment that finished). Offline, wandb writes its file every second (not
its default 15 s), so a killed worker's wandb run lacks at most its last second of points.
"""

from __future__ import annotations

import contextlib
import json
import logging
import netrc
import os
import queue
import re
import secrets
import sys
import threading
import time
import weakref
from pathlib import Path
from typing import Any

from sweep import rundir, sweepdir
from sweep.config import LoggerConfig
from sweep.lock import read_lock

log = logging.getLogger(__name__)

DOWN_FILE = "unreachable"
"""In ``SWEEP_DIR/wandb``: when a logger last found wandb unreachable (seconds since the epoch)."""
DOWN_FOR = 900.0
"""For this long after, the sweep's other loggers do not try wandb (each would wait its
whole ``logger.timeout`` for nothing)."""
NO_KEY_FILE = "no-api-key"
"""In ``SWEEP_DIR/wandb``: the sweep lock of the driver whose first logger fell back to offline
for want of an API key; its other ensembles' loggers then say so in a debug line, not a
warning each."""
STOPPED, FAILED = "preempted", "failed"
"""How :meth:`WandbLogger.close` ends the runs it finds unfinished (no final metrics): a stop
(``close(stopped=True)``) marks them preempting and exits 1, so wandb shows them
``preempted``; otherwise (a failed ensemble) they exit 1: ``failed``. Either is the same
wandb run again when the sweep resumes."""


class RunLogger:
    """Interface (and the ``logger=none`` implementation): every method is a cheap no-op."""

    def start(self, run_id: str, folder: Path, config: dict, job_type: str = "train") -> None:
        """Declare a run (its wandb run is created lazily, on the sender thread)."""

    def log(self, records: dict[str, dict]) -> None:
        """One logging step: run_id -> curve record (with ``step``)."""

    def summary(self, run_id: str, metrics: dict) -> None:
        """Final metrics of a run; the run is finished after them."""

    def media(self, run_id: str, images: dict[str, str]) -> None:
        """Images (name -> PNG path) for a run."""

    def finish(self, run_id: str) -> None:
        """Finish a run now (:meth:`summary` does this too; :meth:`close` finishes the rest)."""

    def close(self, timeout: float | None = None, stopped: bool = False) -> bool:
        """Flush and finish (runs without final metrics as ``stopped`` or failed); returns
        False if the backend did not finish in time."""
        return True


def resolve_mode(mode: str) -> str:
    """``auto`` -> ``WANDB_MODE`` if set, else online with an API key, else offline."""
    if mode != "auto":
        return mode
    env = os.environ.get("WANDB_MODE")
    if env:
        return env
    return "online" if _has_api_key() else "offline"


def _has_api_key() -> bool:
    """Credentials wandb would find: a key or identity token in the environment, or a key
    for its host in the netrc file (``NETRC``'s, else ~/.netrc)."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    base = os.environ.get("WANDB_BASE_URL")
    hosts = [base] if base else list(DEFAULT_HOSTS)
    try:
        known = netrc.netrc(os.environ.get("NETRC") or None)
    except (OSError, netrc.NetrcParseError):
        return False
    return any(known.authenticators(re.sub(r"^https?://", "", h).split("/")[0]) for h in hosts)


def _no_credentials() -> bool:
    """Whether ``wandb.init`` would prompt for a key: it does at a terminal (``sweep
    report``'s driver, waiting on stdin) when no credentials are found; elsewhere it raises,
    and :meth:`_Sender.on_init` goes offline. (Asking wandb instead can reach its server.)"""
    return not _has_api_key() and sys.stdin is not None and sys.stdin.isatty()


DEFAULT_HOSTS = ("api.wandb.ai", "api.forge.coreweave.com")
"""Where ``wandb login`` stores a key (in ~/.netrc) without WANDB_BASE_URL (wandb >= 0.31
defaults to the second)."""


def run_wandb_id(folder: Path, run_id: str) -> str:
    """The run's wandb id: read from ``logger.json`` if present, else made and saved."""
    run = rundir.RunFolder(Path(folder))
    known = run.tracker_id()
    if known:
        return str(known)
    slug = re.sub(r"[^A-Za-z0-9_.-]", "_", run_id)[:48]
    wid = f"{slug}-{secrets.token_hex(4)}"
    run.save_tracker_id(wid)
    return wid


def _scalars(d: dict, prefix: str = "") -> dict[str, Any]:
    """Numbers and short strings only (wandb summaries), nested keys joined with '/'."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_scalars(v, f"{prefix}{k}/"))
        elif isinstance(v, (int, float, str, bool)) or v is None:
            out[f"{prefix}{k}"] = v
    return out


def _logged_step(run: Any) -> int:
    """The newest ``train/step`` a (resumed) wandb run already holds: its summary keeps the
    last value logged (online; -1 when unknown, e.g. offline)."""
    try:
        step = run.summary.get("train/step")
    except Exception:  # a summary wandb could not fetch: log everything
        return -1
    return int(step) if isinstance(step, (int, float)) else -1


FLUSH_SECONDS = 1.0
"""How often wandb writes an offline run's file (its default, 15 s, left a killed worker's
wandb run without its last 15 s of points; or all of them, in a first segment that short)."""


def _settings(timeout: float) -> Any:
    """wandb's settings for a run: bounded waits, nothing but the run's own data recorded."""
    import wandb

    kw = dict(
        init_timeout=timeout,
        finish_timeout=timeout,
        console="off",
        silent=True,
        x_disable_stats=True,
        x_save_requirements=False,
        disable_git=True,
        save_code=False,
    )
    try:
        return wandb.Settings(**kw, x_transaction_log_flush_interval=FLUSH_SECONDS)
    except Exception:  # a wandb before that setting
        return wandb.Settings(**kw)


class _Sender:
    """The background side: owns the wandb run objects; only this thread calls wandb."""

    def __init__(self, cfg: LoggerConfig, sweep_dir: Path, group: str) -> None:
        self.cfg, self.sweep_dir, self.group = cfg, sweep_dir, group
        self.declared: dict[str, tuple[str, dict, str]] = {}
        self.folders: dict[str, rundir.RunFolder] = {}
        self.runs: dict[str, Any] = {}
        self.broken: set[str] = set()
        self.warned: set[str] = set()
        self.down = self._found_down()
        """An init failed after its whole timeout: wandb is unreachable; no more calls to it
        (by this logger, nor by the sweep's next ones for :data:`DOWN_FOR` s)."""
        self.mode = resolve_mode(cfg.mode)
        """wandb's mode; ``online`` becomes ``offline`` once wandb finds no API key."""
        self.logged: dict[str, int] = {}
        """run_id -> the newest ``train/step`` its wandb run holds (steps redone after a
        resume from an older checkpoint are not logged twice)."""
        self.progress = time.monotonic()
        """When the last event was handled (close() waits while events keep completing)."""
        self.curves_handled = 0
        """Curve events taken off the queue (only this thread writes it)."""
        self.init_began: float | None = None
        """When the ``wandb.init`` under way began (None: none is)."""

    def handle(self, event: tuple) -> None:
        kind = event[0]
        began = time.monotonic()
        try:
            getattr(self, f"on_{kind}")(*event[1:])
        except Exception as err:  # wandb failures are never the training's problem
            run_id = event[1] if len(event) > 1 and isinstance(event[1], str) else ""
            self._warn(kind, f"wandb {kind} failed ({type(err).__name__}: {err}); ignoring")
            if kind == "init":
                self.broken.add(run_id)
                # one that took its whole timeout (no network): the others would too
                if time.monotonic() - began >= 0.9 * self.cfg.timeout:
                    self.down = True
                    self._warn("down", "wandb is unreachable; not trying this logger's other runs")
                    self.mark_down()
        self.progress = time.monotonic()

    @property
    def _down_file(self) -> Path:
        return self.sweep_dir / sweepdir.WANDB / DOWN_FILE

    def mark_down(self) -> None:
        """Tell the sweep's next loggers (its other ensembles, in any process) not to wait."""
        try:
            self._down_file.parent.mkdir(parents=True, exist_ok=True)
            self._down_file.write_text(f"{time.time()}\n")
        except OSError:
            pass

    def _found_down(self) -> bool:
        """Whether another logger of this sweep found wandb unreachable lately."""
        try:
            since = time.time() - float(self._down_file.read_text())
        except (OSError, ValueError):
            return False
        if not 0 <= since < DOWN_FOR:
            return False
        self._warn(
            "down",
            f"wandb was unreachable {since:.0f} s ago ({self._down_file}); not logging these "
            f"runs to it (tried again {DOWN_FOR / 60:.0f} min after)",
        )
        return True

    def _warn(self, key: str, message: str) -> None:
        if key not in self.warned:
            self.warned.add(key)
            log.warning(message)

    def on_declare(
        self, run_id: str, wid: str, config: dict, job_type: str, folder: Path | None = None
    ) -> None:
        self.declared[run_id] = (wid, config, job_type)
        if folder is not None:
            self.folders[run_id] = rundir.RunFolder(folder)

    def _run(self, run_id: str) -> Any:
        """The run's wandb run, made on first use; None for one not declared or not made."""
        if run_id in self.runs or run_id in self.broken or self.down:
            return self.runs.get(run_id)
        if run_id not in self.declared:  # its start() could not record a wandb id
            return None
        self.handle(("init", run_id))
        return self.runs.get(run_id)

    def on_init(self, run_id: str) -> None:
        import wandb

        self.sweep_dir.mkdir(parents=True, exist_ok=True)
        settings = _settings(self.cfg.timeout)
        if self.mode == "online" and _no_credentials():  # (never wandb's login prompt)
            self.mode = "offline"
            self._say_offline()
        try:
            run = self._init(run_id, settings)
        except wandb.errors.UsageError as err:
            if self.mode != "online" or "no api key" not in str(err).lower():
                raise
            self.mode = "offline"  # (nothing is lost: `wandb sync` uploads it later)
            self._say_offline()
            run = self._init(run_id, settings)
        run.define_metric("train/step")
        run.define_metric("train/*", step_metric="train/step")
        self.runs[run_id] = run
        self.logged.setdefault(run_id, max(_logged_step(run), self._recorded_step(run_id)))

    def _say_offline(self) -> None:
        """Warn once per driver (not once per ensemble) that wandb logs offline."""
        message = (
            f"wandb has no API key: logging offline; `wandb sync {self.sweep_dir / 'wandb'}"
            "/offline-run-*` uploads these runs (wandb >= 0.28.1: a resumed run's segments as one "
            "history); `wandb login` or WANDB_API_KEY for the next sweep"
        )
        held, marker = read_lock(self.sweep_dir), self.sweep_dir / sweepdir.WANDB / NO_KEY_FILE
        if held is not None:
            mark = json.dumps([held.get("host"), held.get("pid"), held.get("started")])
            with contextlib.suppress(OSError):
                if marker.read_text() == mark:
                    self.warned.add("offline")
                    log.debug(message)
                    return
            with contextlib.suppress(OSError):
                marker.parent.mkdir(parents=True, exist_ok=True)
                marker.write_text(mark)
        self._warn("offline", message)

    def _init(self, run_id: str, settings: Any) -> Any:
        self.init_began = time.monotonic()
        try:
            return self._wandb_init(run_id, settings)
        finally:
            self.init_began = None

    def _wandb_init(self, run_id: str, settings: Any) -> Any:
        import wandb

        wid, config, job_type = self.declared[run_id]
        return wandb.init(
            project=self.cfg.project,
            entity=self.cfg.entity,
            dir=str(self.sweep_dir),
            id=wid,
            name=run_id,
            group=self.group,
            job_type=job_type,
            config=config,
            resume="allow",
            reinit="create_new",
            mode=self.mode,
            settings=settings,
        )

    def on_log(self, records: dict[str, dict]) -> None:
        self.curves_handled += 1
        for run_id, rec in records.items():  # one member's failure does not skip the others
            self.handle(("log_one", run_id, rec))

    def on_log_one(self, run_id: str, rec: dict) -> None:
        run = self._run(run_id)
        step = rec.get("step", 0)
        if run is not None and step > self.logged.get(run_id, -1):
            run.log({f"train/{k}": v for k, v in rec.items()})
            self.logged[run_id] = step

    def on_summary(self, run_id: str, metrics: dict) -> None:
        run = self._run(run_id)
        if run is not None:
            run.summary.update(_scalars(metrics))
            self.handle(("finish", run_id))

    def on_media(self, run_id: str, images: dict[str, str]) -> None:
        import wandb

        run = self._run(run_id)
        if run is not None:
            run.log({f"report/{name}": wandb.Image(path) for name, path in images.items()})

    def on_table(self, run_id: str, name: str, columns: list[str], data: list[list]) -> None:
        import wandb

        run = self._run(run_id)
        if run is not None:
            run.log({name: wandb.Table(columns=columns, data=data)})

    def on_finish(self, run_id: str, unfinished: str = "") -> None:
        """``unfinished``: :data:`STOPPED` or :data:`FAILED` for a run without final metrics."""
        run = self.runs.pop(run_id, None)
        if run is None:
            return
        if unfinished == STOPPED:
            run.mark_preempting()
        if unfinished:
            run.finish(exit_code=1)
        else:
            run.finish()
        self._record_logged(run_id)

    def _record_logged(self, run_id: str) -> None:
        """After a segment finished (its steps written): the newest step it holds, for the next
        segment, offline, where wandb cannot say (:meth:`rundir.RunFolder.tracker_step`)."""
        folder, step = self.folders.get(run_id), self.logged.get(run_id, -1)
        if folder is not None and step > self._recorded_step(run_id):
            with contextlib.suppress(OSError):  # (then a resume logs some steps again)
                folder.save_tracker_id(self.declared[run_id][0], step)

    def _recorded_step(self, run_id: str) -> int:
        """The newest step the run folder records as held by its finished wandb segments (-1:
        none, or no run folder)."""
        folder = self.folders.get(run_id)
        return -1 if folder is None else folder.tracker_step()

    def finish_all(self, unfinished: str) -> None:
        for run_id in list(self.runs):
            self.handle(("finish", run_id, unfinished))


def _serve(q: queue.Queue, sender: _Sender) -> None:
    while True:
        event = q.get()
        if event[0] == "stop":
            sender.finish_all(event[1])
            return
        sender.handle(event)


def _request_stop(q: queue.Queue, unfinished: str = FAILED) -> None:
    """Enqueue the stop marker (the queue is unbounded: this never blocks)."""
    q.put_nowait(("stop", unfinished))


CLOSE_TIMEOUTS = 4
""":meth:`WandbLogger.close` waits at most this many ``logger.timeout`` in all."""
WANDB_THREAD = "sweep-wandb"
"""The name of each logger's sender thread."""


class WandbLogger(RunLogger):
    """wandb behind a bounded queue and one daemon thread (see the module docstring)."""

    def __init__(self, cfg: LoggerConfig, sweep_dir: str | Path, group: str | None = None) -> None:
        self.cfg = cfg
        self.sweep_dir = Path(sweep_dir)
        self.dropped = 0
        self._curves_put = 0
        self._q: queue.Queue = queue.Queue()  # bounded for curve events only (see _put)
        self._sender = sender = _Sender(
            cfg, self.sweep_dir, group or cfg.group or self.sweep_dir.absolute().name
        )
        self._thread = threading.Thread(
            target=_serve, args=(self._q, sender), name=WANDB_THREAD, daemon=True
        )
        self._thread.start()
        self._closed = False
        # a logger dropped without close() (e.g. an interrupted worker) still finishes its runs
        self._finalizer = weakref.finalize(self, _request_stop, self._q)

    def _put(self, event: tuple) -> None:
        """Queue ``event``; a curve event is dropped instead when wandb is that far behind."""
        if self._closed:
            return
        if event[0] == "log":
            if self._curves_put - self._sender.curves_handled >= self.cfg.queue_size:
                self.dropped += 1
                if self.dropped == 1:
                    log.warning("wandb is falling behind; dropping log events (training continues)")
                return
            self._curves_put += 1
        self._q.put_nowait(event)

    def start(self, run_id: str, folder: Path, config: dict, job_type: str = "train") -> None:
        try:
            wid = run_wandb_id(folder, run_id)
        except OSError as err:
            log.warning("cannot record the wandb id of %s (%s); not logging it", run_id, err)
            return
        self._put(("declare", run_id, wid, config, job_type, Path(folder)))

    def log(self, records: dict[str, dict]) -> None:
        if records:
            self._put(("log", records))

    def summary(self, run_id: str, metrics: dict) -> None:
        self._put(("summary", run_id, dict(metrics)))

    def media(self, run_id: str, images: dict[str, str]) -> None:
        self._put(("media", run_id, dict(images)))

    def table(self, run_id: str, name: str, columns: list[str], data: list[list]) -> None:
        self._put(("table", run_id, name, columns, data))

    def finish(self, run_id: str) -> None:
        self._put(("finish", run_id))

    def close(self, timeout: float | None = None, stopped: bool = False) -> bool:
        if self._closed:
            return not self._thread.is_alive()
        self._closed = True
        self._finalizer.detach()
        self._sender.progress = time.monotonic()
        _request_stop(self._q, STOPPED if stopped else FAILED)
        limit = self.cfg.timeout if timeout is None else timeout
        deadline = time.monotonic() + CLOSE_TIMEOUTS * limit
        while self._thread.is_alive() and time.monotonic() < deadline:
            # wait while events complete; give up after `limit` without progress
            self._thread.join(min(1.0, limit))
            if time.monotonic() - self._sender.progress > limit:
                break
        if self._thread.is_alive():
            log.warning(
                "wandb did not finish in time; continuing without it (its runs may lack their "
                "last points or final metrics there; the run folders have everything)"
            )
            began = self._sender.init_began  # (one hung past wandb's own timeout: the
            if began is not None and time.monotonic() - began >= 0.9 * self.cfg.timeout:
                self._sender.mark_down()  # next ensembles' would hang too)
            return False
        if self.dropped:
            log.warning("wandb: %d log events were dropped because it fell behind", self.dropped)
        return True


def make_logger(cfg: LoggerConfig | None, sweep_dir: str | Path) -> RunLogger:
    """The configured logger; any problem building it means no logging, never an error."""
    if cfg is None or cfg.name == "none" or resolve_mode(cfg.mode) == "disabled":
        return RunLogger()
    try:
        import wandb  # noqa: F401
    except ImportError:
        log.warning("logger=wandb but wandb is not installed; not logging (pip install wandb)")
        return RunLogger()
    except Exception as err:  # a broken install (e.g. a protobuf mismatch raises TypeError)
        log.warning("logger=wandb but wandb cannot be imported (%s: %s); not logging",
                    type(err).__name__, err)  # fmt: skip
        return RunLogger()
    return WandbLogger(cfg, sweep_dir)


def sweep_logger_config(sweep_dir: str | Path) -> LoggerConfig | None:
    """The ``logger`` section of ``SWEEP_DIR/config.yaml`` (None if absent or unreadable)."""
    path = sweepdir.SweepFolder(sweep_dir).saved_config()
    if path is None:
        return None
    try:
        from omegaconf import OmegaConf

        section = OmegaConf.to_container(OmegaConf.load(path)).get("logger")  # type: ignore[union-attr]
        if not section:
            return None
        cfg = LoggerConfig(**section)
        cfg.check()
        return cfg
    except Exception as err:
        log.warning("cannot read the logger settings in %s (%s); not logging", path, err)
        return None


def log_report(
    sweep_dir: str | Path, images: dict[str, str], columns: list[str], data: list[list]
) -> None:
    """Send the report's plots and table to a ``report`` wandb run in the sweep's group
    (only when the sweep was run with ``logger=wandb``)."""
    cfg = sweep_logger_config(sweep_dir)
    if cfg is None or cfg.name != "wandb":
        return
    lg = make_logger(cfg, sweep_dir)
    if not isinstance(lg, WandbLogger):
        return
    folder = Path(sweep_dir) / sweepdir.REPORT
    lg.start("report", folder, {"sweep_dir": str(Path(sweep_dir).absolute())}, job_type="report")
    lg.media("report", images)
    lg.table("report", "summary", columns, data)
    lg.finish("report")
    lg.close()
