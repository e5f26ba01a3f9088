"""Plan a sweep (idempotently), run its ensembles as Ray tasks, and record the outcome.

Planning reads the run folders: DONE runs are skipped, runs with a checkpoint continue from
it (grouped with runs at the same step), the rest start fresh. Every ensemble is one Ray
task; results are handled in completion order (``ray.wait``) while one progress bar tracks
the whole sweep. A task that fails (after Ray's retries for crashed workers) marks its runs
FAILED with the reason; the rest of the sweep carries on.
"""

from __future__ import annotations

import logging
import math
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from omegaconf import OmegaConf

from sweep import grid, rundir
from sweep.activations.store import ChunkStore
from sweep.activations.synthetic import default_store_path, ensure_synthetic_store
from sweep.actors import ProgressCounter, StopFlag
from sweep.config import SweepConfig, SyntheticDataConfig
from sweep.errors import RunDirError, SweepError, task_error_reason
from sweep.grid import EnsembleSpec, RunSpec
from sweep.lock import SweepLock
from sweep.worker import EnsembleJob, EnsembleResult, run_state, train_ensemble

log = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"
MANIFEST_FILE = "manifest.json"
# Config fields that define what every run trains on; changing them under an existing
# sweep_dir would mix incomparable runs, so it is refused.
_DEFINING = {
    "data": None,  # every field of the data group (except the ones in _FREE)
    "sae": None,
    "train": ("batch_size", "lr", "betas", "eps", "epochs", "seed", "dtype"),
}
_FREE = {"data": ("path",)}


@dataclass
class Plan:
    runs: list[RunSpec]
    skipped: list[str]
    """Runs already final (DONE)."""
    ensembles: list[EnsembleSpec]


def prepare_store(cfg: SweepConfig) -> ChunkStore:
    """Open (and for ``data=synthetic`` generate or reuse) the chunk store; validate it."""
    if isinstance(cfg.data, SyntheticDataConfig):
        path = default_store_path(cfg.data, cfg.sweep_dir)
        return ensure_synthetic_store(cfg.data, path)
    if cfg.data.name == "harvest":  # harvest-then-train; skipped when the store is complete
        from sweep.activations.harvest import ensure_harvest_store

        return ensure_harvest_store(cfg.data, cfg.sweep_dir, cfg.launch, cfg.progress)
    return ChunkStore(cfg.data.path)  # type: ignore[arg-type]


def _flat(d: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        out.update(_flat(v, key + ".") if isinstance(v, dict) else {key: v})
    return out


def check_compatible(sweep_dir: Path, cfg: SweepConfig) -> None:
    """Refuse a config whose run-defining fields differ from the sweep already in ``sweep_dir``."""
    saved = sweep_dir / CONFIG_FILE
    if not saved.exists():
        return
    old = OmegaConf.to_container(OmegaConf.load(saved), resolve=True)
    new = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
    diffs = []
    for group, fields in _DEFINING.items():
        a, b = _flat(old.get(group, {}), f"{group}."), _flat(new.get(group, {}), f"{group}.")  # type: ignore[union-attr]
        keys = sorted(set(a) | set(b))
        for key in keys:
            name = key.split(".", 1)[1]
            if (
                (fields is None or name in fields)
                and name not in _FREE.get(group, ())
                and a.get(key) != b.get(key)
            ):
                diffs.append(f"{key} {a.get(key)!r} -> {b.get(key)!r}")
    if diffs:
        raise RunDirError(
            f"sweep_dir {sweep_dir} holds a sweep with different settings ({'; '.join(diffs)}); "
            "use a new sweep_dir or restore those values"
        )


def plan(cfg: SweepConfig, width: int, device_bytes: float, on_gpu: bool) -> Plan:
    """Which runs still need training, grouped into ensembles by shape and progress."""
    runs = grid.expand(cfg.grid.l1, cfg.grid.dict_ratio, cfg.grid.seeds, width, cfg.sae.name)
    skipped, todo = [], []
    for r in runs:
        state = run_state(rundir.run_dir(cfg.sweep_dir, r.run_id))
        (skipped if state in ("done", "diverged") else todo).append(r)
    # Runs continuing from a checkpoint can only share an ensemble with runs at the same step:
    # the newest step every member of their previous ensemble has (see rundir.common_checkpoint).
    by_step: dict[int, list[RunSpec]] = {}
    for step, runs_at in _resume_steps(Path(cfg.sweep_dir), todo).items():
        by_step.setdefault(step, []).extend(runs_at)
    ensembles: list[EnsembleSpec] = []
    for step, group_runs in sorted(by_step.items(), reverse=True):
        budgets = {
            ratio: grid.member_budget(
                width,
                grid.dict_size(ratio, width),
                cfg.train.batch_size,
                cfg.train.dtype,
                device_bytes,
                on_gpu,
                cfg.grid.max_members,
            )
            for ratio in {r.dict_ratio for r in group_runs}
        }
        ensembles += grid.group(group_runs, budgets, tag=f"-at{step}" if step else "")
    ensembles.sort(key=lambda e: -e.dict_ratio)
    return Plan(runs, [r.run_id for r in skipped], ensembles)


def _resume_steps(sweep_dir: Path, todo: list[RunSpec]) -> dict[int, list[RunSpec]]:
    """Pending runs by the step they resume from (0 = from scratch), by checkpoint file names."""
    manifest = sweep_dir / MANIFEST_FILE
    previous = rundir.read_json(manifest)["runs"] if manifest.exists() else {}
    groups: dict[str, list[RunSpec]] = {}
    for r in todo:
        groups.setdefault(previous.get(r.run_id, {}).get("ensemble", f"new:{r.run_id}"), []).append(
            r
        )
    out: dict[int, list[RunSpec]] = {}
    for members in groups.values():
        steps = [rundir.checkpoint_steps(rundir.run_dir(sweep_dir, r.run_id)) for r in members]
        common = set.intersection(*steps)
        out.setdefault(max(common) if common else 0, []).extend(members)
    return out


def write_sweep_files(sweep_dir: Path, cfg: SweepConfig, p: Plan, store: ChunkStore) -> None:
    rundir.atomic_write_bytes(
        sweep_dir / CONFIG_FILE, OmegaConf.to_yaml(OmegaConf.structured(cfg)).encode()
    )
    manifest_path = sweep_dir / MANIFEST_FILE
    known = rundir.read_json(manifest_path)["runs"] if manifest_path.exists() else {}
    ens_of = {m.run_id: e.ensemble_id for e in p.ensembles for m in e.members}
    for r in p.runs:
        entry = known.get(r.run_id, {})
        entry.update(r.as_dict())
        if r.run_id in ens_of:
            entry["ensemble"] = ens_of[r.run_id]
        known[r.run_id] = entry
    rundir.atomic_write_json(
        manifest_path,
        {"runs": known, "store": str(store.path), "width": store.width, "updated": time.time()},
    )


class _Resources:
    """What each ensemble task asks Ray for, and the device memory model's budget."""

    def __init__(self, cfg: SweepConfig, cluster: dict[str, float]) -> None:
        import psutil

        want_gpu = cfg.train.device == "cuda" or (
            cfg.train.device == "auto" and cluster.get("GPU", 0) > 0
        )
        if cfg.train.device == "cuda" and cluster.get("GPU", 0) == 0:
            raise SweepError(
                "train.device=cuda but the Ray cluster has no GPUs; use train.device=auto or cpu"
            )
        self.on_gpu = want_gpu
        lc = cfg.launch
        cpus = cluster.get("CPU", 1)
        if want_gpu:
            self.num_gpus, self.num_cpus = lc.gpus_per_ensemble, lc.cpus_per_ensemble or 1
            per_gpu = lc.device_memory_gb * 2**30 or _gpu_bytes() or 16 * 2**30
            self.device_bytes = per_gpu * min(1.0, lc.gpus_per_ensemble)
        else:
            self.num_gpus, self.num_cpus = 0, lc.cpus_per_ensemble or cpus
            concurrent = max(1, math.floor(cpus / self.num_cpus))
            self.device_bytes = (
                lc.device_memory_gb * 2**30 or psutil.virtual_memory().total * 0.5 / concurrent
            )
        self.threads = cfg.train.threads or max(1, int(self.num_cpus))


def _gpu_bytes() -> float:
    import torch

    return (
        float(torch.cuda.get_device_properties(0).total_memory)
        if torch.cuda.is_available()
        else 0.0
    )


def _init_ray(cfg: SweepConfig) -> bool:
    """Start or join Ray unless already initialised; returns whether we own the instance."""
    import ray

    if ray.is_initialized():
        return False
    lc = cfg.launch
    common = {"include_dashboard": False, "configure_logging": False, "log_to_driver": True}
    try:
        if lc.address:
            ray.init(address=lc.address, **common)
        else:
            kwargs = {"num_cpus": lc.num_cpus, "num_gpus": lc.num_gpus}
            if lc.temp_dir:
                kwargs["_temp_dir"] = str(Path(lc.temp_dir).absolute())
            ray.init(**kwargs, **common)
    except (ConnectionError, OSError, ValueError, RuntimeError) as err:
        where = f"the Ray cluster at {lc.address}" if lc.address else "a local Ray instance"
        hint = (
            "is it running (ray start / launch/slurm.sbatch)?"
            if lc.address
            else "check launch.* settings"
        )
        if "path length" in str(err):
            hint = "launch.temp_dir is too long for Ray's socket paths (107 bytes); use a shorter folder"
        raise SweepError(
            f"could not start or join {where} ({str(err).splitlines()[0]}); {hint}"
        ) from err
    return True


def _remote_train(job: EnsembleJob, progress_actor: object, flag: object) -> EnsembleResult:
    """The Ray task: train one ensemble; stop cleanly (checkpoint) on SIGTERM/SIGINT or when
    the driver raises the stop flag."""
    import os
    import socket

    import ray

    def report(rows: int) -> None:
        progress_actor.add.remote(rows * len(job.ensemble.members))  # type: ignore[attr-defined]

    ctx = ray.get_runtime_context()
    placement = {
        "host": socket.gethostname(),
        "node_id": ctx.get_node_id(),
        "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES", ""),
        "pid": os.getpid(),
    }
    with StopWatch(flag, Path(job.sweep_dir) / STOP_FILE) as stop:
        if stop.requested():  # the sweep was stopped before this task started
            ids = [m.run_id for m in job.ensemble.members]
            return EnsembleResult(
                job.ensemble.ensemble_id, dict.fromkeys(ids, "interrupted"), 0, 0.0
            )
        return train_ensemble(
            replace(job, placement=placement), progress=report, should_stop=stop.is_set
        )


def _flag_set(flag: object, timeout: float = 10) -> bool:
    import ray

    try:
        return bool(ray.get(flag.is_set.remote(), timeout=timeout))  # type: ignore[attr-defined]
    except Exception:  # the actor may be gone: the stop file is the other channel
        return False


class StopWatch:
    """Inside a worker: a threading.Event set by SIGTERM/SIGINT, by the driver's stop flag
    actor, or by the driver's stop file in the sweep folder (which still works when the job's
    signal has taken Ray's own processes down with it)."""

    def __init__(self, flag: object, stop_file: Path, poll: float = 0.5) -> None:
        self.flag, self.stop_file, self.poll = flag, stop_file, poll
        self.event = threading.Event()
        self._old: dict[int, object] = {}

    def is_set(self) -> bool:
        return self.event.is_set()

    def requested(self) -> bool:
        return self.stop_file.exists() or _flag_set(self.flag, timeout=2)

    def _watch(self) -> None:
        while not self.event.is_set():
            if self.requested():
                self.event.set()
            self.event.wait(self.poll)

    def __enter__(self) -> StopWatch:
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, lambda *_: self.event.set())
            except ValueError:  # not the main thread: rely on the flag
                pass
        self._thread = threading.Thread(target=self._watch, daemon=True, name="sweep-stop-watch")
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        done = self.event.is_set()
        self.event.set()
        for sig, old in self._old.items():
            signal.signal(sig, old)  # type: ignore[arg-type]
        if not done:
            self.event.clear()


class Interrupted(SweepError):
    """The sweep was stopped by a signal; every running ensemble checkpointed."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum


class _Signals:
    """In the driver: on the first SIGTERM/SIGINT, write the stop file at once (workers poll
    it) and remember the signal instead of dying (main thread only)."""

    def __init__(self, stop_file: Path) -> None:
        self.signum, self.stop_file, self.when = 0, stop_file, 0.0
        self._old: dict[int, object] = {}

    def __enter__(self) -> _Signals:
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:
                pass
        return self

    def _handle(self, signum: int, _frame: object) -> None:
        if self.signum:  # a second signal: stop waiting for the workers
            raise KeyboardInterrupt
        self.signum, self.when = signum, time.time()
        _quietly(
            lambda: rundir.atomic_write_json(self.stop_file, {"time": self.when, "signal": signum})
        )
        log.warning(
            "received %s: asking every ensemble to checkpoint and stop", signal.Signals(signum).name
        )

    def __exit__(self, *exc: object) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)  # type: ignore[arg-type]


def check_width(sweep_dir: Path, store: ChunkStore) -> None:
    manifest = sweep_dir / MANIFEST_FILE
    if manifest.exists():
        width = rundir.read_json(manifest).get("width")
        if width is not None and width != store.width:
            raise SweepError(
                f"store {store.path} has width {store.width} but the runs in {sweep_dir} were trained on "
                f"width {width}; use a new sweep_dir for this store"
            )


def run_sweep(cfg: SweepConfig) -> list[dict]:
    """Plan, train every pending ensemble through Ray, and return the summary rows."""
    import ray

    from sweep import report

    sweep_dir = rundir.ensure_writable(cfg.sweep_dir, "sweep_dir")
    with SweepLock(sweep_dir) as lock:
        check_compatible(sweep_dir, cfg)
        store = prepare_store(cfg)
        check_width(sweep_dir, store)
        store.verify()
        (sweep_dir / STOP_FILE).unlink(missing_ok=True)  # left by an earlier, stopped driver
        owns_ray = _init_ray(cfg)
        signals = _Signals(
            sweep_dir / STOP_FILE
        ).__enter__()  # after ray.init, whose core worker installs its own handlers
        try:
            res = _Resources(cfg, ray.cluster_resources())
            p = plan(cfg, store.width, res.device_bytes, res.on_gpu)
            write_sweep_files(sweep_dir, cfg, p, store)
            if p.skipped:
                log.info("%d of %d runs already done; skipping them", len(p.skipped), len(p.runs))
            failures = _execute(cfg, p, store, res, lock, signals)
        finally:
            signals.__exit__()
            if owns_ray:
                _shutdown_ray(wait=10.0 if signals.signum else None)
        rows = report.summary_rows(sweep_dir, [r.run_id for r in p.runs])
        report.write_summary(sweep_dir, rows)
        _record_state(
            sweep_dir, "interrupted" if signals.signum else ("failed" if failures else "done")
        )
    if signals.signum:
        raise Interrupted(
            f"interrupted by {signal.Signals(signals.signum).name}: running ensembles checkpointed; "
            "re-run the same command to continue exactly where it stopped",
            signals.signum,
        )
    if failures:
        raise SweepError(
            f"{len(failures)} ensemble(s) failed ({'; '.join(failures)}); finished runs are kept, "
            "fix the cause and re-run the same command to continue"
        )
    return rows


def _shutdown_ray(wait: float | None) -> None:
    """ray.shutdown(); after a signal (Ray's processes may be dead) give up after ``wait`` s."""
    import ray

    if wait is None:
        ray.shutdown()
        return
    t = threading.Thread(target=lambda: _quietly(ray.shutdown), daemon=True, name="ray-shutdown")
    t.start()
    t.join(wait)


def _record_state(sweep_dir: Path, state: str) -> None:
    path = sweep_dir / MANIFEST_FILE
    manifest = rundir.read_json(path)
    manifest.update(state=state, updated=time.time())
    rundir.atomic_write_json(path, manifest)


def _execute(
    cfg: SweepConfig,
    p: Plan,
    store: ChunkStore,
    res: _Resources,
    lock: SweepLock,
    signals: _Signals,
) -> list[str]:
    import ray
    from tqdm.auto import tqdm

    from sweep.activations.store import BatchStream

    if not p.ensembles:
        return []
    stream = BatchStream(
        store, cfg.train.batch_size, cfg.train.seed, cfg.train.epochs, cfg.data.eval_rows
    )
    total_rows = (
        stream.total_steps * cfg.train.batch_size * sum(len(e.members) for e in p.ensembles)
    )
    progress_actor = ray.remote(num_cpus=0)(ProgressCounter).remote()
    flag = ray.remote(num_cpus=0)(StopFlag).remote()
    task = ray.remote(_remote_train).options(
        num_cpus=res.num_cpus,
        num_gpus=res.num_gpus,
        max_retries=cfg.launch.max_retries,
        retry_exceptions=False,
    )
    extra = {
        "data": asdict(cfg.data),
        "sae": cfg.sae.name,
        "sweep_dir": str(Path(cfg.sweep_dir).absolute()),
    }
    refs = {}
    for ens in p.ensembles:
        job = EnsembleJob(
            ens,
            str(Path(cfg.sweep_dir).absolute()),
            str(store.path.absolute()),
            cfg.data.normalize,
            cfg.data.eval_rows,
            cfg.train,
            threads=res.threads,
            extra_spec=extra,
            logger=cfg.logger,
        )
        refs[task.remote(job, progress_actor, flag)] = ens
    failures: list[str] = []
    n_runs, done_runs, stopping = sum(len(e.members) for e in p.ensembles), 0, False
    with tqdm(
        total=total_rows, unit="row", unit_scale=True, disable=not cfg.progress, desc="sweep"
    ) as bar:
        pending, started, deadline = list(refs), time.time(), 0.0
        while pending:
            if signals.signum and not stopping:
                stopping, deadline, stopped_at = True, time.time() + STOP_GRACE, signals.when
                _quietly(lambda: flag.set.remote())  # running tasks checkpoint and return
            if stopping and (
                time.time() > deadline
                or _all_checkpointed(cfg, [refs[r] for r in pending], started, stopped_at)
            ):
                # SLURM signals Ray's own processes too: results may never arrive, but every
                # started ensemble has checkpointed (or is past saving); its run folders hold all.
                log.warning(
                    "stopped waiting for %d ensemble(s); their checkpoints are kept", len(pending)
                )
                break
            try:
                ready, pending = ray.wait(pending, num_returns=1, timeout=0.5)
            except ray.exceptions.RayError:
                ready = []
            lock.heartbeat()
            bar.n = min(total_rows, _progress(progress_actor, bar.n))
            for ref in ready:
                ens = refs[ref]
                try:
                    result: EnsembleResult = ray.get(ref)
                    done_runs += sum(1 for s in result.states.values() if s != "interrupted")
                    log.info(
                        "ensemble %s: %s after %d steps (%.1fs)",
                        ens.ensemble_id,
                        "/".join(sorted(set(result.states.values()))),
                        result.steps,
                        result.seconds,
                    )
                except ray.exceptions.RayError as err:
                    if stopping:  # lost while the job was being stopped: its checkpoints stay
                        log.warning(
                            "ensemble %s stopped: %s", ens.ensemble_id, task_error_reason(err)
                        )
                        continue
                    reason = task_error_reason(err)
                    failures.append(f"{ens.ensemble_id}: {reason}")
                    _mark_failed(cfg, ens, reason)
                    log.error("ensemble %s failed: %s", ens.ensemble_id, reason)
            bar.set_postfix_str(f"runs {done_runs}/{n_runs}")
            bar.refresh()
        bar.n = total_rows if not failures else bar.n
    return failures


STOP_GRACE = 30.0  # seconds the driver waits for ensembles to checkpoint after SIGTERM/SIGINT
STOP_FILE = ".stop"  # written by a stopping driver into SWEEP_DIR; workers poll it


def _quietly(call: Callable[[], object]) -> None:
    try:
        call()
    except Exception as err:  # Ray may already be going down with the job
        log.debug("ignored during stop: %s", err)


def _all_checkpointed(
    cfg: SweepConfig, ensembles: list[EnsembleSpec], since: float, stopped: float
) -> bool:
    """Whether every ensemble that started in this sweep wrote its stop marker after ``stopped``."""
    for ens in ensembles:
        for m in ens.members:
            folder = rundir.run_dir(cfg.sweep_dir, m.run_id)
            placed = folder / rundir.PLACEMENT
            if not placed.exists() or rundir.read_json(placed).get("time", 0) < since:
                continue  # never started in this sweep: nothing to wait for
            mark = folder / rundir.INTERRUPTED
            if not mark.exists() or rundir.read_json(mark).get("time", 0) < stopped:
                return False
    return True


def _progress(actor: object, last: float) -> float:
    """Rows trained so far (``last`` if the counter cannot be reached, e.g. during shutdown)."""
    import ray

    try:
        return ray.get(actor.total.remote(), timeout=5)  # type: ignore[attr-defined]
    except (ray.exceptions.RayError, TimeoutError):
        return last


def _mark_failed(cfg: SweepConfig, ens: EnsembleSpec, reason: str) -> None:
    for m in ens.members:
        folder = rundir.run_dir(cfg.sweep_dir, m.run_id)
        folder.mkdir(parents=True, exist_ok=True)
        rundir.atomic_write_json(folder / rundir.FAILED, {"reason": reason, "time": time.time()})
