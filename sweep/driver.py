"""``sweep run``: prepare the data, plan, train every pending ensemble through Ray, record.

The story of a sweep, in :func:`run_sweep`: lock the sweep folder, check the config against
what is already there, prepare and verify the store, start Ray, plan (:mod:`sweep.planning`),
write the sweep files, train the ensembles (:mod:`sweep.execution`: Ray tasks, results in
completion order, one progress bar for the whole sweep), record failures and the sweep's state.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

from omegaconf import OmegaConf

from sweep import gpuinfo, grid, launcher, neighbours, planning, rate, reaper
from sweep.activations.shape_notes import refuse_constant, store_notes
from sweep.activations.store import (
    MANIFEST,
    ChunkStore,
    planned_steps,
    rows_to_train,
    total_steps,
)
from sweep.cluster import check_address, check_reachable, resolve
from sweep.config import ChunksDataConfig, SweepConfig, SyntheticDataConfig
from sweep.dead_schedule import never_acts_note
from sweep.devices import resolve_compute_dtype
from sweep.errors import SweepError, os_error_message
from sweep.execution import Execution, Outcome
from sweep.io import (
    STALE_TEMP_SECONDS,
    ensure_writable,
    hashing_map,
    memory_text,
    remove_stale_temps,
)
from sweep.lock import TRAINING, SweepLock
from sweep.planning import SweepPlan
from sweep.rundir import RUNS
from sweep.startup import Laps
from sweep.stop import DriverSignals, Interrupted, StopNow, at_exit_now, quietly, raised_by
from sweep.stop_request import StopRequestWatch
from sweep.sweepdir import (
    LOG,
    REPORT,
    RunRecord,
    SweepFolder,
    default_store_path,
    unwritable_fix,
    write_summary,
)

log = logging.getLogger(__name__)
details = logging.getLogger("sweep.details")  # to sweep.log only, never the terminal
details.propagate = False


def prepare_store(cfg: SweepConfig) -> ChunkStore:
    """Open (and for ``data=synthetic`` / ``data=harvest`` make or reuse) the chunk store."""
    path = store_path(cfg)
    if isinstance(cfg.data, SyntheticDataConfig):
        from sweep.activations.synthetic import ensure_synthetic_store

        # generated on this machine's GPU when there is one, unless the sweep trains on CPU
        gpu = cfg.train.device != "cpu" and _driver_may_use_gpus(path)
        device = "auto" if gpu else "cpu"
        return ensure_synthetic_store(cfg.data, path, device, cfg.progress, owns_store(cfg))
    if cfg.data.name == "harvest":  # harvest-then-train; skipped when the store is complete
        from sweep.activations.harvest import ensure_harvest_store

        cpu = "cpu" in (cfg.data.device, cfg.train.device)  # (its context blocks no training)
        here = cpu or _driver_may_use_gpus(path)  # else in a Ray task, whose process then exits
        return ensure_harvest_store(cfg.data, path, cfg.launch, cfg.progress, in_process=here)
    return ChunkStore(path)


def store_path(cfg: SweepConfig) -> Path:
    """Where the sweep's store is: ``data.path``, else ``<sweep_dir>/store``."""
    return Path(cfg.data.path or default_store_path(cfg.sweep_dir))


def owns_store(cfg: SweepConfig) -> bool:
    """Whether the sweep's store is its own ``<sweep_dir>/store`` (under its lock), which it
    may clear; a store elsewhere may be another sweep's."""
    own = default_store_path(cfg.sweep_dir)
    return not cfg.data.path or store_path(cfg).expanduser().resolve() == own.resolve()


def _driver_may_use_gpus(store: str | Path) -> bool:
    """Whether the driver may make a store on this machine's GPU: not when the GPUs take one
    process each, as the CUDA context it would keep for the whole sweep would keep GPU 0 from
    training (the store is complete and nothing runs: no question to ask)."""
    if (Path(store) / MANIFEST).is_file() or not gpuinfo.exclusive_here():
        return True
    log.info("the GPUs are in exclusive compute mode: the driver makes the store without one")
    return False


def run_sweep(cfg: SweepConfig) -> list[RunRecord]:
    """Plan, train every pending ensemble through Ray; returns every run as recorded.

    A run refused before training (bad store, changed settings, a stop) writes nothing into
    an existing sweep folder, and leaves no new one behind."""
    SweepFolder(cfg.sweep_dir).refuse_store()
    SweepFolder(cfg.sweep_dir).load_config()  # (another tool's, or damaged: before the lock)
    made = _create(Path(cfg.sweep_dir))
    fix = unwritable_fix(Path(cfg.sweep_dir))
    folder = SweepFolder(ensure_writable(cfg.sweep_dir, "sweep_dir", fix))
    outcome, laps = Outcome(), Laps()
    try:
        with driving(folder, outcome, cfg) as lock:
            check_config(cfg, folder)
            cfg = kept_group(cfg, folder)  # (before config.yaml is written again)
            finished = recorded_finished_plan(cfg, folder)  # (its store may be gone)
            laps.lap("config checks")
            store = None if finished else checked_store(cfg, folder, laps)
            records = _train(cfg, folder, store, finished, lock, outcome, laps)
            logged(outcome.raise_if_unfinished)  # (in sweep.log too)
    except SweepError:
        if made and outcome.locked and outcome.signals and outcome.signals.immediate:
            _remove_refused(folder, made)
        raise
    return records


@contextlib.contextmanager
def driving(
    folder: SweepFolder, outcome: Outcome, cfg: SweepConfig, *asking: str, doing: str = TRAINING
) -> Iterator[SweepLock]:
    """Be the sweep's driver: signals handled (:class:`DriverSignals`, ``asking`` what its
    line says a stop asks of the ensembles), ``sweep.log`` written, the sweep's lock held
    (saying what it is ``doing``, for ``sweep status``, and where its local Ray lives);
    ``outcome`` records the signals and that the lock is held."""
    ray = None if cfg.launch.address else str(reaper.ray_temp_root(cfg.launch.temp_dir))
    with DriverSignals(folder.request_stop, *asking) as signals, sweep_log(folder):
        lock = SweepLock(folder.path, doing, ray)  # (released at a signal from before it is taken:
        with at_exit_now(lambda _line: lock.release()), lock:  # release checks it is ours)
            outcome.signals, outcome.locked = signals, True
            with StopRequestWatch(folder.path, lock.info, signals):  # ('sweep stop')
                yield lock


def clear_leftovers(cfg: SweepConfig, folder: SweepFolder, lock: SweepLock) -> None:
    """What an earlier driver left: its stop request (stopped), its rate file and, killed
    outright on this host, the Ray processes it could not shut down (:mod:`sweep.reaper`)."""
    folder.clear_stop()
    rate.forget(folder.path)
    if not cfg.launch.address:
        reaper.reap(cfg.launch.temp_dir, lock.stale)


def _gpu_neighbours(
    cfg: SweepConfig, res: launcher.Resources, folder: SweepFolder
) -> contextlib.AbstractContextManager:
    """A local sweep training on this machine's GPUs says so to the others (and hears of
    theirs: :mod:`sweep.neighbours`)."""
    if cfg.launch.address or not res.on_gpu:
        return contextlib.nullcontext()
    import ray

    gpus = neighbours.visible_gpus(int(ray.cluster_resources().get("GPU", 0)))
    return neighbours.training_on(gpus, folder.path.absolute())


def compute_dtype(cfg: SweepConfig, res: launcher.Resources) -> str:
    """What ``train.dtype=auto`` means for this sweep (recorded in config.yaml, so a resume on
    other hardware cannot silently change it): bfloat16 when the ensembles train on CUDA GPUs
    (this machine's or the cluster's nodes', :mod:`sweep.gpuinfo`; or ``train.device=cuda``;
    tf32 for JumpReLU's ``log`` recipe), else float32."""
    saved = planning.recorded_dtype(SweepFolder(cfg.sweep_dir))
    if cfg.train.dtype == "auto" and saved not in (None, "auto"):
        return saved  # an existing sweep keeps its precision
    gpu_auto = cfg.sae.architecture().gpu_dtype
    return resolve_compute_dtype(cfg.train.dtype, on_cuda(cfg, res), gpu_auto)


def on_cuda(cfg: SweepConfig, res: launcher.Resources) -> bool:
    """Whether the ensembles train on CUDA GPUs (not only on Ray's count of GPUs)."""
    return cfg.train.device == "cuda" or (res.on_gpu and res.real_gpus)


def _create(path: Path) -> list[Path]:
    """The folders this process created to make ``path``, ``path`` first ([] where it was
    there, or could not be made): a refused run removes them again."""
    # (a ``..`` after a folder yet to be made is judged as the kernel will read it then)
    missing = [p for p in (path, *path.parents) if not os.path.exists(os.path.realpath(p))]
    try:
        path.mkdir(parents=True)
    except OSError:
        return []  # there (FileExistsError), or ensure_writable reports it
    return missing


def _remove_refused(folder: SweepFolder, made: list[Path]) -> None:
    """Undo a refused run's new sweep folder (and the folders ``made`` for it), but keep a
    store it made or began (a harvest can take hours; the corrected command reuses it, or
    resumes it where it stopped)."""
    store = default_store_path(folder.path)
    for child in folder.path.iterdir():
        if child == store and store.is_dir() and any(store.iterdir()):
            continue
        shutil.rmtree(child, ignore_errors=True) if child.is_dir() else child.unlink(True)
    for path in made:  # (deepest first; one not empty, or named with "..", stays)
        with contextlib.suppress(OSError):
            path.rmdir()


def checked_store(
    cfg: SweepConfig, folder: SweepFolder, laps: Laps | None = None, training: bool = True
) -> ChunkStore:
    """What can refuse the run's store before any training (after :func:`check_config`),
    with the store it trains on (``laps``: times making or opening it, then checking it;
    ``training``: :func:`check_store_fits`'s)."""
    laps = laps or Laps()
    _warn_store_gone(cfg, folder)
    store = prepare_store(cfg)
    laps.lap("store")
    check_store_fits(cfg, folder, store, training=training)
    laps.lap("store checks")
    return store


def _store_gone(cfg: SweepConfig, folder: SweepFolder) -> Path | None:
    """The ``data.path`` of a synthetic or harvested store a sweep began on, where it holds
    no store now (None: it does, or the sweep is new, or its store is its own folder's)."""
    path = store_path(cfg)
    if cfg.data.name == "chunks" or folder.saved_config() is None or owns_store(cfg):
        return None
    return None if (path.expanduser() / MANIFEST).is_file() else path


def _refuse_store_around(cfg: SweepConfig, folder: SweepFolder) -> None:
    """Refused: a store in a folder the sweep writes (``runs/``, ``report/``), and a store
    to be made (synthetic, harvested) in the sweep folder itself or in a folder it lies in
    (the store's folder would hold the sweep's files: never a store)."""
    if not cfg.data.path:
        return
    store, sweep = Path(cfg.data.path).expanduser().resolve(), folder.path.resolve()
    written = next((d for d in (RUNS, REPORT) if sweep / d in (store, *store.parents)), None)
    if written:
        where = f"lies in the sweep's {written}/ folder, which sweep writes"
    elif isinstance(cfg.data, ChunksDataConfig):
        return  # (data=chunks: data.path must hold a store, as is checked)
    elif store == sweep:
        where = "is sweep_dir itself"
    elif store in sweep.parents and not (store / MANIFEST).is_file():
        where = f"holds sweep_dir {folder.path}"
    else:
        return
    raise SweepError(
        f"data.path {cfg.data.path} {where}; leave data.path out (the store then goes in "
        f"{default_store_path(folder.path)}) or name a folder outside the sweep's"
    )


def _refuse_mistyped_store(cfg: SweepConfig, folder: SweepFolder) -> None:
    """Refused where ``data.path`` holds no store while the store the sweep trained on is
    still where it was recorded (a mistyped ``data.path``): before anything, a finished
    grid's run too (its config.yaml would record the typo, and a later grid make a new
    store there)."""
    path = _store_gone(cfg, folder)
    recorded = None if path is None else _recorded_store(folder)
    if recorded is not None and recorded != path and (recorded / MANIFEST).is_file():
        raise SweepError(
            f"data.path {path} holds no store, and this sweep's store is still at {recorded}; "
            f"leave data.path out (or pass data.path={recorded})"
        )


def _warn_store_gone(cfg: SweepConfig, folder: SweepFolder) -> None:
    """A sweep that began on a store of its ``data.path`` that is gone makes it again (the same
    rows: a synthetic store from its seed, a harvest from its model and text), at a cost of
    time and disk a moved store did not need: said before it begins."""
    path = _store_gone(cfg, folder)
    if path is not None:
        log.warning(
            "the store this sweep trained on is not at %s: making it again there (the same "
            "rows); if it was moved, stop (Ctrl-C) and pass data.path=<where it is now>",
            path,
        )


def _recorded_store(folder: SweepFolder) -> Path | None:
    """Where the sweep's saved config puts its store (None if that config cannot say)."""
    try:
        saved = folder.load_config() or {}
    except SweepError:
        return None
    data = saved.get("data") or {}
    return Path(data.get("path") or default_store_path(folder.path)).expanduser()


def check_config(cfg: SweepConfig, folder: SweepFolder) -> None:
    """What refuses a run before its store is made (``sweep run --plan`` refuses it too),
    and a warning for a setting that does nothing."""
    folder.refuse_store()
    planning.check_local_hardware(cfg)
    check_address(cfg.launch)
    if cfg.launch.address:  # a head that is not there: refused before the store is made
        check_reachable(resolve(cfg.launch.address))
    else:
        planning.check_temp_dir(cfg.launch.temp_dir)
    planning.check_compatible(folder, cfg)
    _refuse_store_around(cfg, folder)
    _refuse_mistyped_store(cfg, folder)
    if isinstance(cfg.data, SyntheticDataConfig):
        planning.expand_grid(cfg, cfg.data.width)  # k too large: refused before generating
        planning.check_recorded_sizes(folder, cfg.grid.dict_ratio, cfg.data.width)
        if cfg.data.path and Path(cfg.data.path).is_file():
            raise SweepError(
                f"data.path {cfg.data.path} is a file; give a folder for the synthetic store "
                "(or leave data.path unset: <sweep_dir>/store)"
            )
    inert = cfg.inert_note()
    if inert:
        log.warning(inert)


def check_store_fits(
    cfg: SweepConfig,
    folder: SweepFolder,
    store: ChunkStore,
    verify: bool = True,
    training: bool = True,
) -> None:
    """Refuse a store other than the sweep's, one k does not fit, a damaged one (``verify``:
    its checksums, hashed once and cached), or one too small for a batch; warn of a schedule
    too short to train or to find dead latents (``training``: not for an evaluation, which
    trains nothing). A new sweep also refuses rows that do not vary and warns of what the
    store's rows say (:mod:`sweep.activations.shape_notes`: once, where it can still be acted
    on)."""
    new = folder.saved_config() is None
    planning.expand_grid(cfg, store.width)
    planning.check_recorded_sizes(folder, cfg.grid.dict_ratio, store.width)
    planning.check_store(folder, store)
    if new:
        refuse_constant(store.manifest["stats"], store.path)  # (before any worker meets it)
    if verify:
        store.verify(elsewhere=folder.store_verified)
    else:  # (`--plan`: the chunks are the run's to hash; the small ground truth is checked)
        store.check_ground_truth()
    notes = [held_out_note(cfg.data.eval_rows, store.total_rows, new)]
    if training:
        t = cfg.train
        notes += schedule_notes(cfg, total_steps(store, t.batch_size, t.epochs, cfg.data.eval_rows))
    if new:
        chunks = [int(c["rows"]) for c in store.chunks]
        notes.append(skipped_rows_note(chunks, cfg.train.batch_size, cfg.data.eval_rows))
        tail = store.tail_rows(cfg.data.eval_rows)
        stats, arch = store.manifest["stats"], cfg.sae.architecture()
        d = cfg.data
        notes += store_notes(stats, tail, d.eval_rows, d.normalize, arch, max(cfg.learning_rates()))
    for note in notes:
        if note:
            log.warning(note)


def schedule_notes(cfg: SweepConfig, steps: int) -> list[str | None]:
    """Warnings of a training schedule of ``steps`` too short for the architecture to
    respond to its sparsity knob, or for a dead-latent remedy to act, and of snapshots it
    cannot keep apart."""
    mean_lr = min(cfg.learning_rates()) * cfg.train.mean_lr_scale()  # warm-up, decay included
    arch = cfg.sae.architecture()
    checks = [arch.check_schedule(steps, mean_lr), never_acts_note(cfg.train, arch, steps)]
    return [*checks, cfg.train.snapshots_note(steps)]


SKIPPED_SHARE = 0.05
"""Above this share of the training rows left out by whole batches, a sweep says so."""


def skipped_rows_note(chunk_rows: list[int], batch_size: int, eval_rows: int) -> str | None:
    """A warning when batches, which never cross a chunk boundary, leave much of each chunk's
    training rows out (a remainder below one batch per chunk); ``chunk_rows``: the store's
    chunks' rows (of one not made yet, too)."""
    rows = sum(rows_to_train(chunk_rows, eval_rows))
    used = planned_steps(chunk_rows, batch_size, 1, eval_rows) * batch_size
    if rows - used <= SKIPPED_SHARE * rows:
        return None
    return (
        f"{rows - used} of the store's {rows} training rows ({(rows - used) / rows:.0%}) are "
        f"never trained on: batches do not cross chunks, and what is left of a chunk after "
        f"its whole batches of train.batch_size={batch_size} is skipped; choose a batch size "
        "that divides the chunks' rows, or a store with larger chunks"
    )


HELD_OUT_SHARE = 0.25
"""Above this share of the store held out for evaluation, a sweep says so."""


def held_out_note(eval_rows: int, total_rows: int, new: bool) -> str | None:
    """A warning when ``data.eval_rows`` keeps much of a small store from training (``new``:
    no sweep has recorded it yet; in one that has, it defines the runs)."""
    if eval_rows <= HELD_OUT_SHARE * total_rows:
        return None
    where = "" if new else " in a new sweep_dir"
    return (
        f"data.eval_rows={eval_rows} holds out {eval_rows / total_rows:.0%} of the store's "
        f"{total_rows} rows from training; lower it{where} (e.g. data.eval_rows="
        f"{max(total_rows // 10, 1)}) or use a larger store"
    )


def _train(
    cfg: SweepConfig,
    folder: SweepFolder,
    store: ChunkStore | None,
    finished: tuple[SweepConfig, SweepPlan] | None,
    lock: SweepLock,
    outcome: Outcome,
    laps: Laps,
) -> list[RunRecord]:
    """Start Ray, plan, write the sweep files, train; record every run and the outcome. No
    Ray when every run of the grid is final (``finished``, found without the store, which is
    then None; else looked for here). ``laps``: the start-up so far, recorded with the rest
    of it (:mod:`sweep.startup`)."""
    clear_leftovers(cfg, folder, lock)
    remove_stale_temps(folder.path, older_than=STALE_TEMP_SECONDS)
    try:
        if finished is None and store is not None:
            finished = finished_plan(cfg, folder, store.width)
        if finished is not None:  # nothing to train: no Ray (seconds to start)
            cfg, p = finished
            _write_sweep_files(folder, cfg, p, store)
            log.info(
                "every run of the grid (%d) is already finished; nothing to train", len(p.runs)
            )
        else:
            assert store is not None
            p = _train_on_ray(cfg, folder, store, lock, outcome, laps)
        ours = {r.run_id for r in p.runs}  # (hashed when planned; an earlier grid's not yet)
        records = folder.read_runs(live=False, deep=True, trusted=ours)  # every run of the sweep
        outcome.all_final = all(r.state.final for r in records if r.run_id in ours)
        record_end(folder, records, outcome)
    except (StopNow, SystemError) as err:  # a second signal (inside Ray's C code: wrapped)
        if raised_by(err, StopNow) is not None:  # what `sweep status` then says of the sweep
            quietly(lambda: folder.record_state("interrupted"))
        raise
    return records


def record_end(folder: SweepFolder, records: list[RunRecord], outcome: Outcome) -> None:
    """Write summary.csv and the sweep's state. Where that fails after ensembles failed or a
    stop (a full disk often did both), the write's error is said and the sweep's own ending
    (the failures, the stop: what to act on, with its exit code) stays the last line."""
    try:
        write_summary(folder.path, [r.row() for r in records])
        folder.record_state(outcome.state)
    except (OSError, SweepError) as err:
        if not (outcome.failures or outcome.signum):
            raise
        said = os_error_message(err, True) if isinstance(err, OSError) else str(err)
        log.error("could not record the sweep's end: %s", said)


def _train_on_ray(
    cfg: SweepConfig,
    folder: SweepFolder,
    store: ChunkStore,
    lock: SweepLock,
    outcome: Outcome,
    laps: Laps,
) -> SweepPlan:
    """Start Ray, plan on the hardware it finds, write the sweep files and train the plan
    (which is returned)."""
    assert outcome.signals is not None
    laps.lap("sweep folder")
    early = launcher.early_gpu_probe(cfg)
    went_well = lambda: not outcome.failures  # noqa: E731 (Ray's logs kept for them)
    session = launcher.ray_session(cfg.launch, outcome.shutdown_wait, went_well)
    with session, contextlib.ExitStack() as held:
        laps.lap("Ray")
        res = launcher.Resources.of_cluster(cfg, early)
        held.enter_context(_gpu_neighbours(cfg, res, folder))
        laps.lap("hardware")
        cfg, p = plan_for(cfg, folder, res, store.width, store.staged_bytes(), store.path)
        _write_sweep_files(folder, cfg, p, store)
        laps.lap("plan")
        folder.record_startup(laps.record())
        details.info(laps.text())
        if p.skipped:
            log.info("%d of %d runs already done; skipping them", len(p.skipped), len(p.runs))
        outcome.signals.training()
        Execution(cfg, folder, p, store, res, lock, outcome).run()
    return p


def recorded_finished_plan(
    cfg: SweepConfig, folder: SweepFolder, tidy: bool = True
) -> tuple[SweepConfig, SweepPlan] | None:
    """:func:`finished_plan` at the width the sweep recorded, when its store is gone (deleted
    to free the disk: a synthetic store or a harvest is not made again to train nothing);
    None without a recorded width, or while the store is there (checked as ever)."""
    if (store_path(cfg) / MANIFEST).is_file():
        return None
    width = folder.manifest().get("width")
    if not isinstance(width, int) or isinstance(width, bool) or width < 1:
        return None
    return finished_plan(cfg, folder, width, tidy)


def finished_plan(
    cfg: SweepConfig, folder: SweepFolder, width: int, tidy: bool = True
) -> tuple[SweepConfig, SweepPlan] | None:
    """The config to record and the (empty) plan when every run of the grid is final and
    verifies, and ``train.dtype`` needs no look at the hardware; else None (planned with Ray,
    which warns of a damaged run). ``tidy=False`` writes nothing (a preview)."""
    dtype = cfg.train.dtype if cfg.train.dtype != "auto" else planning.recorded_dtype(folder)
    if dtype in (None, "auto"):
        return None
    cfg = replace(cfg, train=replace(cfg.train, dtype=dtype))
    runs = planning.expand_grid(cfg, width)
    folders = [folder.run(r.run_id) for r in runs]
    if not all(f.is_done() for f in folders):
        return None  # (cheap checks first: a sweep with runs to train hashes nothing here)
    planning.check_compatible(folder, cfg)  # (before a run's verification is remembered)
    if not all(hashing_map(lambda f: f.is_done(deep=True, remember=tidy), folders)):
        return None
    for f in folders if tidy else ():
        f.clear_checkpoints()  # left when its ensemble stopped while finishing
    return cfg, SweepPlan(runs, [r.run_id for r in runs], [])


def plan_for(
    cfg: SweepConfig,
    folder: SweepFolder,
    res: launcher.Resources,
    width: int,
    staged: int,
    store: str | Path,
    tidy: bool = True,
) -> tuple[SweepConfig, SweepPlan]:
    """The sweep's config with ``train.dtype`` resolved for ``res``, and its plan on a store
    of this width (``staged``: its batch stream's bytes on a GPU; ``tidy``: see
    :func:`sweep.planning.plan`)."""
    cfg, budget = on_hardware(cfg, res, staged, store)
    planning.check_compatible(folder, cfg)
    return cfg, planning.plan(cfg, width, budget, res.on_gpu, res.slots, tidy)


def on_hardware(
    cfg: SweepConfig, res: launcher.Resources, staged: int, store: str | Path
) -> tuple[SweepConfig, float]:
    """The sweep's config with ``train.dtype`` resolved for ``res``, and the device bytes each
    ensemble's members may plan for (:func:`device_budget`)."""
    if str(cfg.train.cuda_graphs).lower() == "true" and not res.on_gpu:
        raise SweepError(
            "train.cuda_graphs=true needs a GPU but the ensembles would train on CPUs (the Ray "
            "cluster has no GPUs); use train.cuda_graphs=auto, or run where there are GPUs"
        )
    cfg = replace(cfg, train=replace(cfg.train, dtype=compute_dtype(cfg, res)))
    _warn_too_coarse(cfg)
    return cfg, device_budget(staged, store, res)


def _warn_too_coarse(cfg: SweepConfig) -> None:
    """Warn of bfloat16 compute (asked for, or recorded) with a recipe it is too coarse for."""
    arch = cfg.sae.architecture()
    if cfg.train.dtype == "bfloat16" and arch.gpu_dtype != "bfloat16":
        log.warning(
            "train.dtype=bfloat16 is too coarse for sae=%s sae.recipe=%s (its straight-through "
            "window is narrower than bfloat16's spacing of pre-activations: threshold gradients "
            "come out wrong per feature); use train.dtype=%s",
            cfg.sae.name,
            arch.recipe,
            arch.gpu_dtype,
        )


def device_budget(staged: int, store: str | Path, res: launcher.Resources) -> float:
    """The device bytes each ensemble's members plan with (:data:`grid.MEMORY_USE` of them)
    once its batch stream has staged two of the store's chunks on the GPU (``staged`` bytes,
    counted against that same share, as ``launch.gpus_per_ensemble=auto`` counts them);
    refused when those alone take half of what may be planned."""
    if not res.on_gpu:
        return res.device_bytes
    plannable = grid.MEMORY_USE * res.device_bytes
    if staged > plannable / 2:
        more = (
            "" if res.auto_share or res.num_gpus >= 1 else " or a larger launch.gpus_per_ensemble"
        )
        raise SweepError(
            f"store {store}: two of its chunks staged on the GPU need {memory_text(staged)}, "
            f"over half of the {memory_text(plannable)} an ensemble may plan for (of "
            "launch.device_memory_gb, or the GPU's free memory); use a store with a smaller "
            f"data.rows_per_chunk{more}"
        )
    return res.device_bytes - staged / grid.MEMORY_USE  # (members + staged <= 80%)


class _QuietFileHandler(logging.FileHandler):
    """``sweep.log``: a line that cannot be written (a full disk, a read-only folder) is
    dropped, never raised in place of the error being logged."""

    def emit(self, record: logging.LogRecord) -> None:
        try:  # (Python 3.11 opens a delayed file outside the try that calls handleError)
            super().emit(record)
        except OSError:
            pass

    def handleError(self, record: logging.LogRecord) -> None:
        pass


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


@contextlib.contextmanager
def sweep_log(folder: SweepFolder) -> Iterator[None]:
    """While the driver runs, log to ``SWEEP_DIR/sweep.log`` too (from before it takes the
    lock: a stale lock's takeover, the config's warnings, a stop during start-up), with the
    traceback of any unexpected error (the terminal gets one line; a SweepError's line says
    it all). The file is made by the first line logged."""
    handler = _QuietFileHandler(folder.path / LOG, delay=True)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    logging.getLogger("sweep").addHandler(handler)
    details.addHandler(handler)
    try:
        with at_exit_now(lambda line: _append_line(folder.path / LOG, line)):
            yield
    except (StopNow, Exception) as err:
        stop = raised_by(err, StopNow)  # a second signal (inside Ray's C code: a SystemError)
        if stop is not None:
            details.warning("interrupted: %s", stop)
        elif not isinstance(err, SweepError):
            details.exception("the sweep stopped with this error")
        raise
    finally:
        logging.getLogger("sweep").removeHandler(handler)
        details.removeHandler(handler)
        handler.close()


def logged(check: Callable[[], None]) -> None:
    """Run ``check``, putting the one line it may raise (the sweep's outcome: stopped, or
    ensembles failed) into ``sweep.log`` too. Refusals before training are not logged: they
    leave an existing sweep folder as it was."""
    try:
        check()
    except Interrupted as err:
        details.warning("interrupted: %s", err)
        raise
    except SweepError as err:
        details.error("error: %s", err)
        raise


def _append_line(path: Path, message: str) -> None:
    """A warning in ``sweep.log``'s format, with plain ``os`` calls (from a signal handler)."""
    record = logging.LogRecord(__name__, logging.WARNING, "", 0, message, (), None)
    line = logging.Formatter(LOG_FORMAT).format(record) + "\n"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def kept_group(cfg: SweepConfig, folder: SweepFolder) -> SweepConfig:
    """``logger.group`` resolved, and kept across runs: unless given, the group config.yaml
    recorded, else the sweep folder's name (a renamed sweep's runs stay in their wandb group)."""
    if cfg.logger.group:
        return cfg
    saved = ((folder.load_config() or {}).get("logger") or {}).get("group")
    group = saved or folder.path.absolute().name
    return replace(cfg, logger=replace(cfg.logger, group=group))


def absolute_path(path: str) -> str:
    """``path`` made absolute, its ``..`` folded away where that names the same folder (not
    where a symbolic link comes before it)."""
    full = Path(path).expanduser().absolute()
    tidy = Path(os.path.normpath(full))
    try:
        return str(tidy if tidy == full or os.path.samefile(tidy, full) else full)
    except OSError:  # (one of them not there: as given)
        return str(full)


def _write_sweep_files(
    folder: SweepFolder, cfg: SweepConfig, p: SweepPlan, store: ChunkStore | None
) -> None:
    if cfg.data.path:  # (a resume from another folder finds a store given relative to this one)
        where = absolute_path(cfg.data.path)
        if owns_store(cfg) and not isinstance(cfg.data, ChunksDataConfig):
            where = None  # its <sweep_dir>/store: it moves with the sweep folder
        cfg = replace(cfg, data=replace(cfg.data, path=where))
    folder.write_config(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    folder.write_manifest([r.as_dict() for r in p.runs], p.ensemble_of(), store, grid=True)
