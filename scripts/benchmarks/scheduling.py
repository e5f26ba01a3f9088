"""Section 5, scheduling makespan: N equal ensembles through ``driver.run_sweep`` on a local Ray
with W (fake) GPUs, vs the ideal sum(ensemble seconds) / W."""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import torch

from sweep import rundir
from sweep.config import TrainConfig
from sweep.io import read_json
from sweep.sweepdir import SweepFolder

from .common import SMALL, Context, Settings
from .ensembles import ensemble_spec, l1_grid, seconds_per_step
from .runs import epochs_for, steps_per_epoch, train_run
from .timing import table, verdict

MEMBERS, TARGET = 2, 1.1


def ensemble_times(sweep_dir: Path) -> dict[str, tuple[float, float]]:
    """Per ensemble, (start, end) wall-clock times from its run folders: the placement time is
    written as the worker starts training, ``DONE`` as each member is finalised."""
    folder = SweepFolder(sweep_dir)
    spans: dict[str, tuple[float, float]] = {}
    for run_id, entry in folder.manifest()["runs"].items():
        run = folder.run(run_id)
        start, end = run.started_at(), read_json(run.path / rundir.DONE)["finished"]
        a, b = spans.get(entry["ensemble"], (start, end))
        spans[entry["ensemble"]] = (min(a, start), max(b, end))
    return spans


def sweep_overrides(
    store: Path, sweep_dir: Path, l1s: list[float], epochs: int, st: Settings, cuda: bool
) -> list[str]:
    return [
        f"sweep_dir={sweep_dir}", "data=chunks", f"data.path={store}", f"data.eval_rows={st.eval_rows}",
        f"grid.l1=[{','.join(repr(v) for v in l1s)}]", f"grid.dict_ratio=[{SMALL.ratio:g}]",
        f"grid.max_members={MEMBERS}", "launch.gpus_per_ensemble=1", "launch.cpus_per_ensemble=1",
        f"train.batch_size={SMALL.batch}", f"train.epochs={epochs}", "train.threads=1",
        f"train.device={'cuda' if cuda else 'auto'}", "progress=false",
    ]  # fmt: skip


def timed_sweep(overrides: list[str], workers: int, ray_tmp: Path) -> dict:
    """``run_sweep`` on a fresh local Ray with ``workers`` GPUs; wall time and run-folder times."""
    import ray

    from sweep.cli import compose
    from sweep.config import to_sweep_config
    from sweep.driver import run_sweep

    cfg = to_sweep_config(compose(overrides))
    ray.init(
        num_cpus=workers, num_gpus=workers, include_dashboard=False, _temp_dir=str(ray_tmp / "ray"),
        configure_logging=False, log_to_driver=False,
    )  # fmt: skip
    try:
        t0_wall, t0 = time.time(), time.perf_counter()
        run_sweep(cfg)
        makespan, t1_wall = time.perf_counter() - t0, time.time()
    finally:
        ray.shutdown()
    spans = ensemble_times(Path(cfg.sweep_dir))
    first, last = min(a for a, _ in spans.values()), max(b for _, b in spans.values())
    return {
        "makespan": makespan, "span": last - first, "startup": first - t0_wall, "tail": t1_wall - last,
        "ensemble_seconds": {e: b - a for e, (a, b) in spans.items()},
    }  # fmt: skip


def run(ctx: Context) -> dict:
    store, st, n, cuda = (
        ctx.stores.get("stream"),
        ctx.st,
        ctx.st.ray_ensembles,
        ctx.device.type == "cuda",
    )
    workers = torch.cuda.device_count() if cuda else 2
    per_epoch = steps_per_epoch(store, SMALL.batch, st.eval_rows)
    sps = seconds_per_step(SMALL, MEMBERS, 1, ctx.device, ctx.timer)
    epochs = epochs_for(st.ray_seconds, sps, per_epoch)
    l1s = l1_grid(n * MEMBERS)
    store.verify()  # cached on disk: the timed sweep does not re-scan the store
    # One ensemble alone, same shape, thread count and (default) checkpoint policy: the
    # no-contention reference.
    alone_cfg = TrainConfig(
        batch_size=SMALL.batch, epochs=epochs, threads=1, device=ctx.device.type
    )
    spec = ensemble_spec(SMALL, l1s[:MEMBERS])
    alone, _ = train_run(Path(store.path), spec, alone_cfg, st.eval_rows, ctx.tmp)
    torch.set_num_threads(ctx.threads)
    ray_tmp = Path(tempfile.mkdtemp(prefix="rb", dir="/tmp"))  # short: Ray's socket paths
    try:
        store_path = Path(store.path).absolute()
        overrides = sweep_overrides(store_path, ray_tmp / "sweep", l1s, epochs, st, cuda)
        timing = timed_sweep(overrides, workers, ray_tmp)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    shape = f"{SMALL.d}x{SMALL.m}, B={SMALL.batch}, {epochs * per_epoch} steps, 1 thread"
    print(
        f"  {n} ensembles of {MEMBERS} members ({shape}) via driver.run_sweep, W={workers} Ray GPUs"
    )
    return report(n, workers, alone, timing)


def report(n: int, workers: int, alone: float, timing: dict) -> dict:
    makespan, span, own = timing["makespan"], timing["span"], timing["ensemble_seconds"]
    ideal, ideal_alone = sum(own.values()) / workers, n * alone / workers
    each = ", ".join(f"{v:.1f}" for v in own.values())
    print(f"  each ensemble's own seconds in the sweep (from its run folders): {each}")
    print(f"  one ensemble alone (worker.train_ensemble, same threads, no Ray): {alone:.1f}")
    rows = [
        ["run_sweep wall vs sum(own) / W", f"{makespan:.1f}", f"{ideal:.1f}", f"{makespan / ideal:.3f}"],
        ["first start..last DONE vs sum(own) / W", f"{span:.1f}", f"{ideal:.1f}", f"{span / ideal:.3f}"],
        ["run_sweep wall vs N x alone / W", f"{makespan:.1f}", f"{ideal_alone:.1f}", f"{makespan / ideal_alone:.3f}"],
    ]  # fmt: skip
    table(["measure", "makespan s", "ideal s", "ratio"], rows)
    startup, tail = timing["startup"], timing["tail"]
    print(
        f"  run_sweep before the first ensemble started: {startup:.1f} s, after the last: {tail:.1f} s"
    )
    ratio = makespan / ideal
    print(f"  makespan (run_sweep wall) / ideal: {ratio:.3f}", end="")
    print(f"  (target <= {TARGET}: {verdict(ratio, TARGET, higher=False)})")
    return {
        "ensembles": n, "workers": workers, "alone_seconds": alone, **timing, "ideal": ideal,
        "ratio": ratio, "span_ratio": span / ideal, "ratio_vs_alone": makespan / ideal_alone, "target": TARGET,
    }  # fmt: skip
