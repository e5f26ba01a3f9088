"""Train one ensemble on one device. Ray-free: the launcher wraps it in a Ray task, tests
call it directly.

The worker restores itself at the top (:mod:`sweep.restore`: the members' checkpoints, or a
fresh init), so a first run, a retry and a resume are the same code path. It streams batches
from the chunk store, steps the ensemble, appends the training curve every ``log_every``
steps and at the last (one host transfer for all members), checkpoints by time (``train.checkpoint_minutes``;
also every ``train.checkpoint_every`` steps when set), on every stop and before finishing —
written in the background (:mod:`sweep.ckpt_writer`) — and finally writes every member's
results (:mod:`sweep.finalize`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import torch
from safetensors.torch import save

from sweep import sae
from sweep.activations.store import BatchStream, ChunkStore
from sweep.ckpt_writer import CheckpointWriter
from sweep.compiled import forget_compiled
from sweep.config import DataConfig, LoggerConfig, SAEConfig, TrainConfig
from sweep.devices import release_device_memory, resolve_compute_dtype, resolve_device
from sweep.errors import OutOfMemory, SweepError, out_of_memory
from sweep.finalize import EvalSetting, finish_members, run_cfgs, saved_tensors
from sweep.grid import EnsembleSpec, RunSpec
from sweep.logger import RunLogger, make_logger, sweep_logger_config
from sweep.reevaluate import evaluate_again, to_evaluate
from sweep.resample import resample
from sweep.restore import Restored, restore_ensemble, training_ended, use_compile
from sweep.rundir import RunFolder
from sweep.stop import quietly
from sweep.sweepdir import SweepFolder

log = logging.getLogger(__name__)

CURVE_KEYS = ("loss", "mse", "l1", "l0", "fvu")
FAILED_CLOSE_TIMEOUT = 10.0
"""Seconds without progress a failed ensemble's logger gets to finish (the failure, and a
continuation after running out of memory, wait for it)."""


@dataclass(frozen=True)
class EnsembleJob:
    """Everything one worker needs (plain, picklable values; never a DictConfig)."""

    ensemble: EnsembleSpec
    sweep_dir: str
    store_path: str
    normalize: bool
    eval_rows: int
    train: TrainConfig
    threads: int = 0
    """Torch CPU threads (0 = leave as is)."""
    data: DataConfig | None = None
    """The sweep's data settings: recorded in spec.json; ``lm_eval_tokens`` of harvested data."""
    sae: SAEConfig | None = None
    """The architecture's recipe options (None = the architecture's defaults)."""
    placement: dict = field(default_factory=dict)
    """Where this attempt runs (host, Ray node, GPU ids); written to placement.json."""
    logger: LoggerConfig | None = None
    """Experiment tracking; None = the ``logger`` section of SWEEP_DIR/config.yaml, if any."""

    def sae_config(self) -> SAEConfig:
        """:attr:`sae`, or its architecture's defaults."""
        return self.sae or SAEConfig(name=self.ensemble.members[0].arch)


@dataclass
class EnsembleResult:
    ensemble_id: str
    states: dict[str, str]
    """run_id -> done | diverged | interrupted."""
    steps: int
    seconds: float
    resumed_from: int = 0
    """The step this attempt continued from (0: from scratch)."""
    attempt: int = 1
    """Ray's attempt at the task (> 1: earlier workers died; ``launch.max_retries``)."""
    warnings: list[str] = field(default_factory=list)
    """What the worker warned about (a checkpoint that failed to verify, a resume from an
    older step, ...), for the driver's ``sweep.log``."""
    started: bool = True
    """False: the sweep was stopping when this task began (it loaded and trained nothing; an
    earlier attempt, retried by Ray, may have)."""
    evaluated: bool = False
    """Its members were evaluated from their final weights, not trained."""
    timings: dict[str, float] = field(default_factory=dict)
    """Seconds spent in ``restore``, ``checkpoint`` (training held for snapshots; ``checkpoints``:
    how many; ``checkpoint_last``: the last one's: a stop's waits for its write, the end's is
    written while the members are evaluated), ``checkpoint_write``
    (the background writes) and ``finalize`` (evaluation and final writes) by this attempt;
    ``started_at``: when it started (``time.time()``), from which the others count."""


class CheckpointClock:
    """When to checkpoint: every ``checkpoint_minutes`` of training, and every
    ``checkpoint_every`` steps when that is set."""

    def __init__(self, train: TrainConfig) -> None:
        self.every, self.seconds = train.checkpoint_every, train.checkpoint_minutes * 60
        self.last = time.monotonic()

    def due(self, step: int) -> bool:
        by_steps = bool(self.every) and step % self.every == 0  # type: ignore[operator]
        return by_steps or time.monotonic() - self.last >= self.seconds

    def reset(self) -> None:
        self.last = time.monotonic()


class _Attempt:
    """One attempt at training an ensemble: its store, stream, run folders and logger."""

    def __init__(self, job: EnsembleJob, device: torch.device) -> None:
        self.job, self.device = job, device
        self.runs = job.ensemble.members
        self.folders = [RunFolder.of(job.sweep_dir, r.run_id) for r in self.runs]
        self.store = ChunkStore(job.store_path)
        if self.store.width != self.runs[0].width:
            raise SweepError(
                f"store {self.store.path} has width {self.store.width} but the runs expect "
                f"{self.runs[0].width}; use a fresh sweep_dir for a different store"
            )
        verified_at = SweepFolder(job.sweep_dir).store_verified
        self.store.hold(verified_at)  # (the driver's verification: changed since, refused)
        self.scale = self.store.scale(job.normalize)
        t = job.train
        self.stream = BatchStream(
            self.store, t.batch_size, t.seed, t.epochs, job.eval_rows, self.scale, device,
            verified_at=verified_at,
        )  # fmt: skip
        self.sae_cfg = job.sae_config()
        self.arch = self.sae_cfg.architecture()
        self._tracker: RunLogger | None = None
        self.writer = CheckpointWriter(self.folders)
        self.timings: dict[str, float] = {"checkpoint": 0.0, "checkpoints": 0}
        self.attempt = 1
        self.evaluating = False
        """Training ended: its members are being evaluated."""

    def start(self) -> None:
        """Record every member's spec and this attempt's placement."""
        placement = {**self.job.placement, "device": str(self.device)}
        placement["threads"] = torch.get_num_threads()
        placement["attempt"] = self.attempt = _attempt_number(self.folders, placement)
        for run, folder in zip(self.runs, self.folders, strict=True):
            spec = {**run.as_dict(), "train": self.train_of(run), "sae": run.arch}
            spec["recipe"] = self.arch.recipe or None
            if self.job.data is not None:
                spec["data"] = asdict(self.job.data)
            spec.update(
                sae_settings={**asdict(self.sae_cfg), "recipe": spec["recipe"]},
                ensemble=self.job.ensemble.ensemble_id,
                ensemble_members=[m.run_id for m in self.job.ensemble.members],
                sweep_dir=self.job.sweep_dir,
                store=str(self.store.path),
                store_id=self.store.identity,
                total_steps=self.stream.total_steps,
            )
            folder.start(spec, placement)

    def train_of(self, run: RunSpec) -> dict:
        """The training settings ``run`` trains with, as its spec and logger record them: its
        own learning rate where the grid has an lr axis."""
        return {**asdict(self.job.train), "lr": run.learning_rate(self.job.train.lr)}

    def restore(self) -> Restored:
        mean = torch.tensor(self.store.manifest["stats"]["mean"], dtype=torch.float32)
        return restore_ensemble(
            self.runs,
            self.folders,
            self.job.train,
            self.device,
            mean * self.scale,
            self.job.ensemble.ensemble_id,
            self.arch,
        )

    def checkpoint(self, r: Restored, wait: bool = False, last: bool = False) -> None:
        """Snapshot every member and write in the background (``wait``: until on disk).
        ``last``: this attempt's last checkpoint, its seconds also ``checkpoint_last``."""
        t0 = time.perf_counter()
        self._copies_checked(r)
        self.writer.save(r.ens, r.cursor, r.step, r.diverged_at)
        if wait:
            self.writer.wait()
        held = time.perf_counter() - t0  # time training was held
        self.timings["checkpoint"] += held
        self.timings["checkpoints"] += 1
        if last:
            self.timings["checkpoint_last"] = held

    def _copies_checked(self, r: Restored) -> None:
        """Say so, in the log and each run's events (``inexact_resume``), if the compiled
        step's bf16 weight copies are not their weights' cast (:meth:`Ensemble.copies_drifted`)."""
        drifted = r.ens.copies_drifted()
        if not drifted:
            return
        log.warning(
            "ensemble %s: at step %d the compiled step's %s copies of %s were not the weights' "
            "cast, so a run resumed from a checkpoint continues with other bits (cast again; "
            "train.compile=false resumes exactly)",
            self.job.ensemble.ensemble_id, r.step, str(r.ens.autocast_dtype).removeprefix("torch."),
            ", ".join(drifted),
        )  # fmt: skip
        for folder in self.folders:
            why = f"compiled step's weight copies drifted ({', '.join(drifted)})"
            folder.append_event({"event": "inexact_resume", "step": r.step, "why": why})

    def snapshot(self, r: Restored) -> None:
        """Each training member's weights after this step (``train.snapshots``), with the
        ``cfg.json`` its final weights will have plus the step; a frozen (diverged) member's
        are not its weights at this step, so it gets none."""
        cfgs = run_cfgs(self.runs, self.store, self.scale, r.ens.arch)
        rows, total = r.step * self.job.train.batch_size, self.stream.total_steps
        active = r.ens.active.tolist()  # (one host transfer)
        for e, (cfg, folder) in enumerate(zip(cfgs, self.folders, strict=True)):
            if not active[e]:
                continue
            cfg.update(snapshot_step=r.step, snapshot_rows=rows, total_steps=total)
            folder.write_snapshot(r.step, save(saved_tensors(r.ens, e)), cfg)
            folder.append_event({"event": "snapshot", "step": r.step})

    def resample(self, r: Restored, x: torch.Tensor) -> None:
        """Resample dead latents (L1-penalised SAEs) and record how many in each run's events."""
        seeds = [run.seed for run in self.runs]
        counts = resample(r.ens, x, r.step, self.job.train.seed, seeds)
        for folder, n in zip(self.folders, counts, strict=True):
            if n:
                folder.append_event({"event": "resampled", "step": r.step, "latents": n})

    def log_curve(self, parts: sae.LossParts, step: int, active: list[bool]) -> None:
        values = torch.stack([parts.loss, parts.mse, parts.sparsity, parts.l0, parts.fvu])
        rows = values.cpu().tolist()  # (5, E): one host transfer for all members
        recs: dict[str, dict] = {}
        for e, folder in enumerate(self.folders):
            if active[e]:
                rec = {"step": step, "rows": step * self.job.train.batch_size}
                rec.update(zip(CURVE_KEYS, (r[e] for r in rows), strict=True))
                folder.append_curve([rec])
                recs[self.runs[e].run_id] = rec
        self.tracker().log(recs)

    def tracker(self) -> RunLogger:
        """The experiment logger (made on first use; best-effort, never blocks training)."""
        if self._tracker is None:
            cfg = self.job.logger or sweep_logger_config(self.job.sweep_dir)
            self._tracker = make_logger(cfg, self.job.sweep_dir)
            for run, folder in zip(self.runs, self.folders, strict=True):
                config = {
                    **run.as_dict(),
                    "ensemble_id": self.job.ensemble.ensemble_id,
                    "train": self.train_of(run),
                }
                self._tracker.start(run.run_id, folder.path, config)
        return self._tracker

    def close_tracker(self) -> None:
        """After a failure: the logger's unfinished runs end ``failed`` now (not when it is
        collected, which a GPU task's exiting process may never reach), waiting at most
        :data:`FAILED_CLOSE_TIMEOUT` s without progress; never raises over the failure."""
        if self._tracker is not None:
            tracker = self._tracker
            quietly(lambda: tracker.close(timeout=FAILED_CLOSE_TIMEOUT))

    def eval_setting(self) -> EvalSetting:
        tokens = getattr(self.job.data, "lm_eval_tokens", None)
        return EvalSetting(
            self.store,
            self.scale,
            self.device,
            self.job.eval_rows,
            self.job.train.batch_size,
            tokens,
        )


def _train(
    at: _Attempt,
    r: Restored,
    progress: Callable[[int], None] | None,
    should_stop: Callable[[], bool] | None,
) -> bool:
    """Step ``r`` to the end of the stream (or to a stop: returns True), checkpointing."""
    t, bs = at.job.train, at.job.train.batch_size
    total = at.stream.total_steps
    clock, snapshots = CheckpointClock(t), t.snapshot_steps(total)
    for cursor, x in at.stream.batches(r.cursor):
        logging_step = (r.step + 1) % t.log_every == 0 or r.step + 1 == total  # (+ the last)
        was_active = r.ens.active.clone()
        lr_scale, l1_scale = t.lr_scale(r.step, total), t.l1_scale(r.step, total)
        parts = r.ens.step(x, full=logging_step, lr_scale=lr_scale, l1_scale=l1_scale)
        r.step, r.cursor = r.step + 1, cursor
        if _resample_due(t, r.step, total):
            at.resample(r, x)
        r.diverged_at.masked_fill_(was_active > r.ens.active, r.step)  # (newly frozen)
        if r.step in snapshots:
            at.snapshot(r)
        if logging_step:
            at.writer.raise_failed()
            at.log_curve(parts, r.step, r.ens.active.tolist())
            if progress:
                progress(r.step * bs)
        stop = should_stop is not None and should_stop()
        if stop or (clock.due(r.step) and r.step < total):  # (the end's: _train_and_finish)
            at.checkpoint(r, wait=stop, last=stop)  # a stop returns once the state is on disk
            clock.reset()
        if stop:
            return True
    if progress:
        progress(r.step * bs)
    return False


def _resample_due(t: TrainConfig, step: int, total: int) -> bool:
    """Every ``resample_dead`` steps until ``resample_stop`` of training; never after the last
    step (its latents would be saved untrained)."""
    every = t.resample_dead
    return every > 0 and step % every == 0 and step <= t.resample_stop * total and step < total


def _train_and_finish(
    at: _Attempt,
    r: Restored,
    progress: Callable[[int], None] | None,
    should_stop: Callable[[], bool] | None,
) -> dict[str, str]:
    if _train(at, r, progress, should_stop):
        for folder in at.folders:  # tells a stopping driver this ensemble is safe on disk
            folder.mark_interrupted(r.step)
        at.tracker().close(stopped=True)
        return {m.run_id: "interrupted" for m in at.runs}
    # the end state, written while the members are evaluated: on disk before the first final
    # file (a failure while evaluating waits for it too, in train_ensemble's writer.close),
    # so a retry resumes here, not earlier
    at.checkpoint(r, last=True)
    at.evaluating = True
    t1 = time.perf_counter()
    r.ens.release_training_state()  # the device memory goes to the evaluation
    training_ended(at.device)
    at.stream.release()
    release_device_memory()
    diverged = r.diverged_at.tolist()
    states = finish_members(
        r.ens, at.runs, at.folders, r.step, diverged, at.eval_setting(), at.tracker(),
        at.timings, before_final=at.writer.wait,
    )  # fmt: skip
    at.timings["finalize"] = time.perf_counter() - t1
    return states


@contextmanager
def _out_of_memory_named(
    job: EnsembleJob, device: torch.device, evaluating: Callable[[], bool] = lambda: True
) -> Iterator[None]:
    """An allocation that does not fit becomes :class:`OutOfMemory`: one line naming the
    ensemble and the fix, for the driver to act on (a GPU of its own, or halves: see
    ``sweep.execution.Execution._continue_smaller``) or to report; ``evaluating()`` says
    whether the members were being evaluated (training's limit is not learnt from that).
    The checkpoints already written stay."""
    try:
        yield
    except Exception as err:
        kind = out_of_memory(err)
        if kind is None:
            raise
        ens, t = job.ensemble, job.train
        n, run = len(ens.members), ens.members[0]
        gpu_auto = job.sae_config().architecture().gpu_dtype
        fixes = []
        if 0 < float(job.placement.get("gpu_share", 1.0)) < 1:
            fixes.append("launch.gpus_per_ensemble=1 (it shared its GPU)")
        if n > 1:
            fixes.append(f"grid.max_members={n // 2}")
        fix = (
            f"re-run the command adding {' or '.join(fixes)}"
            if fixes
            else "one member alone does not fit: use a device with more memory, or a smaller "
            "train.batch_size or dictionary in a new sweep_dir"
        )
        raise OutOfMemory(
            f"ensemble {ens.ensemble_id} ({n} member(s) of {run.width}x{ens.dict_size}, batch "
            f"{t.batch_size}, {resolve_compute_dtype(t.dtype, device.type != 'cpu', gpu_auto)}) ran out of "
            f"{'host memory' if kind == 'host' else f'memory on {device}'}"
            f"{' while evaluated' if evaluating() else ''}: {fix}; its checkpoints are kept",
            kind,
            evaluating(),
        ) from err


def _attempt_number(folders: list[RunFolder], placement: dict) -> int:
    """1, or more when Ray runs this task again because its worker died (the same driver
    submission and Ray task id as the attempt that left ``placement.json``): recorded as ``worker_retried`` in each
    member's ``events.jsonl``; the driver says so when the ensemble ends."""
    before = folders[0].placement()
    task = (placement.get("submission"), placement.get("task_id"))  # (ids repeat per session)
    if None in task or (before.get("submission"), before.get("task_id")) != task:
        return 1
    attempt = int(before.get("attempt", 1)) + 1
    died = {k: before.get(k) for k in ("host", "pid", "time")}
    for folder in folders:
        folder.append_event({"event": "worker_retried", "attempt": attempt, "died": died})
    return attempt


@contextmanager
def _closing_tracker_on_failure(at: _Attempt) -> Iterator[None]:
    """Whatever fails inside (training, evaluating, freeing their state) closes the
    attempt's logger on its way out (:meth:`_Attempt.close_tracker`)."""
    try:
        yield
    except BaseException:
        at.close_tracker()
        raise


def _without_training(at: _Attempt, t0: float) -> EnsembleResult | None:
    """The result of an ensemble trained no further: its members evaluated from their final
    weights (:func:`sweep.reevaluate.to_evaluate`), or all final already (a retry after every
    result was written); None when it trains. (Before ``start()``: it would take their
    ``DONE`` for damaged.)"""
    job, members = at.job, to_evaluate(at)
    if members is None:
        return None
    states = {r.run_id: f.state().value for r, f in zip(at.runs, at.folders, strict=True)}
    if members:  # (the others are final)
        with _out_of_memory_named(job, at.device), _closing_tracker_on_failure(at):
            states.update(evaluate_again(at, members))
    else:
        for f in at.folders:  # (killed while clearing them, perhaps)
            f.clear_checkpoints()
        left = "no member left to evaluate" if job.ensemble.evaluate else "every member is final"
        log.info("ensemble %s: %s", job.ensemble.ensemble_id, left)
    steps = at.stream.total_steps if members else 0
    result = EnsembleResult(job.ensemble.ensemble_id, states, steps, time.perf_counter() - t0)
    result.evaluated = bool(members or job.ensemble.evaluate)
    if not members and not job.ensemble.evaluate:  # a retry of a worker that wrote them all
        result.attempt = _attempt_number(at.folders, job.placement)
        result.steps = at.stream.total_steps
    return result


def train_ensemble(
    job: EnsembleJob,
    progress: Callable[[int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> EnsembleResult:
    """Train (or continue) one ensemble to the end; returns each member's final state.

    ``progress(rows)`` is called with the rows each member has trained on so far (from the
    step it continues from: rows already counted may come again); ``should_stop()``
    is polled every step: when it returns True the worker checkpoints and returns with
    every member ``interrupted``.
    """
    t0, started_at = time.perf_counter(), time.time()
    if job.threads > 0:
        torch.set_num_threads(job.threads)
    at = _Attempt(job, resolve_device(job.train.device))
    done = _without_training(at, t0)
    if done is not None:
        return done
    if use_compile(job.train, at.device):
        forget_compiled()
    at.start()
    # (the logger closes after the finally's release: its memory is not held meanwhile)
    with (
        _out_of_memory_named(job, at.device, lambda: at.evaluating),
        _closing_tracker_on_failure(at),
    ):
        r = at.restore()
        resumed_from = r.step
        at.timings["restore"] = time.perf_counter() - t0
        failed = True
        try:
            states = _train_and_finish(at, r, progress, should_stop)
            failed = False
        finally:
            at.writer.close(quiet=failed)
            at.timings["checkpoint_write"] = at.writer.write_seconds
            at.timings["compile"] = sum(r.ens.compile_seconds.values())
            # however training ended (a stop, an error); under CUDA graphs this frees their
            r.ens.release_training_state()  # memory pool, which only this thread's reset can
    seconds = time.perf_counter() - t0
    at.timings.update(total=seconds, steps=r.step - resumed_from, started_at=started_at)
    for folder in at.folders:
        folder.record_timings(at.timings, r.ens.program)
    result = EnsembleResult(job.ensemble.ensemble_id, states, r.step, seconds, resumed_from)
    result.timings, result.attempt = at.timings, at.attempt
    return result
