"""Section 6, a real sweep end to end: the training-phase rows/s of ``sweep run`` divided by the
pure ``Ensemble.step`` rate of the same ensembles, the checkpoint overhead, GPU utilisation
sampled meanwhile (``nvidia-smi``), and the whole wall time split into start-up, data
generation, training and evaluation.

On CUDA the sizes are the issue's (20M rows of width 512 in fp16, dict ratios 8 and 32, 8 L1
values, batch 4096, bf16; target ratio >= 0.85, checkpoints < 2%); on CPU (and ``--quick``) a
small sweep exercises the same code.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from sweep import rundir
from sweep.activations.store import VERIFIED
from sweep.activations.synthetic import ensure_synthetic_store
from sweep.config import SyntheticDataConfig, TrainConfig
from sweep.devices import release_device_memory
from sweep.io import read_json
from sweep.restore import use_compile, use_cuda_graphs
from sweep.startup import PHASES
from sweep.sweepdir import SweepFolder

from .common import Context, Size
from .ensembles import init_members, l1_grid, make_batches, make_ensemble
from .timing import table, verdict

TARGET, CKPT_TARGET = 0.85, 0.02
CKPT_EVERY = 500
"""Steps between checkpoints: far more often than the default's every 10 minutes, so the
periodic (asynchronous) snapshots are exercised and their cost measured, conservatively."""


@dataclass(frozen=True)
class Plan:
    rows: int
    width: int
    ratios: tuple[float, ...]
    l1s: int
    batch: int
    dtype: str


def plan_for(ctx: Context) -> Plan:
    """The issue's sizes on CUDA (``SWEEP_E2E_ROWS`` overrides the rows, ``SWEEP_E2E_RATIOS``
    the dict ratios, e.g. ``4,8,16,32`` for issue 9's packing comparison); small on CPU."""
    if ctx.device.type == "cuda" and ctx.st.repeats > 1:
        rows = int(os.environ.get("SWEEP_E2E_ROWS", 20_000_000))
        ratios = os.environ.get("SWEEP_E2E_RATIOS", "8,32").split(",")
        return Plan(rows, 512, tuple(float(r) for r in ratios if r.strip()), 8, 4096, "bfloat16")
    return Plan(400_000, 64, (2.0, 4.0), 4, 1024, "float32")


def make_store(p: Plan, path: Path, device: torch.device) -> tuple[Path, float, float]:
    """The store (generated on ``device`` where the generator supports it), the seconds its
    generation took and the seconds a first verification (sha256 + NaN scan) takes."""
    cfg = SyntheticDataConfig(
        width=p.width, n_features=4 * p.width, rows=p.rows, dtype="float16", eval_rows=16_384
    )
    t0 = time.perf_counter()
    store = ensure_synthetic_store(cfg, path, device)
    t1 = time.perf_counter()
    (path / VERIFIED).unlink(missing_ok=True)
    store.verify()
    return path, t1 - t0, time.perf_counter() - t1


class GpuSampler:
    """``nvidia-smi`` utilisation samples (every 0.5 s, each stamped with the host's clock as it
    arrives) while a block runs; none on CPU."""

    def __init__(self, device: torch.device) -> None:
        self.on = device.type == "cuda" and shutil.which("nvidia-smi") is not None
        self.samples: list[tuple[float, float]] = []
        """(time.time(), utilisation %) pairs."""

    def __enter__(self) -> GpuSampler:
        if self.on:
            cmd = ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"]
            self.proc = subprocess.Popen([*cmd, "-lms", "500"], stdout=subprocess.PIPE, text=True)
            self.reader = threading.Thread(target=self._read, daemon=True)
            self.reader.start()
        return self

    def _read(self) -> None:
        for line in self.proc.stdout:  # type: ignore[union-attr]
            if line.strip().isdigit():
                self.samples.append((time.time(), float(line)))

    def __exit__(self, *exc: object) -> None:
        if self.on:
            self.proc.terminate()
            self.proc.wait(timeout=10)
            self.reader.join(timeout=10)

    def mean(self, start: float = 0.0, end: float = float("inf")) -> float | None:
        """Mean utilisation of the samples in ``[start, end]`` (None: none there)."""
        xs = [u for t, u in self.samples if start <= t <= end]
        return sum(xs) / len(xs) if xs else None


def run_sweep(p: Plan, store: Path, sweep_dir: Path, ctx: Context, share: str = "auto") -> float:
    from sweep.cli import compose
    from sweep.config import to_sweep_config
    from sweep.driver import run_sweep as run

    overrides = [
        f"sweep_dir={sweep_dir}", "data=chunks", f"data.path={store}",
        f"grid.l1=[{','.join(f'{v:g}' for v in l1_grid(p.l1s))}]",
        f"grid.dict_ratio=[{','.join(f'{r:g}' for r in p.ratios)}]",
        f"train.batch_size={p.batch}", f"train.dtype={p.dtype}",
        f"train.device={ctx.device.type}", f"train.threads={ctx.threads}", "progress=false",
        f"launch.gpus_per_ensemble={share}", f"train.checkpoint_every={CKPT_EVERY}",
        f"train.compile={COMPILE}",
    ]  # fmt: skip
    cfg = to_sweep_config(compose(overrides))
    t0 = time.perf_counter()
    run(cfg)
    return time.perf_counter() - t0


def ensemble_timings(sweep_dir: Path) -> dict[str, dict]:
    """Per ensemble: its members, the worker's timings (placement.json) and its time span."""
    folder = SweepFolder(sweep_dir)
    out: dict[str, dict] = {}
    for run_id, entry in folder.manifest()["runs"].items():
        run = folder.run(run_id)
        e = out.setdefault(entry["ensemble"], {"members": 0, "ratio": entry["dict_ratio"]})
        e["members"] += 1
        placement = read_json(run.path / rundir.PLACEMENT)
        e["timings"], e["gpu_share"] = placement["timings"], placement.get("gpu_share")
        e["start"], e["task_began"] = run.started_at(), placement.get("task_began")
        e["program"] = placement.get("program")
    return out


def startup_split(sweep_dir: Path, timings: dict[str, dict], t_start: float) -> dict:
    """The start-up's parts (seconds): the driver's phases (the manifest's ``startup``,
    :data:`sweep.startup.PHASES`), then the first worker's launch (from the plan's end: the
    driver's execution set-up, its progress actor, Ray's process start), its imports and
    set-up before it started, its restore and its first compile; printed on one line."""
    driver = dict(SweepFolder(sweep_dir).manifest().get("startup", {}))
    began = driver.pop("began", t_start)
    split = {"before the driver": began - t_start}
    split.update({k: driver[k] for k in PHASES if k in driver})
    e = min(timings.values(), key=lambda e: e["start"])
    if e.get("task_began"):
        split["worker launch"] = e["task_began"] - began - sum(driver.values())
        split["worker imports"] = e["start"] - e["task_began"]
    split.update(restore=e["timings"].get("restore", 0.0), compile=e["timings"].get("compile", 0.0))
    print("  start-up: " + ", ".join(f"{k} {v:.1f} s" for k, v in split.items()), flush=True)
    return split


def step_rate(p: Plan, ratio: float, members: int, ctx: Context) -> float:
    """rows x members / s of the pure fast ``Ensemble.step`` at this shape (no data, no I/O),
    configured as the worker configures the sweep's (compiled per ``train.compile`` as
    :data:`COMPILE` sets it, and then replayed as CUDA graphs as ``train.cuda_graphs=auto``
    does; the gradient clip, the compute dtype): the same step, and on CUDA the same compiled
    kernels, reused from inductor's cache."""
    size = Size("e2e", p.width, round(ratio * p.width), p.batch)
    train = TrainConfig(compile=COMPILE)
    compiled = use_compile(train, ctx.device)  # as the sweep runs it
    graphs = use_cuda_graphs(train, ctx.device)
    members_ = init_members(size, members, ctx.device)
    ens = make_ensemble(members_, l1_grid(members), compiled=compiled, cuda_graphs=graphs)
    ens.autocast_dtype = torch.bfloat16 if p.dtype == "bfloat16" else None
    ens.grad_clip = None if train.grad_clip is None else train.grad_clip / p.width  # (worker's)
    xs = make_batches(size, 4, ctx.device)
    for x in xs:
        ens.step(x, full=False)
    n = iter(range(10**9))
    sec = ctx.timer.per_call(lambda: ens.step(xs[next(n) % 4], full=False), ctx.st.min_time)
    ens.release_training_state()  # (its CUDA graphs' memory too)
    return p.batch * members / sec


COMPILE = os.environ.get("SWEEP_E2E_COMPILE", "auto")
"""The sweep's ``train.compile`` (``auto``: the default's program; ``true`` to measure the
compiled step's sweep where the default does not compile it)."""

SHARES = os.environ.get("SWEEP_E2E_SHARES", "auto")
"""``launch.gpus_per_ensemble`` values to run the sweep with (comma-separated; the first is
the one analysed in detail), e.g. ``auto,0.25,0.5,1`` to see how close auto comes to the best
fixed share."""


def run(ctx: Context) -> dict:
    p = plan_for(ctx)
    store, gen_s, verify_s = make_store(p, ctx.tmp / "store-e2e", ctx.device)
    print(f"  store: generated in {gen_s:.1f} s, first verification {verify_s:.1f} s", flush=True)
    shares = [v.strip() for v in SHARES.split(",") if v.strip()] or ["auto"]
    walls, figures = {}, {"plan": p.__dict__, "generation_s": gen_s, "verify_s": verify_s}
    for share in shares:
        sweep_dir = ctx.tmp / f"sweep-e2e-{share}"
        shutil.rmtree(sweep_dir, ignore_errors=True)
        with GpuSampler(ctx.device) as gpu:
            t_start = time.time()
            walls[share] = run_sweep(p, store, sweep_dir, ctx, share)
        print(f"  gpus_per_ensemble={share}: sweep wall {walls[share]:.1f} s", flush=True)
        if share == shares[0]:
            figures.update(analyse(p, sweep_dir, t_start, walls[share], gpu, ctx))
            figures["chosen"] = {k: e["gpu_share"] for k, e in ensemble_timings(sweep_dir).items()}
            release_device_memory()  # the pure steps' cache: the next sweep plans free memory
    figures["wall_by_share"] = walls
    if len(walls) > 1 or ctx.device.type == "cuda":
        print(f"  gpus_per_ensemble={shares[0]} chose {figures['chosen']}; wall by share: "
              + ", ".join(f"{k} {v:.1f} s" for k, v in walls.items()))  # fmt: skip
    return figures


def analyse(
    p: Plan, sweep_dir: Path, t_start: float, wall: float, gpu: GpuSampler, ctx: Context
) -> dict:
    """Per ensemble: training-phase rate vs the pure step, checkpoint share, evaluation and
    write seconds; and the sweep's wall split."""
    rows, figures = [], {"wall_s": wall}
    train_total = eval_total = write_total = compile_total = 0.0
    timings = ensemble_timings(sweep_dir)
    for ens_id, e in sorted(timings.items()):
        t = e["timings"]
        compile_s = t.get("compile", 0.0)  # once per worker: start-up, not training
        last = t.get("checkpoint_last", 0.0)  # the end one (its snapshot): not training
        train_s = t["total"] - t.get("restore", 0) - t.get("finalize", 0) - compile_s - last
        achieved = t["steps"] * p.batch * e["members"] / train_s
        print(f"  {ens_id}: {e['members']} members, {t['steps']} steps in {train_s:.1f} s of "
              f"training ({e['program']}): {achieved:,.0f} rows*K/s; timings {t}",
              flush=True)  # fmt: skip
        pure = step_rate(p, e["ratio"], e["members"], ctx)
        held = t.get("checkpoint", 0.0) - last  # the periodic snapshots' hold
        periodic = max(t.get("checkpoints", 0) - (1 if "checkpoint_last" in t else 0), 1)
        ckpt, per_ckpt = held / train_s, held / periodic  # share; seconds one snapshot holds
        write = t.get("write", 0.0)
        train_total, compile_total = train_total + train_s, compile_total + compile_s
        eval_total, write_total = eval_total + t.get("finalize", 0) - write, write_total + write
        began = t.get("started_at", e["start"])  # the worker's start (older sweeps: placed)
        begin = began + t.get("restore", 0) + compile_s  # its training, roughly
        util = gpu.mean(begin, begin + train_s)
        figures[ens_id] = {**t, "program": e["program"], "achieved": achieved, "pure": pure,
                           "ratio": achieved / pure, "checkpoint_share": ckpt,
                           "checkpoint_hold_s": per_ckpt, "gpu_util_training": util}  # fmt: skip
        rows.append([ens_id, f"{achieved:,.0f}", f"{pure:,.0f}", f"{achieved / pure:.2f}",
                     f"{ckpt:.4f}", f"{t.get('finalize', 0) - write:.1f}", f"{write:.1f}",
                     "-" if util is None else f"{util:.0f}%"])  # fmt: skip
    first = min(e["start"] for e in timings.values())
    figures["startup"] = startup_split(sweep_dir, timings, t_start)
    figures.update(startup_s=first - t_start, train_s=train_total, eval_s=eval_total)
    figures.update(write_s=write_total, compile_s=compile_total)
    figures["gpu_util"] = gpu.mean()
    figures["gpu_samples"] = gpu.samples
    headers = ["ensemble", "rows*K/s sweep run", "rows*K/s pure step", "ratio", "ckpt share"]
    table([*headers, "eval s", "write s", "GPU util (training)"], rows)
    per_ensemble = [v for v in figures.values() if isinstance(v, dict) and "ratio" in v]
    worst = min(v["ratio"] for v in per_ensemble)
    worst_ckpt = max(v["checkpoint_share"] for v in per_ensemble)
    print(f"  periodic checkpoints (every {CKPT_EVERY} steps) held training for at most "
          f"{worst_ckpt:.4f} of it: {verdict(worst_ckpt, CKPT_TARGET, higher=False)} (< {CKPT_TARGET})")  # fmt: skip
    figures["worst_checkpoint_share"] = worst_ckpt
    hold = max(v["checkpoint_hold_s"] for v in per_ensemble)
    minutes = TrainConfig().checkpoint_minutes
    at_default = hold / (minutes * 60)
    print(f"  one snapshot held training for at most {hold:.3f} s: at the default policy (one per "
          f"{minutes:g} min of training) {at_default:.5f} of it: "
          f"{verdict(at_default, CKPT_TARGET, higher=False)}")  # fmt: skip
    figures["checkpoint_share_at_default"] = at_default
    print(f"  sweep wall {wall:.1f} s: start-up (Ray, plan) {figures['startup_s']:.1f} s, "
          f"compile {compile_total:.1f} s, training {train_total:.1f} s, evaluation {eval_total:.1f} s, final writes "
          f"{write_total:.1f} s (ensembles may overlap); GPU utilisation over the whole sweep {figures['gpu_util']}")  # fmt: skip
    print(f"  worst training-phase / pure-step ratio {worst:.2f} {verdict(worst, TARGET)}")
    figures["worst_ratio"] = worst
    return figures
