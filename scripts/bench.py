"""Training throughput of sweep, as ratios measured within one run on this machine.

    .venv/bin/python scripts/bench.py                      # full benchmark (~6-8 min, 2 CPU cores)
    .venv/bin/python scripts/bench.py --quick --skip-ray   # smoke version (~30 s)
    .venv/bin/python scripts/bench.py --device cuda --json bench.json

Sections (each ratio is printed next to its target; nothing here asserts on time):

1. ensemble vs loop: rows*members/s of sweep's ``Ensemble.step`` (hand-batched fast path and
   the vmapped torch.func reference) against a Python loop of K plain autograd SAEs, each with
   its own ``torch.optim.Adam`` (torch's default implementation) and decoder renormalisation.
2. achieved FLOP/s of the fast ensemble at the large size, as a fraction of this machine's
   dense fp32 matmul rate measured here (nominal 12*B*d*m FLOPs per member-step).
3. streamed vs in-memory: one ensemble trained from ``BatchStream`` over an on-disk chunk
   store vs from a pre-shuffled tensor already in memory.
4. checkpoint cost: ``worker.train_ensemble`` with the default ``train.checkpoint_every``
   (plus the checkpoints it always takes at chunk boundaries) vs the same run with
   checkpointing switched off (the worker's checkpoint method patched to a no-op).
5. scheduling makespan: N equal ensembles through ``driver.run_sweep`` on a local Ray with W
   (fake) GPUs, vs the ideal sum(ensemble seconds) / W.

The machine may be shared, so absolute figures drift; every comparison interleaves its
variants and reports the median of the repeats (and the best-of-N, which contention cannot
inflate), so each ratio compares variants timed under the same conditions.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402

from sweep import grid, rundir, sae, worker  # noqa: E402
from sweep.activations.store import BatchStream, ChunkStore, Cursor  # noqa: E402
from sweep.activations.synthetic import SyntheticSource, ensure_synthetic_store  # noqa: E402
from sweep.config import LoggerConfig, SyntheticDataConfig, TrainConfig  # noqa: E402
from sweep.ensemble import Ensemble, stack  # noqa: E402
from sweep.grid import EnsembleSpec  # noqa: E402
from sweep.optim import Adam  # noqa: E402

SECTIONS = {
    1: "1. Ensemble vs loop",
    2: "2. Achieved FLOP/s",
    3: "3. Streamed vs in-memory",
    4: "4. Checkpoint cost",
    5: "5. Scheduling makespan (Ray)",
}
Seconds = dict[str, list[float]]
"""Per variant, seconds per call (or per run) of each repeat."""


@dataclass(frozen=True)
class Size:
    name: str
    d: int
    m: int
    batch: int

    @property
    def ratio(self) -> float:
        return self.m / self.d


SMALL = Size("small", 128, 512, 1024)
LARGE = Size("large", 512, 2048, 4096)


@dataclass(frozen=True)
class Settings:
    min_time: float
    """Seconds each timed measurement runs at least."""
    repeats: int
    """Interleaved repeats per variant (the median is reported)."""
    small_k: tuple[int, ...]
    large_k: tuple[int, ...]
    store_rows: int
    """Rows of the streaming store (sections 3 and 5)."""
    store_chunk: int
    eval_rows: int
    ckpt_chunk: int
    """Rows per chunk of the checkpoint store (section 4): the synthetic default."""
    ckpt_seconds: float
    """Target length of one section-4 training run."""
    ckpt_repeats: int
    ckpt_periodic: bool
    """Make section-4 runs long enough for at least one periodic checkpoint."""
    ray_seconds: float
    """Target length of one section-5 ensemble (alone, one thread)."""
    ray_ensembles: int


FULL = Settings(
    min_time=1.0, repeats=3, small_k=(4, 8, 16), large_k=(2, 4),
    store_rows=300_000, store_chunk=65_536, eval_rows=16_384,
    ckpt_chunk=SyntheticDataConfig().rows_per_chunk, ckpt_seconds=20.0, ckpt_repeats=3,
    ckpt_periodic=True, ray_seconds=30.0, ray_ensembles=4,
)  # fmt: skip
QUICK = Settings(
    min_time=0.1, repeats=1, small_k=(8,), large_k=(2,),
    store_rows=40_000, store_chunk=8_192, eval_rows=4_096,
    ckpt_chunk=16_384, ckpt_seconds=1.0, ckpt_repeats=1,
    ckpt_periodic=False, ray_seconds=1.5, ray_ensembles=4,
)  # fmt: skip


# ------------------------------------------------------------------------------ timing helpers


class Timer:
    """Wall-clock timing that waits for queued CUDA work at both ends."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def per_call(self, fn: Callable[[], object], min_time: float) -> float:
        """Seconds per call of ``fn``, calling it until ``min_time`` has passed (at least once)."""
        self.sync()
        t0, n = time.perf_counter(), 0
        while True:
            fn()
            n += 1
            if time.perf_counter() - t0 >= min_time:
                self.sync()
                return (time.perf_counter() - t0) / n

    def wall(self, fn: Callable[[], object]) -> float:
        self.sync()
        t0 = time.perf_counter()
        fn()
        self.sync()
        return time.perf_counter() - t0


def interleaved(
    variants: dict[str, Callable[[], object]], timer: Timer, st: Settings, warmup: int = 2
) -> Seconds:
    """Seconds per call of every variant: warm each up, then time them in turn, ``repeats`` times."""
    for fn in variants.values():
        for _ in range(warmup):
            fn()
    timer.sync()
    out: Seconds = {name: [] for name in variants}
    for _ in range(st.repeats):
        for name, fn in variants.items():
            out[name].append(timer.per_call(fn, st.min_time))
    return out


def med(xs: list[float]) -> float:
    return statistics.median(xs)


def speedup(secs: Seconds, a: str, b: str) -> tuple[float, float]:
    """(median, best-of-N) of rate(a) / rate(b), from seconds per equal unit of work."""
    return med(secs[b]) / med(secs[a]), min(secs[b]) / min(secs[a])


def verdict(value: float, target: float, higher: bool = True) -> str:
    ok = value >= target if higher else value <= target
    return "met" if ok else "NOT met"


def table(headers: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    print("  " + "  ".join(h.rjust(w) for h, w in zip(headers, widths, strict=True)))
    for r in rows:
        print("  " + "  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)))


def fmt_rate(x: float) -> str:
    for unit, div in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if x >= div:
            return f"{x / div:.3g}{unit}"
    return f"{x:.3g}"


# ------------------------------------------------------------------------------ SAE trainers


def make_batches(size: Size, n: int, device: torch.device) -> list[torch.Tensor]:
    """``n`` batches of synthetic activations (sparse known features), scaled as training sees
    them (mean row norm sqrt(d))."""
    cfg = SyntheticDataConfig(width=size.d, n_features=size.m, seed=1)
    x = SyntheticSource(cfg).sample(n * size.batch, chunk=0)  # (n*B, d)
    x = x * (math.sqrt(size.d) / x.norm(dim=1).mean())
    return list(x.to(device).view(n, size.batch, size.d).unbind(0))  # n x (B, d)


def init_members(size: Size, k: int, device: torch.device) -> list[sae.Params]:
    g = torch.Generator().manual_seed(0)
    members = [sae.init_params("untied", size.d, size.m, g) for _ in range(k)]
    return [{n: v.to(device) for n, v in p.items()} for p in members]


def l1_grid(k: int) -> list[float]:
    return [float(v) for v in torch.linspace(1e-2, 8e-2, k)]


def make_ensemble(members: list[sae.Params], l1s: list[float], fast: bool = True) -> Ensemble:
    t = TrainConfig()
    params = {n: v.clone() for n, v in stack(members).items()}  # {name: (K, ...)}
    l1 = torch.tensor(l1s, device=params["W_enc"].device)  # (K,)
    return Ensemble(params, l1, Adam(t.lr, (t.betas[0], t.betas[1]), t.eps), fast=fast)


class LoopTrainer:
    """K independent SAEs written as a user would: autograd through ``sae.loss_fn``,
    one ``torch.optim.Adam`` each (torch's default implementation), decoder renormalisation."""

    def __init__(self, members: list[sae.Params], l1s: list[float]) -> None:
        self.params = [{n: v.clone().requires_grad_() for n, v in p.items()} for p in members]
        self.opts = [torch.optim.Adam(list(p.values()), lr=TrainConfig().lr) for p in self.params]
        self.l1s = l1s

    def step(self, x_BD: torch.Tensor) -> None:
        for p, opt, l1 in zip(self.params, self.opts, self.l1s, strict=True):
            opt.zero_grad()
            loss, _ = sae.loss_fn(p, x_BD, l1)
            loss.backward()
            opt.step()
            with torch.no_grad():
                w = p["W_dec"]  # (F, D)
                w.div_(w.norm(dim=1, keepdim=True).clamp_min(1e-12))


def feeder(
    batches: list[torch.Tensor], step: Callable[[torch.Tensor], object]
) -> Callable[[], object]:
    cycle = itertools.cycle(batches)
    return lambda: step(next(cycle))


# ------------------------------------------------------------------------------ 1. ensemble vs loop


def member_budget(size: Size, device: torch.device) -> int:
    """The members sweep would put in one ensemble of this size on this device (the driver's
    budget: half the RAM on CPU, the whole GPU on CUDA)."""
    if device.type == "cuda":
        total = float(torch.cuda.get_device_properties(device).total_memory)
        return grid.member_budget(size.d, size.m, size.batch, "float32", total, True, 0)
    import psutil

    total = psutil.virtual_memory().total * 0.5
    return grid.member_budget(size.d, size.m, size.batch, "float32", total, False, 0)


def ensemble_vs_loop(size: Size, k: int, device: torch.device, timer: Timer, st: Settings) -> dict:
    batches = make_batches(size, 4, device)
    members, l1s = init_members(size, k, device), l1_grid(k)
    fast, ref = make_ensemble(members, l1s), make_ensemble(members, l1s, fast=False)
    loop = LoopTrainer(members, l1s)
    variants = {
        "fast": feeder(batches, lambda x: fast.step(x, full=False)),
        "vmap": feeder(batches, lambda x: ref.step(x, full=False)),
        "loop": feeder(batches, loop.step),
    }
    secs = interleaved(variants, timer, st)
    rate = {name: size.batch * k / med(s) for name, s in secs.items()}
    (fast_loop, fast_best), (vmap_loop, _) = (
        speedup(secs, "fast", "loop"),
        speedup(secs, "vmap", "loop"),
    )
    target = 1.5 if size is SMALL else 1.0
    return {
        "size": size.name, "d": size.d, "m": size.m, "batch": size.batch, "k": k, "seconds": secs,
        "rows_x_members_per_s": rate, "fast_over_loop": fast_loop, "fast_over_loop_best": fast_best,
        "vmap_over_loop": vmap_loop, "target_fast_over_loop": target,
    }  # fmt: skip


def loop_row(r: dict) -> list[str]:
    rate, target = r["rows_x_members_per_s"], r["target_fast_over_loop"]
    return [
        r["size"], f"{r['d']}x{r['m']}", str(r["batch"]), str(r["k"]),
        fmt_rate(rate["fast"]), fmt_rate(rate["vmap"]), fmt_rate(rate["loop"]),
        f"{r['fast_over_loop']:.2f}x", f"{r['fast_over_loop_best']:.2f}x",
        f">= {target:g}x: {verdict(r['fast_over_loop'], target)}", f"{r['vmap_over_loop']:.2f}x",
    ]  # fmt: skip


def section_loop(device: torch.device, timer: Timer, st: Settings) -> dict:
    budgets = {s.name: member_budget(s, device) for s in (SMALL, LARGE)}
    small_k = sorted({*st.small_k, min(budgets[SMALL.name], 8)})
    print(f"  members sweep's memory model allows (CPU cap {grid.CPU_MAX_MEMBERS}): {budgets}")
    print(
        f"  small K = {small_k} (budget capped at 8: {min(budgets['small'], 8)}), large K = {list(st.large_k)}"
    )
    print("  loop: K autograd SAEs (sae.loss_fn, which also computes l0 and fvu every step),")
    print("  torch.optim.Adam each, decoder renorm; the ensembles step with full=False (no L0),")
    print("  as the worker does on non-logging steps\n")
    results = [ensemble_vs_loop(SMALL, k, device, timer, st) for k in small_k]
    results += [ensemble_vs_loop(LARGE, k, device, timer, st) for k in st.large_k]
    headers = ["size", "d x m", "B", "K", "fast", "vmap", "loop", "fast/loop", "best-of"]
    table([*headers, "target (fast/loop)", "vmap/loop"], [loop_row(r) for r in results])
    print("  fast / vmap / loop: rows x members per second (median of the repeats); best-of:")
    print("  fast/loop from each variant's fastest repeat. Issue target: the ensemble is never")
    print("  slower than the loop, and >= 1.5x the loop at the small size.")
    return {"budgets": budgets, "results": results}


# ------------------------------------------------------------------------------ 2. FLOP/s


def matmul_fn(m: int, k: int, n: int, device: torch.device) -> tuple[Callable[[], object], float]:
    a, b = torch.randn(m, k, device=device), torch.randn(k, n, device=device)
    out = torch.empty(m, n, device=device)
    return (lambda: torch.mm(a, b, out=out)), 2.0 * m * k * n


def section_flops(device: torch.device, timer: Timer, st: Settings) -> dict:
    k, size = max(st.large_k), LARGE
    (mm_a, flop_a), (mm_b, flop_b) = (
        matmul_fn(4096, 512, 2048, device),
        matmul_fn(2048, 2048, 2048, device),
    )
    ens = make_ensemble(init_members(size, k, device), l1_grid(k))
    step = feeder(make_batches(size, 2, device), lambda x: ens.step(x, full=False))
    secs = interleaved({"mm_a": mm_a, "mm_b": mm_b, "ensemble": step}, timer, st)
    work = 12.0 * size.batch * size.d * size.m * k  # nominal FLOPs per ensemble step

    def flops(pick: Callable[[list[float]], float]) -> tuple[float, float, float]:
        return (
            flop_a / pick(secs["mm_a"]),
            flop_b / pick(secs["mm_b"]),
            work / pick(secs["ensemble"]),
        )

    (rate_a, rate_b, nominal), best_rates = flops(med), flops(min)
    peak = max(rate_a, rate_b)
    frac, best = nominal / peak, best_rates[2] / max(best_rates[:2])
    executed = nominal * 10 / 12  # the fast path runs 5 GEMMs (no gradient w.r.t. the input)
    table(
        ["what", "FLOP/s", "/ matmul peak"],
        [
            ["matmul (4096x512)@(512x2048)", fmt_rate(rate_a), f"{rate_a / peak:.2f}"],
            ["matmul (2048x2048)@(2048x2048)", fmt_rate(rate_b), f"{rate_b / peak:.2f}"],
            [f"fast ensemble, large, K={k}: nominal 12*B*d*m", fmt_rate(nominal), f"{frac:.2f}"],
            [
                "  same, executed 10*B*d*m (its 5 GEMMs)",
                fmt_rate(executed),
                f"{executed / peak:.2f}",
            ],
        ],
    )
    print(f"  achieved (nominal) / machine fp32 matmul: {frac:.2f}, best-of {best:.2f}", end="")
    print(f"  (target >= 0.75: {verdict(frac, 0.75)})")
    return {
        "k": k, "seconds": secs, "matmul_flops": [rate_a, rate_b], "peak": peak,
        "nominal_flops": nominal, "executed_flops": executed, "fraction": frac,
        "fraction_best": best, "target": 0.75,
    }  # fmt: skip


# ------------------------------------------------------------------------------ 3. streaming


def in_memory_rows(stream: BatchStream, device: torch.device) -> torch.Tensor:
    """Every training row of the store, scaled and shuffled, as one (steps*B, d) tensor."""
    parts = [stream.store.read_rows(i, 0, r) for i, r in enumerate(stream.train_rows) if r > 0]
    x = torch.cat(parts).float() * stream.scale  # (rows, d)
    x = x[torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))]
    return x[: stream.total_steps * stream.batch_size].to(device).contiguous()


def section_stream(store: ChunkStore, device: torch.device, timer: Timer, st: Settings) -> dict:
    size, k = SMALL, 8
    stream = BatchStream(store, size.batch, 0, 1, st.eval_rows, store.scale(True), device)
    steps, bs = stream.total_steps, size.batch
    x_mem = in_memory_rows(stream, device)  # (steps*B, d)
    members, l1s = init_members(size, k, device), l1_grid(k)
    warm = make_ensemble(members, l1s)
    for i in range(3):
        warm.step(x_mem[i * bs : (i + 1) * bs], full=False)

    def streamed(ens: Ensemble) -> None:
        for _, x in stream.batches(Cursor()):
            ens.step(x, full=False)

    def in_memory(ens: Ensemble) -> None:
        for i in range(steps):
            ens.step(x_mem[i * bs : (i + 1) * bs], full=False)

    secs: Seconds = {"streamed": [], "in_memory": []}
    for _ in range(st.repeats):
        for name, run in (("streamed", streamed), ("in_memory", in_memory)):
            ens = make_ensemble(members, l1s)  # fresh, identical start for every run
            secs[name].append(timer.wall(lambda run=run, ens=ens: run(ens)))
    rate = {n: steps * bs / med(s) for n, s in secs.items()}
    ratio, best = speedup(secs, "streamed", "in_memory")
    alone = timer.wall(lambda: [None for _ in stream.batches(Cursor())])  # reading, no training
    chunks = f"{len(store.chunks)} chunks of {store.chunks[0]['rows']}"
    print(
        f"  store: {store.total_rows} rows x {store.width} {store.dtype}, {chunks} (in page cache)"
    )
    print(
        f"  ensemble {size.d}x{size.m} K={k} B={bs}: {steps} steps per run, fresh ensemble each run"
    )
    rows = [
        [n, fmt_rate(r), fmt_rate(r * k), f"{med(secs[n]):.2f}", f"{min(secs[n]):.2f}"]
        for n, r in rate.items()
    ]
    table(["source", "rows/s", "rows x members/s", "s (median)", "s (best)"], rows)
    print(f"  the stream alone (every batch read, no training) takes {alone:.2f} s")
    print(f"  streamed / in-memory: {ratio:.3f}, best-of {best:.3f}", end="")
    print(f"  (target >= 0.95: {verdict(ratio, 0.95)})")
    return {
        "steps": steps,
        "k": k,
        "seconds": secs,
        "rows_per_s": rate,
        "stream_only_seconds": alone,
        "ratio": ratio,
        "ratio_best": best,
        "target": 0.95,
    }


# ------------------------------------------------------------------------------ 4. checkpoints


def ensemble_spec(size: Size, l1s: list[float]) -> EnsembleSpec:
    runs = grid.expand(l1s, [size.ratio], 1, size.d, "untied")
    return grid.group(runs, {size.ratio: len(runs)})[0]


def seconds_per_step(size: Size, k: int, threads: int, device: torch.device, timer: Timer) -> float:
    """A quick measure of one fast-ensemble step (to size the training runs)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        ens = make_ensemble(init_members(size, k, device), l1_grid(k))
        x = make_batches(size, 1, device)[0]
        for _ in range(2):
            ens.step(x, full=False)
        return timer.per_call(lambda: ens.step(x, full=False), 0.5)
    finally:
        torch.set_num_threads(before)


class CheckpointSpy:
    """Wraps ``worker._Trainer.checkpoint`` to time every call, or to skip it entirely."""

    def __init__(self, every: int, enabled: bool) -> None:
        self.every, self.enabled = every, enabled
        self.calls: list[tuple[int, float]] = []  # (step, seconds)

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        original, spy = worker._Trainer.checkpoint, self

        def checkpoint(tr: worker._Trainer, ens: Ensemble, cursor: Cursor, step: int) -> None:
            t0 = time.perf_counter()
            if spy.enabled:
                original(tr, ens, cursor, step)
            spy.calls.append((step, time.perf_counter() - t0))

        with mock.patch.object(worker._Trainer, "checkpoint", checkpoint):
            yield

    def summary(self) -> dict:
        periodic = sum(1 for s, _ in self.calls if s % self.every == 0)
        seconds = sum(t for _, t in self.calls) if self.enabled else 0.0
        return {
            "calls": len(self.calls),
            "periodic": periodic,
            "chunk_boundary": len(self.calls) - periodic,
            "seconds": seconds,
        }


def train_run(
    store: Path, spec: EnsembleSpec, train: TrainConfig, st: Settings, tmp: Path, checkpoints: bool
) -> tuple[float, dict]:
    """One ``train_ensemble`` from scratch in a fresh sweep dir: (wall seconds, checkpoint log)."""
    sweep_dir = Path(tempfile.mkdtemp(prefix="ckpt-", dir=tmp))
    job = worker.EnsembleJob(
        spec,
        str(sweep_dir),
        str(store),
        True,
        st.eval_rows,
        train,
        threads=train.threads,
        logger=LoggerConfig(),
    )
    spy = CheckpointSpy(train.checkpoint_every, checkpoints)
    with spy.installed():
        t0 = time.perf_counter()
        result = worker.train_ensemble(job)
        wall = time.perf_counter() - t0
    shutil.rmtree(sweep_dir, ignore_errors=True)
    return wall, {**spy.summary(), "steps": result.steps, "result_seconds": result.seconds}


def ckpt_epochs(per_epoch: int, seconds_per_step: float, st: Settings) -> int:
    """Epochs for a run of about ``st.ckpt_seconds`` (with >= 1 periodic checkpoint in full mode)."""
    least = math.ceil((TrainConfig().checkpoint_every + 1) / per_epoch) if st.ckpt_periodic else 1
    return max(least, round(st.ckpt_seconds / (seconds_per_step * per_epoch)))


def section_checkpoint(
    store: ChunkStore, device: torch.device, timer: Timer, st: Settings, threads: int, tmp: Path
) -> dict:
    size, k, every = SMALL, 8, TrainConfig().checkpoint_every
    per_epoch = BatchStream(store, size.batch, 0, 1, st.eval_rows).total_steps
    epochs = ckpt_epochs(per_epoch, seconds_per_step(size, k, threads, device, timer), st)
    train = TrainConfig(batch_size=size.batch, epochs=epochs, device=device.type, threads=threads)
    spec = ensemble_spec(size, l1_grid(k))
    rows = store.chunks[0]["rows"]
    print(
        f"  worker.train_ensemble, ensemble {size.d}x{size.m} K={k} B={size.batch}, {epochs} epochs"
    )
    print(
        f"  = {per_epoch * epochs} steps; store chunks of {rows} rows ({rows // size.batch} steps)"
    )
    print(f"  train.checkpoint_every={every} (default); checkpoints also at every chunk boundary")
    runs: dict[str, list[tuple[float, dict]]] = {"without": [], "with": []}
    for _ in range(st.ckpt_repeats):
        for name in ("without", "with"):
            runs[name].append(train_run(Path(store.path), spec, train, st, tmp, name == "with"))
    torch.set_num_threads(threads)  # train_ensemble sets it too; keep ours for later sections
    return report_checkpoint(runs, every)


def report_checkpoint(runs: dict[str, list[tuple[float, dict]]], every: int) -> dict:
    secs: Seconds = {n: [w for w, _ in r] for n, r in runs.items()}
    info = runs["with"][0][1]
    inside = med([s["seconds"] for _, s in runs["with"]])
    t_with, t_without = med(secs["with"]), med(secs["without"])
    overhead, best = t_with / t_without - 1, min(secs["with"]) / min(secs["without"]) - 1
    direct = inside / t_without
    what = f"{info['calls']} ({info['periodic']} periodic, {info['chunk_boundary']} at chunk ends)"
    each = f"{inside:.2f} ({1e3 * inside / max(1, info['calls']):.0f} ms each)"
    table(
        ["variant", "wall s (median)", "wall s (best)", "checkpoints", "s in checkpoint()"],
        [
            ["checkpointing off", f"{t_without:.2f}", f"{min(secs['without']):.2f}", "0", "-"],
            [f"default (every {every})", f"{t_with:.2f}", f"{min(secs['with']):.2f}", what, each],
        ],
    )
    print(f"  overhead (with - without) / without: {overhead:+.3f}, best-of {best:+.3f}", end="")
    print(f"  (target < 0.05: {verdict(overhead, 0.05, higher=False)})")
    print(
        f"  time inside checkpoint() / run without: {direct:.3f}  (the same cost, timed directly)"
    )
    return {
        "runs": runs,
        "overhead": overhead,
        "overhead_best": best,
        "direct_overhead": direct,
        "target": 0.05,
    }


# ------------------------------------------------------------------------------ 5. scheduling


def ensemble_times(sweep_dir: Path) -> dict[str, tuple[float, float]]:
    """Per ensemble, (start, end) wall-clock times from its run folders: ``placement.json`` is
    written as the worker starts training, ``DONE`` as each member is finalised."""
    from sweep.driver import MANIFEST_FILE

    spans: dict[str, tuple[float, float]] = {}
    for run_id, entry in rundir.read_json(sweep_dir / MANIFEST_FILE)["runs"].items():
        folder = rundir.run_dir(sweep_dir, run_id)
        start = rundir.read_json(folder / rundir.PLACEMENT)["time"]
        end = rundir.read_json(folder / rundir.DONE)["finished"]
        a, b = spans.get(entry["ensemble"], (start, end))
        spans[entry["ensemble"]] = (min(a, start), max(b, end))
    return spans


def sweep_overrides(
    store: Path,
    sweep_dir: Path,
    l1s: list[float],
    members: int,
    epochs: int,
    st: Settings,
    cuda: bool,
) -> list[str]:
    return [
        f"sweep_dir={sweep_dir}", "data=chunks", f"data.path={store}", f"data.eval_rows={st.eval_rows}",
        f"grid.l1=[{','.join(repr(v) for v in l1s)}]", f"grid.dict_ratio=[{SMALL.ratio:g}]",
        f"grid.max_members={members}", "launch.gpus_per_ensemble=1", "launch.cpus_per_ensemble=1",
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


def section_ray(
    store: ChunkStore, device: torch.device, timer: Timer, st: Settings, threads: int, tmp: Path
) -> dict:
    n, members, cuda = st.ray_ensembles, 2, device.type == "cuda"
    workers = torch.cuda.device_count() if cuda else 2
    per_epoch = BatchStream(store, SMALL.batch, 0, 1, st.eval_rows).total_steps
    sps = seconds_per_step(SMALL, members, 1, device, timer)
    epochs = max(1, round(st.ray_seconds / (sps * per_epoch)))
    l1s = l1_grid(n * members)
    store.verify()  # cached on disk: the timed sweep does not re-scan the store
    # One ensemble alone, same shape and thread count: the no-contention reference.
    alone_cfg = TrainConfig(batch_size=SMALL.batch, epochs=epochs, threads=1, device=device.type)
    alone, _ = train_run(
        Path(store.path), ensemble_spec(SMALL, l1s[:members]), alone_cfg, st, tmp, True
    )
    torch.set_num_threads(threads)
    ray_tmp = Path(tempfile.mkdtemp(prefix="rb", dir="/tmp"))  # short: Ray's socket paths
    try:
        store_path = Path(store.path).absolute()
        overrides = sweep_overrides(store_path, ray_tmp / "sweep", l1s, members, epochs, st, cuda)
        timing = timed_sweep(overrides, workers, ray_tmp)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    shape = f"{SMALL.d}x{SMALL.m}, B={SMALL.batch}, {epochs * per_epoch} steps, 1 thread"
    print(
        f"  {n} ensembles of {members} members ({shape}) via driver.run_sweep, W={workers} Ray GPUs"
    )
    return report_ray(n, workers, alone, timing)


def report_ray(n: int, workers: int, alone: float, timing: dict) -> dict:
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
    print(f"  (target <= 1.1: {verdict(ratio, 1.1, higher=False)})")
    return {
        "ensembles": n, "workers": workers, "alone_seconds": alone, **timing, "ideal": ideal,
        "ratio": ratio, "span_ratio": span / ideal, "ratio_vs_alone": makespan / ideal_alone, "target": 1.1,
    }  # fmt: skip


# ------------------------------------------------------------------------------ main


def make_store(path: Path, rows: int, chunk: int, eval_rows: int) -> ChunkStore:
    cfg = SyntheticDataConfig(
        width=SMALL.d,
        n_features=SMALL.m,
        rows=rows,
        rows_per_chunk=chunk,
        eval_rows=eval_rows,
        seed=0,
    )
    store = ensure_synthetic_store(cfg, path)
    store.verify()  # as `sweep run` does before training (the stream then skips per-chunk scans)
    return store


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: cuda if present"
    )
    p.add_argument(
        "--threads", type=int, default=os.cpu_count() or 1, help="torch threads (default: all CPUs)"
    )
    p.add_argument(
        "--quick", action="store_true", help="short smoke version: same sections, small budgets"
    )
    p.add_argument(
        "--skip-ray", action="store_true", help="skip section 5 (starts a local Ray instance)"
    )
    p.add_argument("--sections", default="1,2,3,4,5", help="comma-separated section numbers to run")
    p.add_argument(
        "--json", type=Path, default=None, help="also write every figure to this JSON file"
    )
    p.add_argument(
        "--tmp", type=Path, default=None, help="folder for the stores (default: a temp dir)"
    )
    return p.parse_args(argv)


def pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda but no CUDA device is visible")
    use_cuda = name == "cuda" or (name == "auto" and torch.cuda.is_available())
    return torch.device("cuda" if use_cuda else "cpu")


def header(device: torch.device, threads: int, st: Settings, quick: bool) -> dict:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    info = {
        "torch": torch.__version__, "device": str(device), "device_name": name, "threads": threads,
        "cpu_count": os.cpu_count(), "mode": "quick" if quick else "full", "repeats": st.repeats,
        "min_time_s": st.min_time,
    }  # fmt: skip
    print(f"sweep benchmark ({info['mode']}): torch {torch.__version__}, device {device} ({name})")
    print(f"torch.set_num_threads({threads}) ({os.cpu_count()} CPUs)")
    print(f"each timing: median of {st.repeats} interleaved repeats of >= {st.min_time:g} s")
    return info


class Stores:
    """The two synthetic stores, generated on first use (never inside a timed region)."""

    def __init__(self, root: Path, st: Settings) -> None:
        self.root, self.st = root, st
        self.made: dict[str, ChunkStore] = {}

    def get(self, kind: str) -> ChunkStore:
        st = self.st
        if kind not in self.made:
            if kind == "stream":
                rows, chunk = st.store_rows, st.store_chunk
            else:  # two full training chunks of the synthetic default size, then the eval rows
                rows, chunk = 2 * st.ckpt_chunk + st.eval_rows, st.ckpt_chunk
            self.made[kind] = make_store(self.root / f"store-{kind}", rows, chunk, st.eval_rows)
        return self.made[kind]


def run_sections(args: argparse.Namespace, st: Settings, device: torch.device, tmp: Path) -> dict:
    timer, stores, threads = Timer(device), Stores(tmp, st), args.threads
    runners: dict[int, Callable[[], dict]] = {
        1: lambda: section_loop(device, timer, st),
        2: lambda: section_flops(device, timer, st),
        3: lambda: section_stream(stores.get("stream"), device, timer, st),
        4: lambda: section_checkpoint(stores.get("ckpt"), device, timer, st, threads, tmp),
        5: lambda: section_ray(stores.get("stream"), device, timer, st, threads, tmp),
    }
    wanted = {int(s) for s in args.sections.split(",") if s.strip()} - (
        {5} if args.skip_ray else set()
    )
    out = {}
    for num in sorted(wanted & set(runners)):
        print(f"\n== {SECTIONS[num]} ==")
        t0 = time.perf_counter()
        out[f"section{num}"] = runners[num]()
        print(f"  [section took {time.perf_counter() - t0:.0f} s]")
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    st, device = QUICK if args.quick else FULL, pick_device(args.device)
    torch.set_num_threads(args.threads)
    out: dict = {"info": header(device, args.threads, st, args.quick)}
    t0 = time.perf_counter()
    with contextlib.ExitStack() as cleanup:
        tmp = args.tmp or Path(
            cleanup.enter_context(tempfile.TemporaryDirectory(prefix="sweep-bench-"))
        )
        out.update(run_sections(args, st, device, tmp))
    out["info"]["total_seconds"] = time.perf_counter() - t0
    print(f"\ntotal {out['info']['total_seconds']:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2, default=str))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
