"""``sweep run``: prepare the data, plan, train every pending ensemble through Ray, record.

The story of a sweep, in :func:`run_sweep`: lock the sweep folder, check the config against
what is already there, prepare and verify the store, start Ray, plan (:mod:`sweep.planning`),
write the sweep files, train the ensembles (:mod:`sweep.launcher`: results in completion
order, one progress bar for the whole sweep), record failures and the sweep's state.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

from omegaconf import OmegaConf

from sweep import gpuinfo, grid, launcher, packing, planning
from sweep.activations.store import ChunkStore, total_steps
from sweep.actors import ProgressCounter
from sweep.checkpoints import checkpoint_steps
from sweep.config import SweepConfig, SyntheticDataConfig
from sweep.devices import resolve_compute_dtype
from sweep.errors import DISK_FULL_FIX, OutOfMemory, SweepError, is_disk_full
from sweep.grid import EnsembleSpec
from sweep.io import ensure_writable, remove_stale_temps
from sweep.lock import SweepLock
from sweep.planning import SweepPlan
from sweep.stop import DriverSignals, Interrupted, quietly
from sweep.sweepdir import LOG, RunRecord, SweepFolder, default_store_path, write_summary
from sweep.worker import EnsembleJob, EnsembleResult

log = logging.getLogger(__name__)
details = logging.getLogger("sweep.details")  # to sweep.log only, never the terminal
details.propagate = False

STOP_GRACE = 30.0  # seconds the driver waits for ensembles to checkpoint after SIGTERM/SIGINT
STALE_TEMP_SECONDS = 600.0
"""A temp file in the sweep folder younger than this may be a live ``sweep report`` write."""
STOP_WRITE_RATE = 100e6
"""Bytes/s a stop checkpoint is assumed to reach on a slow shared filesystem: the wait grows
with what the ensembles must write (parameters and both Adam moments, fp32)."""


def stop_grace(ensembles: list[EnsembleSpec]) -> float:
    """Seconds to wait for these ensembles' stop checkpoints."""
    n_params = sum(len(e.members) * 2 * e.dict_size * (e.members[0].width + 1) for e in ensembles)
    return STOP_GRACE + 3 * 4 * n_params / STOP_WRITE_RATE


def prepare_store(cfg: SweepConfig) -> ChunkStore:
    """Open (and for ``data=synthetic`` / ``data=harvest`` make or reuse) the chunk store."""
    path = cfg.data.path or default_store_path(cfg.sweep_dir)
    if isinstance(cfg.data, SyntheticDataConfig):
        from sweep.activations.synthetic import ensure_synthetic_store

        # generated on this machine's GPU when there is one, unless the sweep trains on CPU
        gpu = cfg.train.device != "cpu" and _driver_may_use_gpus(path)
        return ensure_synthetic_store(cfg.data, path, "auto" if gpu else "cpu")
    if cfg.data.name == "harvest":  # harvest-then-train; skipped when the store is complete
        from sweep.activations.harvest import ensure_harvest_store

        cpu = "cpu" in (cfg.data.device, cfg.train.device)  # (its context blocks no training)
        here = cpu or _driver_may_use_gpus(path)  # else in a Ray task, whose process then exits
        return ensure_harvest_store(cfg.data, path, cfg.launch, cfg.progress, in_process=here)
    return ChunkStore(path)


def _driver_may_use_gpus(store: str | Path) -> bool:
    """Whether the driver may make a store on this machine's GPU: not when the GPUs take one
    process each, as the CUDA context it would keep for the whole sweep would keep GPU 0 from
    training (the store is complete and nothing runs: no question to ask)."""
    if (Path(store) / "manifest.json").is_file() or not gpuinfo.exclusive_here():
        return True
    log.info("the GPUs are in exclusive compute mode: the driver makes the store without one")
    return False


def run_sweep(cfg: SweepConfig) -> list[RunRecord]:
    """Plan, train every pending ensemble through Ray; returns every run as recorded.

    A run refused before training (bad store, changed settings, a stop) writes nothing into
    an existing sweep folder, and leaves no new one behind."""
    new_folder = _create(Path(cfg.sweep_dir))
    folder = SweepFolder(ensure_writable(cfg.sweep_dir, "sweep_dir"))
    outcome = _Outcome()
    try:
        with DriverSignals(folder.request_stop) as signals, SweepLock(folder.path) as lock:
            outcome.signals, outcome.locked = signals, True
            store = _checked_store(cfg, folder)
            with _sweep_log(folder):
                records = _train(cfg, folder, store, lock, outcome)
    except SweepError:
        if new_folder and outcome.locked and outcome.signals and outcome.signals.immediate:
            _remove_refused(folder)
        raise
    outcome.raise_if_unfinished()
    return records


def _compute_dtype(cfg: SweepConfig, res: launcher.Resources) -> str:
    """What ``train.dtype=auto`` means for this sweep (recorded in config.yaml, so a resume on
    other hardware cannot silently change it): bfloat16 when the ensembles train on CUDA GPUs
    (this machine's or the cluster's nodes', :mod:`sweep.gpuinfo`; or ``train.device=cuda``),
    else float32."""
    saved = (SweepFolder(cfg.sweep_dir).load_config() or {}).get("train", {}).get("dtype")
    if cfg.train.dtype == "auto" and saved not in (None, "auto"):
        return saved  # an existing sweep keeps its precision
    gpus = cfg.train.device == "cuda" or (res.on_gpu and res.real_gpus)
    return resolve_compute_dtype(cfg.train.dtype, gpus)


def _create(path: Path) -> bool:
    """Whether this process created ``path`` (it may then remove it if the run is refused)."""
    try:
        path.mkdir(parents=True)
    except FileExistsError:
        return False
    except OSError:
        return False  # ensure_writable reports it
    return True


def _remove_refused(folder: SweepFolder) -> None:
    """Undo a refused run's new sweep folder, but keep a store it made (a harvest can take
    hours; the corrected command reuses it)."""
    store = default_store_path(folder.path)
    for child in folder.path.iterdir():
        if child == store and (store / "manifest.json").is_file():
            continue
        shutil.rmtree(child, ignore_errors=True) if child.is_dir() else child.unlink(True)
    if not any(folder.path.iterdir()):
        folder.path.rmdir()


def _checked_store(cfg: SweepConfig, folder: SweepFolder) -> ChunkStore:
    """Everything that can refuse the run before any training, with the store it trains on."""
    planning.check_device(cfg)
    planning.check_compatible(folder, cfg)
    if isinstance(cfg.data, SyntheticDataConfig):
        planning.expand_grid(cfg, cfg.data.width)  # k too large: refused before generating
    store = prepare_store(cfg)
    planning.expand_grid(cfg, store.width)
    planning.check_store(folder, store)
    store.verify()
    steps = total_steps(store, cfg.train.batch_size, cfg.train.epochs, cfg.data.eval_rows)
    mean_lr = cfg.train.lr * cfg.train.mean_lr_scale()  # warm-up and decay included
    short = cfg.sae.architecture().check_schedule(steps, mean_lr)
    if short:
        log.warning(short)
    return store


def _train(
    cfg: SweepConfig, folder: SweepFolder, store: ChunkStore, lock: SweepLock, outcome: _Outcome
) -> list[RunRecord]:
    """Start Ray, plan, write the sweep files, train; record every run and the outcome."""
    signals = outcome.signals
    assert signals is not None
    folder.clear_stop()  # left by an earlier, stopped driver
    remove_stale_temps(folder.path, older_than=STALE_TEMP_SECONDS)
    with launcher.ray_session(cfg.launch, outcome.shutdown_wait):
        import ray

        signals.reinstall()  # ray.init's core worker installs handlers of its own
        res = launcher.Resources(cfg, ray.cluster_resources(), launcher.alive_nodes())
        cfg = replace(cfg, train=replace(cfg.train, dtype=_compute_dtype(cfg, res)))
        planning.check_compatible(folder, cfg)
        budget = _device_budget(store, res)
        p = planning.plan(cfg, store.width, budget, res.on_gpu, res.slots)
        _write_sweep_files(folder, cfg, p, store)
        if p.skipped:
            log.info("%d of %d runs already done; skipping them", len(p.skipped), len(p.runs))
        signals.training()
        _Execution(cfg, folder, p, store, res, lock, outcome).run()
    records = folder.read_runs([r.run_id for r in p.runs], live=False)
    outcome.all_final = all(r.state.final for r in records)
    write_summary(folder.path, [r.row() for r in records])
    folder.record_state(outcome.state)
    return records


def _device_budget(store: ChunkStore, res: launcher.Resources) -> float:
    """Device bytes left to each ensemble's members once its batch stream has staged two of
    the store's chunks on the GPU; refused when those alone take half of what may be planned."""
    if not res.on_gpu:
        return res.device_bytes
    staged, plannable = store.staged_bytes(), grid.MEMORY_USE * res.device_bytes
    if staged > plannable / 2:
        more = (
            "" if res.auto_share or res.num_gpus >= 1 else " or a larger launch.gpus_per_ensemble"
        )
        raise SweepError(
            f"store {store.path}: two of its chunks staged on the GPU need "
            f"{staged / 2**20:,.1f} MiB, over half of the {plannable / 2**20:,.1f} MiB an "
            f"ensemble may plan for; regenerate the store with a smaller data.rows_per_chunk{more}"
        )
    return res.device_bytes - staged


class _QuietFileHandler(logging.FileHandler):
    def handleError(self, record: logging.LogRecord) -> None:  # a full disk: drop the line
        pass


@contextlib.contextmanager
def _sweep_log(folder: SweepFolder) -> Iterator[None]:
    """While the sweep trains, log to ``SWEEP_DIR/sweep.log`` too, with the traceback of any
    unexpected error (the terminal gets one line; a SweepError's line says it all)."""
    handler = _QuietFileHandler(folder.path / LOG, delay=True)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger("sweep").addHandler(handler)
    details.addHandler(handler)
    try:
        yield
    except Exception as err:
        if not isinstance(err, SweepError):
            details.exception("the sweep stopped with this error")
        raise
    finally:
        logging.getLogger("sweep").removeHandler(handler)
        details.removeHandler(handler)
        handler.close()


def _write_sweep_files(
    folder: SweepFolder, cfg: SweepConfig, p: SweepPlan, store: ChunkStore
) -> None:
    folder.write_config(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    folder.write_manifest([r.as_dict() for r in p.runs], p.ensemble_of(), store)


@dataclass
class _Outcome:
    """How the sweep ended: signalled, failed ensembles, or done."""

    signals: DriverSignals | None = None
    locked: bool = False
    """This driver holds the sweep's lock."""
    failures: list[str] = field(default_factory=list)
    all_final: bool = False
    """Every run ended (a stop that came after that changed nothing)."""

    @property
    def signum(self) -> int:
        return self.signals.signum if self.signals and not self.all_final else 0

    @property
    def state(self) -> str:
        return "interrupted" if self.signum else ("failed" if self.failures else "done")

    def shutdown_wait(self) -> float | None:
        return 10.0 if self.signum else None  # after a signal Ray's processes may be dead

    def raise_if_unfinished(self) -> None:
        if self.signum:
            raise Interrupted(
                f"stopped by {signal.Signals(self.signum).name}: running ensembles checkpointed; "
                "re-run the same command to continue exactly where it stopped",
                self.signum,
            )
        full = [f for f in self.failures if is_disk_full(f)]
        if full:
            raise SweepError(f"no space left on the device ({full[0]}); {DISK_FULL_FIX}")
        if self.failures:
            raise SweepError(
                f"{len(self.failures)} ensemble(s) failed ({'; '.join(self.failures)}); finished runs "
                "are kept, fix the cause and re-run the same command to continue"
            )


class _Execution:
    """Train a plan's ensembles as Ray tasks: progress, heartbeat, stop handling, failures."""

    def __init__(
        self,
        cfg: SweepConfig,
        folder: SweepFolder,
        p: SweepPlan,
        store: ChunkStore,
        res: launcher.Resources,
        lock: SweepLock,
        outcome: _Outcome,
    ) -> None:
        self.cfg, self.folder, self.plan, self.store = cfg, folder, p, store
        self.res, self.lock, self.outcome = res, lock, outcome
        self.deadline = 0.0
        self.started = time.time()

    def _job(self, ens: EnsembleSpec) -> EnsembleJob:
        """The task's job. A CPU-planned one trains on the CPU: Ray no longer hides the GPUs
        from a task that asks for none, so left on ``auto`` it would take GPU 0."""
        c = self.cfg
        sweep_dir, store = str(self.folder.path.absolute()), str(self.store.path.absolute())
        train = c.train if self.res.on_gpu else replace(c.train, device="cpu")
        return EnsembleJob(
            ens, sweep_dir, store, c.data.normalize, c.data.eval_rows, train,
            threads=self.res.threads, data=c.data, sae=c.sae, logger=c.logger,
        )  # fmt: skip

    def run(self) -> None:
        import ray
        from tqdm.auto import tqdm

        if not self.plan.ensembles:
            return
        t = self.cfg.train
        steps = total_steps(self.store, t.batch_size, t.epochs, self.cfg.data.eval_rows)
        n_rows = steps * t.batch_size * sum(len(e.members) for e in self.plan.ensembles)
        trained = self._rows_trained()  # by earlier sweeps: the bar starts there
        self.counter = ray.remote(num_cpus=0)(ProgressCounter).remote(trained)
        self.refs: dict = {}
        self.shares: dict[EnsembleSpec, float] = {}
        self._submit(self._gpus())
        self.n_runs, self.done_runs = sum(len(e.members) for e in self.plan.ensembles), 0
        with tqdm(
            total=n_rows,
            initial=min(n_rows, sum(trained.values())),
            unit="row",
            unit_scale=True,
            disable=not self.cfg.progress,
            desc="sweep",
        ) as bar:
            self.bar = bar
            for fin in launcher.drain(self.refs, tick=self._tick):
                self._finished(fin)
            if not self.outcome.failures and not self.outcome.signum:
                bar.n = n_rows

    def _rows_trained(self) -> dict[str, int]:
        """Rows each planned run continues from: its ensemble's newest step at which every
        member has a checkpoint file (what the worker verifies and picks; 0 without one)."""
        out: dict[str, int] = {}
        for e in self.plan.ensembles:
            try:
                steps = [checkpoint_steps(self.folder.run(m.run_id).path) for m in e.members]
            except OSError:  # (only the progress bar reads it)
                steps = [set()]
            step = max(set.intersection(*steps), default=0)
            out.update({m.run_id: step * self.cfg.train.batch_size for m in e.members})
        return out

    def _submit(self, shares: dict[EnsembleSpec, float]) -> None:
        """Start a Ray task for each ensemble, asking for its GPU share."""
        stop_file = str(self.folder.stop_file.absolute())
        jobs = {e: (self._job(e), self.counter, stop_file) for e in shares}
        c = self.cfg.launch
        self.refs.update(
            launcher.submit(launcher.train_task, jobs, self.res.num_cpus, shares, c.max_retries)
        )
        self.shares.update(shares)

    def _gpus(self) -> dict[EnsembleSpec, float]:
        """What each ensemble asks for: the configured GPUs, or with ``auto`` its own share."""
        if not self.res.auto_share:
            return dict.fromkeys(self.plan.ensembles, self.res.num_gpus)
        t, stream = self.cfg.train, self.store.staged_bytes()
        buffers = planning.batch_buffers(self.cfg)
        shares = {
            e: packing.gpu_share(e, t.batch_size, t.dtype, self.res.gpu_bytes, stream, buffers)
            for e in self.plan.ensembles
        }
        shares = packing.fill(shares, self.res.gpus)
        named = {e.ensemble_id: s for e, s in shares.items()}
        log.info("launch.gpus_per_ensemble=auto: %s", packing.describe(named))
        return shares

    def _tick(self, pending: list[EnsembleSpec]) -> bool:
        """Between waits: heartbeat, progress, and on a signal the stop (False: stop waiting)."""
        self.lock.heartbeat()
        self.bar.n = min(self.bar.total, _progress(self.counter, self.bar.n))
        self.bar.set_postfix_str(f"runs {self.done_runs}/{self.n_runs}")
        self.bar.refresh()
        signals = self.outcome.signals
        if not signals or not signals.signum:
            return True
        if not self.deadline:  # the stop file is written: running tasks checkpoint and return
            self.deadline = time.time() + stop_grace(pending)
        if time.time() > self.deadline or self._all_checkpointed(pending, signals.when):
            # SLURM signals Ray's own processes too: results may never arrive, but every
            # started ensemble has checkpointed (or is past saving); its run folders hold all.
            self._mark_interrupted(pending)
            return False
        return True

    def _finished(self, fin: launcher.Finished[EnsembleSpec]) -> None:
        ens = fin.key
        if fin.error is None:
            result: EnsembleResult = fin.value
            self.done_runs += sum(1 for s in result.states.values() if s != "interrupted")
            if "interrupted" in result.states.values() and not self.outcome.signum:
                reason = "its worker was stopped by a signal this driver did not send"
                self.outcome.failures.append(f"{ens.ensemble_id}: {reason}")
            states = "/".join(sorted(set(result.states.values())))
            log.info(
                "ensemble %s: %s after %d steps (%.1fs)",
                ens.ensemble_id,
                states,
                result.steps,
                result.seconds,
            )
        elif self.outcome.signum:  # lost while the job was being stopped: its checkpoints stay
            log.warning("ensemble %s stopped: %s", ens.ensemble_id, fin.error)
            self._mark_interrupted([ens])
        elif not self._continue_smaller(ens, fin.cause):
            self.outcome.failures.append(f"{ens.ensemble_id}: {fin.error}")
            for m in ens.members:
                quietly(lambda m=m: self.folder.run(m.run_id).mark_failed(fin.error))
            log.error("ensemble %s failed: %s", ens.ensemble_id, fin.error)

    def _continue_smaller(self, ens: EnsembleSpec, cause: BaseException | None) -> bool:
        """An ensemble that ran out of GPU memory continues from its checkpoints in this sweep:
        on a GPU of its own if it shared one, else split in two, each half on the share the
        whole had (so the halves never run side by side on it), the limit recorded for later
        plans of this sweep. False when neither is left (one member on a whole GPU)."""
        if not isinstance(cause, OutOfMemory) or cause.where != "device":
            return False
        share = self.shares[ens]
        if 0 < share < 1:
            log.warning(
                "ensemble %s ran out of GPU memory beside others on its GPU (share %g): it "
                "continues from its checkpoints on a GPU of its own",
                ens.ensemble_id,
                share,
            )
            self._submit({ens: 1.0})
            return True
        if len(ens.members) < 2:
            return False
        parts = planning.halves(ens, taken=self._ensemble_ids())
        ensemble_of = {m.run_id: p.ensemble_id for p in parts for m in p.members}
        try:
            self.folder.record_member_limit(ens.dict_ratio, len(parts[0].members))
            self.folder.write_manifest([m.as_dict() for m in ens.members], ensemble_of, self.store)
        except (OSError, SweepError) as err:  # the halves still train; a re-run re-learns it
            log.warning("could not record the split of ensemble %s: %s", ens.ensemble_id, err)
        for m in ens.members:
            event = {"event": "out_of_memory", "ensemble": ens.ensemble_id}
            event.update(members=len(ens.members), continues_in=ensemble_of[m.run_id])
            quietly(lambda m=m, e=event: self.folder.run(m.run_id).append_event(e))
        log.warning(
            "ensemble %s ran out of GPU memory with %d members: it continues from its "
            "checkpoints as %s (at most %d member(s) per ensemble of dict ratio %g in this sweep "
            "from now on; grid.max_members overrides)",
            ens.ensemble_id, len(ens.members), " and ".join(p.ensemble_id for p in parts),
            len(parts[0].members), ens.dict_ratio,
        )  # fmt: skip
        self._submit(dict.fromkeys(parts, share))
        return True

    def _ensemble_ids(self) -> set[str]:
        """Every ensemble id recorded in the sweep or started by this driver."""
        try:
            recorded = set(self.folder.previous_ensembles().values())
        except (OSError, SweepError):  # (a damaged manifest: reported where it is written)
            recorded = set()
        return recorded | {e.ensemble_id for e in self.shares}

    def _all_checkpointed(self, pending: list[EnsembleSpec], stopped: float) -> bool:
        """Whether every pending ensemble that started in this sweep checkpointed for the stop."""
        for ens in pending:
            for m in ens.members:
                run = self.folder.run(m.run_id)
                if run.started_at() >= self.started and run.interrupted_at() < stopped:
                    return False
        return True

    def _mark_interrupted(self, ensembles: list[EnsembleSpec]) -> None:
        """Runs left with a checkpoint but no stop mark (their worker was killed) are interrupted."""
        kept = 0
        for ens in ensembles:
            runs = [self.folder.run(m.run_id) for m in ens.members]
            for run in runs:
                if run.state() == "partial":
                    run.mark_interrupted(None)
            kept += any(run.state().resumable for run in runs)
        if kept:
            log.warning("stopped waiting for %d ensemble(s); their checkpoints are kept", kept)


def _progress(actor: object, last: float) -> float:
    """Rows trained so far (``last`` if the counter cannot be reached, e.g. during shutdown)."""
    import ray

    try:
        return ray.get(actor.total.remote(), timeout=5)  # type: ignore[attr-defined]
    except (ray.exceptions.RayError, TimeoutError):
        return last
