"""Training a plan's ensembles as Ray tasks, for :func:`sweep.driver.run_sweep`: one task per
ensemble with its GPU share, progress, heartbeat, stop handling, failures, and an ensemble
that ran out of GPU memory continued on a GPU of its own or in halves.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path

from sweep import launcher, packing, planning
from sweep.activations.store import ChunkStore, total_steps
from sweep.actors import ProgressCounter
from sweep.checkpoints import checkpoint_steps
from sweep.config import SweepConfig
from sweep.devices import host_memory_bytes
from sweep.errors import DISK_FULL_FIX, OutOfMemory, SweepError, is_disk_full
from sweep.grid import SNAPSHOT_BYTES, EnsembleSpec, parameters
from sweep.lock import SweepLock
from sweep.planning import SweepPlan
from sweep.progress import progress_bar
from sweep.rate import RateMeter, interval
from sweep.stop import DriverSignals, Interrupted, quietly
from sweep.sweepdir import SweepFolder
from sweep.worker import EnsembleJob, EnsembleResult

log = logging.getLogger(__name__)
details = logging.getLogger("sweep.details")  # to sweep.log only (see driver.sweep_log)

BAR_FORMAT = "{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}, {rate_fmt}{postfix}]"
"""tqdm's own, less its time left (paced by rows): the postfix says one paced by work."""
STOP_GRACE = 30.0
"""Seconds the driver waits for ensembles to checkpoint after SIGTERM/SIGINT, beyond the
time their checkpoints take to write (:func:`stop_grace`)."""
STOP_WRITE_RATE = 100e6
"""Bytes/s a stop checkpoint is assumed to reach on a slow shared filesystem: the wait grows
with what the ensembles must write (parameters and both Adam moments, fp32)."""


def stop_grace(ensembles: list[EnsembleSpec]) -> float:
    """Seconds to wait for these ensembles' stop checkpoints."""
    n_params = sum(len(e.members) * 2 * e.dict_size * (e.members[0].width + 1) for e in ensembles)
    return STOP_GRACE + 3 * 4 * n_params / STOP_WRITE_RATE


@dataclass
class Outcome:
    """How the sweep ended: signalled, failed ensembles, or done."""

    signals: DriverSignals | None = None
    locked: bool = False
    """This driver holds the sweep's lock."""
    failures: list[str] = field(default_factory=list)
    all_final: bool = False
    """Every run ended (a stop that came after that changed nothing)."""
    stopped_note: str = (
        "running ensembles checkpointed; re-run the same command to continue exactly where it "
        "stopped"
    )
    """What a stop left, and what to do (after ``stopped by SIGTERM: ``)."""
    unsaved: set[str] = field(default_factory=set)
    """Ensembles that had not checkpointed for the stop (their worker lost first, e.g. Ray's
    own processes signalled too, or the grace ran out): they continue from an older step."""

    @property
    def signum(self) -> int:
        return self.signals.signum if self.signals and not self.all_final else 0

    @property
    def state(self) -> str:
        return "interrupted" if self.signum else ("failed" if self.failures else "done")

    def shutdown_wait(self) -> float | None:
        return 10.0 if self.signum else None  # after a signal Ray's processes may be dead

    def raise_if_unfinished(self) -> None:
        if self.signals and self.signals.signum and self.all_final:
            log.warning(
                "every run had finished before the stop (%s) took effect: the sweep is done",
                self.signals.stopped_by,
            )
        if self.signum:
            note = self.stopped_note
            if self.unsaved:
                ids = ", ".join(sorted(self.unsaved))
                note = (
                    f"{len(self.unsaved)} ensemble(s) ({ids}) did not checkpoint for the "
                    "stop (their workers were lost first): they continue from their last "
                    f"periodic checkpoint; the others: {note}"
                )
            by = self.signals.stopped_by  # type: ignore[union-attr]  (signum: signals)
            raise Interrupted(f"stopped by {by}: {note}", self.signum)
        full = [f for f in self.failures if is_disk_full(f)]
        if full:
            raise SweepError(f"no space left on the device ({full[0]}); {DISK_FULL_FIX}")
        if self.failures:
            raise SweepError(
                f"{len(self.failures)} ensemble(s) failed ({'; '.join(self.failures)}); finished runs "
                "are kept, fix the cause and re-run the same command to continue"
            )


def gpu_shares(
    cfg: SweepConfig, ensembles: list[EnsembleSpec], res: launcher.Resources, staged: int
) -> dict[EnsembleSpec, float]:
    """What each ensemble asks Ray for: the configured GPUs, or with ``auto`` its own share
    (``staged``: the batch stream's bytes on the device)."""
    if not res.auto_share:
        return dict.fromkeys(ensembles, res.num_gpus)
    t = cfg.train
    shares = {
        e: packing.gpu_share(
            e,
            t.batch_size,
            t.dtype,
            res.gpu_bytes,
            staged,
            planning.batch_buffers(cfg, e.members[0].width, e.dict_size),
        )  # fmt: skip
        for e in ensembles
    }
    return packing.fill(shares, res.gpus)


def packed_note(res: launcher.Resources, ensembles: int) -> str | None:
    """:func:`sweep.packing.packed_note` where a fixed fraction of a GPU is asked for."""
    if not res.on_gpu or res.auto_share:
        return None
    return packing.packed_note(res.num_gpus, ensembles, res.gpus)


def host_note(
    cfg: SweepConfig, res: launcher.Resources, shares: dict[EnsembleSpec, float], width: int
) -> str | None:
    """:func:`sweep.packing.host_note` for a sweep on GPUs, of this machine's GPUs and host
    memory where it is a GPU node (a SLURM job's nodes are alike; a cluster launcher's head
    has no GPU: not checked); on CPUs the snapshots are in the memory budget."""
    if not res.on_gpu or not res.gpus_here:
        return None
    training = {e: s for e, s in shares.items() if not e.evaluate}  # (evaluated: no snapshot)
    snapshots = {
        e: len(e.members) * SNAPSHOT_BYTES * parameters(width, e.dict_size) for e in training
    }
    fewer = "launch.num_gpus" if not cfg.launch.address else "ray start --num-gpus on its nodes"
    return packing.host_note(snapshots, training, res.gpus_here, host_memory_bytes(), fewer)


def gpu_notes(
    cfg: SweepConfig, res: launcher.Resources, shares: dict[EnsembleSpec, float], width: int
) -> list[str]:
    """What the run warns of and ``--plan`` notes about its ensembles' GPU ``shares``:
    :func:`packed_note` and :func:`host_note`, where they apply."""
    notes = [packed_note(res, len(shares)), host_note(cfg, res, shares, width)]
    return [n for n in notes if n]


class Execution:
    """Train a plan's ensembles as Ray tasks: progress, heartbeat, stop handling, failures."""

    def __init__(
        self,
        cfg: SweepConfig,
        folder: SweepFolder,
        p: SweepPlan,
        store: ChunkStore,
        res: launcher.Resources,
        lock: SweepLock,
        outcome: Outcome,
    ) -> None:
        self.cfg, self.folder, self.plan, self.store = cfg, folder, p, store
        self.res, self.lock, self.outcome = res, lock, outcome
        self.deadline = 0.0
        self.started = time.time()
        t = cfg.train
        self.final_step = total_steps(store, t.batch_size, t.epochs, cfg.data.eval_rows)

    def _job(self, ens: EnsembleSpec) -> EnsembleJob:
        """The task's job. A CPU-planned one trains on the CPU: Ray no longer hides the GPUs
        from a task that asks for none, so left on ``auto`` it would take GPU 0."""
        c = self.cfg
        sweep_dir, store = str(self.folder.path.absolute()), str(self.store.path.absolute())
        train = c.train if self.res.on_gpu else replace(c.train, device="cpu")
        return EnsembleJob(
            ens, sweep_dir, store, c.data.normalize, c.data.eval_rows, train,
            threads=self.res.threads, data=c.data, sae=c.sae, logger=c.logger,
            placement={"submission": uuid.uuid4().hex},  # (Ray's task ids repeat across sessions)
        )  # fmt: skip

    def run(self) -> None:
        import ray

        if not self.plan.ensembles:
            return
        t, steps = self.cfg.train, self.final_step
        self.n_runs, self.done_runs = sum(len(e.members) for e in self.plan.ensembles), 0
        trains = _trained_runs(self.plan)
        n_rows = steps * t.batch_size * len(trains)  # (the bar counts rows trained)
        trained = self._rows_trained()  # by earlier sweeps: the bar starts there
        weights = {m.run_id: e.dict_size for e in self.plan.ensembles for m in e.members}
        work = sum(steps * t.batch_size * weights[r] for r in trains)
        # (task events off: Ray's head kept ~3.6 KB of each call's record, up to 100k of
        # them, ~370 MB over a long sweep's progress calls; 0.07 KB without)
        counter = ray.remote(num_cpus=0, enable_task_events=False)(ProgressCounter)
        self.counter = counter.remote(trained, weights)
        self.refs: dict = {}
        self.shares: dict[EnsembleSpec, float] = {}
        self.stopped_alone: dict[EnsembleSpec, int] = {}
        self.submitted: dict[EnsembleSpec, float] = {}
        """When each ensemble's latest task was submitted (it may be a re-queued one)."""
        self._submit(self._gpus())
        totals = dict.fromkeys(trains, steps * t.batch_size)
        self.meter = RateMeter(self.folder.path, n_rows, work, totals)
        shown = self.cfg.progress and n_rows > 0  # (evaluating only: logged per ensemble)
        with (
            self.meter,
            progress_bar(
                total=n_rows,
                initial=min(n_rows, sum(trained.values())),
                unit="row",
                unit_scale=True,
                disable=not shown,
                desc="sweep",
                bar_format=BAR_FORMAT,
            ) as bar,
        ):
            self.bar = bar
            for fin in launcher.drain(self.refs, tick=self._tick):
                self._finished(fin)
            if not self.outcome.failures and not self.outcome.signum:
                bar.n = n_rows
            bar.set_postfix_str(f"runs {self.done_runs}/{self.n_runs}", refresh=False)  # (on close)

    def _postfix(self) -> str:
        """``runs 3/12, about 01:20:00 left``: the time left paced as ``sweep status`` paces it
        (by rows weighted by dictionary size: :class:`RateMeter`), not by the bar's rows."""
        said = f"runs {self.done_runs}/{self.n_runs}"
        left = self.meter.seconds_left()
        return f"{said}, about {interval(left)} left" if left else said

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
        self.submitted.update(dict.fromkeys(shares, time.time()))
        c = self.cfg.launch
        self.refs.update(
            launcher.submit(launcher.train_task, jobs, self.res.num_cpus, shares, c.max_retries)
        )
        self.shares.update(shares)

    def _gpus(self) -> dict[EnsembleSpec, float]:
        shares = gpu_shares(self.cfg, self.plan.ensembles, self.res, self.store.staged_bytes())
        if self.res.auto_share:
            named = {e.ensemble_id: s for e, s in shares.items()}
            log.info("launch.gpus_per_ensemble=auto: %s", packing.describe(named))
        for note in gpu_notes(self.cfg, self.res, shares, self.store.width):
            log.warning(note)
        return shares

    def _tick(self, pending: list[EnsembleSpec]) -> bool:
        """Between waits: heartbeat, progress, and on a signal the stop (False: stop waiting)."""
        self.lock.heartbeat()
        progress = _progress(self.counter)
        if progress:
            rows, work, runs = progress
            self.meter.sample(min(self.bar.total, rows), work=work, runs=runs)  # (sweep status)
            self.bar.update(min(self.bar.total, rows) - self.bar.n)  # (drawn at its interval)
        self.bar.set_postfix_str(self._postfix(), refresh=False)
        signals = self.outcome.signals
        if not signals or not signals.signum:
            return True
        if not self.deadline:  # the stop file is written: running tasks checkpoint and return
            self.deadline = time.time() + stop_grace(pending)
            if not self.folder.stop_file.exists():
                self._ask_through_ray(pending)
        if self._all_checkpointed(pending) or time.time() > self.deadline:
            # SLURM signals Ray's own processes too: results may never arrive, but every
            # started ensemble has checkpointed (or is past saving); its run folders hold all.
            self._mark_interrupted(pending)
            return False
        return True

    def _ask_through_ray(self, pending: list[EnsembleSpec]) -> None:
        """The stop file could not be written (a full disk, a sweep folder made read-only):
        each task is asked through Ray instead. Ray's cancel raises SIGINT in a running
        task's worker, whose :class:`~sweep.stop.StopWatch` takes it as the stop file (the
        worker checkpoints and returns); a task not yet started never starts."""
        import ray

        log.warning(
            "could not write the stop file %s: asking the ensembles through Ray instead",
            self.folder.stop_file,
        )
        for ref, ens in list(self.refs.items()):
            if ens in pending:
                quietly(lambda ref=ref: ray.cancel(ref, force=False, recursive=False))

    def _finished(self, fin: launcher.Finished[EnsembleSpec]) -> None:
        ens = fin.key
        if fin.error is None:
            self._returned(ens, fin.value)
            return
        self._worker_warnings(ens, getattr(fin.cause, "worker_warnings", None) or [])
        if self.outcome.signum:  # lost while the job was being stopped: its checkpoints stay
            saved = self._all_checkpointed([ens], ended=True)
            (log.info if saved else log.warning)(
                "ensemble %s stopped: %s", ens.ensemble_id, fin.error
            )
            if not saved:
                self.outcome.unsaved.add(ens.ensemble_id)
            self._mark_interrupted([ens], warn=False)  # (said just now)
        elif not self._continue_smaller(ens, fin.cause):
            self._failed(ens, fin.error)
        if fin.detail:
            details.error("ensemble %s: what its task raised:\n%s", ens.ensemble_id, fin.detail)

    def _failed(self, ens: EnsembleSpec, reason: str) -> None:
        """The ensemble failed for good in this sweep: said, counted, its runs marked."""
        self.outcome.failures.append(f"{ens.ensemble_id}: {reason}")
        for m in ens.members if ens.evaluate != "all" else ():  # (those stay final)
            quietly(lambda m=m: self._mark_failed(m.run_id, reason))
        log.error("ensemble %s failed: %s", ens.ensemble_id, reason)

    def _mark_failed(self, run_id: str, reason: str) -> None:
        """A member of a failed ensemble is failed, unless it finished before the failure
        (its final files written and vouched for: they stay as they are)."""
        run = self.folder.run(run_id)
        if not run.is_done():
            run.mark_failed(reason)

    def _returned(self, ens: EnsembleSpec, result: EnsembleResult) -> None:
        """Its task returned: finished, or stopped (by this driver, or by someone else)."""
        self.done_runs += sum(1 for s in result.states.values() if s != "interrupted")
        self.bar.set_postfix_str(self._postfix())  # (shown now)
        stopped = [r for r, state in result.states.items() if state == "interrupted"]
        if stopped and not self.outcome.signum:
            self._stopped_alone(ens, stopped)
        self._worker_warnings(ens, result.warnings)
        if result.attempt > 1:
            log.warning(
                "ensemble %s: its worker died %d time(s) and Ray ran it again; it "
                "continued from its checkpoints (worker_retried in its runs' events.jsonl)",
                ens.ensemble_id, result.attempt - 1,
            )  # fmt: skip
        if not result.started:
            log.info(
                "ensemble %s: left for the next run (the sweep was stopping when its task began)",
                ens.ensemble_id,
            )
            if self.outcome.signum:  # (a Ray retry of a worker lost, perhaps before it saved)
                self._mark_interrupted([ens], warn=False)
            return
        states = "/".join(sorted(set(result.states.values())))
        if result.evaluated:
            log.info(
                "ensemble %s: evaluated again, %s (%.1fs)", ens.ensemble_id, states, result.seconds
            )
            return
        start = f"{result.resumed_from} -> " if result.resumed_from else ""
        at = "; the ensemble ended at" if "diverged" in states else " at"  # (a run's: its note)
        log.info(
            "ensemble %s: %s%s step %s%d (%.1fs)",
            ens.ensemble_id,
            states,
            at,
            start,
            result.steps,
            result.seconds,
        )

    def _worker_warnings(self, ens: EnsembleSpec, lines: list[str]) -> None:
        """What the ensemble's worker warned about, into sweep.log (the terminal had it as
        Ray's forwarded worker output)."""
        for line in lines:
            details.warning("worker of ensemble %s: %s", ens.ensemble_id, line)

    def _stopped_alone(self, ens: EnsembleSpec, stopped: list[str]) -> None:
        """Its worker stopped (``stopped``: the members it left interrupted) at a signal this
        driver did not send (someone's ``kill``, a node agent): the ensemble continues from the
        checkpoint it wrote, as a crashed one would, up to ``launch.max_retries`` times. The
        sweep's stop file, which only the driver writes (on a signal), stops it for good."""
        n = self.stopped_alone[ens] = self.stopped_alone.get(ens, 0) + 1
        limit = self.cfg.launch.max_retries
        by = "stop_file" if self.folder.stop_file.exists() else "signal"
        event = {"event": "stopped_from_outside", "by": by, "times": n, "max_retries": limit}
        for rid in stopped:  # (the worker cannot tell whose signal it got)
            quietly(lambda rid=rid: self.folder.run(rid).append_event(event))
        if by == "stop_file":
            reason = "its worker found the sweep's stop file, which this driver did not write"
        elif n > limit:
            reason = f"its worker was stopped by a signal this driver did not send, {n} times (launch.max_retries={limit})"
        else:
            log.warning(
                "ensemble %s: its worker was stopped by a signal this driver did not send; it "
                "continues from its checkpoints (%d of launch.max_retries=%d)",
                ens.ensemble_id, n, limit,
            )  # fmt: skip
            self._submit({ens: self.shares[ens]})
            return
        self._failed(ens, reason)

    def _continue_smaller(self, ens: EnsembleSpec, cause: BaseException | None) -> bool:
        """An ensemble that ran out of GPU memory continues from its checkpoints in this sweep
        (one evaluating finished runs is evaluated again): on a GPU of its own if it shared
        one, else split in two (:meth:`_split`). False when neither is left (one member on a
        whole GPU)."""
        if not isinstance(cause, OutOfMemory) or cause.where != "device":
            return False
        share = self.shares[ens]
        how = "is evaluated" if ens.evaluate else "continues from its checkpoints"
        if 0 < share < 1:
            log.warning(
                "ensemble %s ran out of GPU memory beside others on its GPU (share %g): it "
                "%s on a GPU of its own",
                ens.ensemble_id, share, how,
            )  # fmt: skip
            self._submit({ens: 1.0})
            return True
        if len(ens.members) < 2:
            return False
        self._split(ens, share, learn=not (ens.evaluate or cause.evaluating))
        return True

    def _split(self, ens: EnsembleSpec, share: float, learn: bool) -> None:
        """``ens`` in two halves, each on the share the whole had (so they never run side by
        side on it); ``learn``: it ran out while training, and the limit is recorded for
        later plans of this sweep (evaluation's memory is not training's: nothing to learn
        from it)."""
        parts = planning.halves(ens, taken=self._ensemble_ids())
        ensemble_of = {m.run_id: p.ensemble_id for p in parts for m in p.members}
        try:
            if learn:
                self.folder.record_member_limit(ens.dict_ratio, len(parts[0].members))
            if not ens.evaluate:
                specs = [m.as_dict() for m in ens.members]
                self.folder.write_manifest(specs, ensemble_of, self.store)
        except (OSError, SweepError) as err:  # the halves still train; a re-run re-learns it
            log.warning("could not record the split of ensemble %s: %s", ens.ensemble_id, err)
        for m in ens.members:
            event = {"event": "out_of_memory", "ensemble": ens.ensemble_id}
            event.update(members=len(ens.members), continues_in=ensemble_of[m.run_id])
            quietly(lambda m=m, e=event: self.folder.run(m.run_id).append_event(e))
        named, n = " and ".join(p.ensemble_id for p in parts), len(ens.members)
        if not learn:
            log.warning(
                "ensemble %s ran out of GPU memory with %d members while evaluated: it is "
                "evaluated as %s", ens.ensemble_id, n, named,
            )  # fmt: skip
        else:
            log.warning(
                "ensemble %s ran out of GPU memory with %d members: it continues from its "
                "checkpoints as %s (at most %d member(s) per ensemble of dict ratio %g in this "
                "sweep from now on; grid.max_members overrides)",
                ens.ensemble_id, n, named, len(parts[0].members), ens.dict_ratio,
            )  # fmt: skip
        self._submit(dict.fromkeys(parts, share))

    def _ensemble_ids(self) -> set[str]:
        """Every ensemble id recorded in the sweep or started by this driver."""
        try:
            recorded = set(self.folder.previous_ensembles().values())
        except (OSError, SweepError):  # (a damaged manifest: reported where it is written)
            recorded = set()
        return recorded | {e.ensemble_id for e in self.shares}

    def _all_checkpointed(self, pending: list[EnsembleSpec], ended: bool = False) -> bool:
        """Whether every pending ensemble whose latest task was training when the stop came
        has checkpointed for it (one that started after the stop, e.g. on CPUs the stopped
        ones freed, finds the stop file before its first step: it has nothing to save).
        ``ended``: one whose training had ended (its end checkpoint on disk: it was being
        evaluated) counts too; the wait for the stop does not count it, as its evaluation
        may still end in time. (Attempts are dated by the worker's clock, the stop by the
        driver's: nodes' clocks are assumed to agree to well under the time a task takes to
        start.)"""
        signals = self.outcome.signals
        stopped = signals.when if signals and signals.signum else time.time()
        for ens in pending:
            since = self.submitted.get(ens, self.started)
            for m in ens.members:
                run = self.folder.run(m.run_id)
                training = since <= run.started_at() < stopped
                saved = run.interrupted_at() >= stopped or (ended and self._ended(run.path))
                if training and not saved:
                    return False
        return True

    def _ended(self, run: Path) -> bool:
        """Whether the run's end checkpoint is on disk (whole)."""
        return self.final_step in checkpoint_steps(run, whole=True)

    def _mark_interrupted(self, ensembles: list[EnsembleSpec], warn: bool = True) -> None:
        """Runs left with a checkpoint but no stop mark (their worker was killed) are
        interrupted. Warned about (unless ``warn`` is False: the caller said it): ensembles
        that had not checkpointed for the stop (the grace ran out, or their worker was lost
        first), whose work since their last checkpoint is lost."""
        late = [e for e in ensembles if not self._all_checkpointed([e], ended=True)]
        self.outcome.unsaved.update(e.ensemble_id for e in late)  # (before marking)
        kept = 0
        for ens in ensembles:
            if ens not in late and not self._all_checkpointed([ens]):
                log.info(
                    "ensemble %s was being evaluated when the stop came: its training is "
                    "saved (step %d); the re-run evaluates it", ens.ensemble_id, self.final_step,
                )  # fmt: skip
            runs = [self.folder.run(m.run_id) for m in ens.members]
            step = runs[0].interrupted_step()
            now = runs[0].interrupted_at() >= self.submitted.get(ens, self.started)
            if ens not in late and now and step is not None:  # (its result is not waited for)
                log.info("ensemble %s: interrupted at step %d", ens.ensemble_id, step)
            for run in runs:
                if run.state() == "partial":
                    run.mark_interrupted(None)
            kept += ens in late and any(run.state().resumable for run in runs)
        if kept and warn:
            log.warning(
                "stopped waiting for %d ensemble(s) before they checkpointed for the stop; "
                "their earlier checkpoints are kept",
                kept,
            )


def _trained_runs(plan: SweepPlan) -> list[str]:
    """The runs the plan trains (not those it only evaluates)."""
    return [m.run_id for e in plan.ensembles if not e.evaluate for m in e.members]


def _progress(actor: object) -> tuple[int, float, dict[str, int]] | None:
    """Rows trained so far, their work and each run's (None if the counter cannot be
    reached, e.g. during shutdown)."""
    import ray

    try:
        return ray.get(actor.work.remote(), timeout=5)  # type: ignore[attr-defined]
    except (ray.exceptions.RayError, TimeoutError):
        return None
