"""Section 8, the step against the chip (issue 10): rows*members/s of sweep's ``Ensemble.step``
at issue 10's sizes against the baselines a researcher writes — a loop of K plain autograd
SAEs with ``torch.optim.Adam`` under bf16 autocast, the same loop with its loss
``torch.compile``d, and the naive ``vmap(grad)`` in fp32 — and as a fraction of the bf16 (on
CPU: fp32) matmul peak measured in the same run (nominal 12*B*d*m FLOPs per member-step).

On CUDA every size of the issue's table runs; on CPU only the smallest (the larger ones take
seconds per step there), which checks the code and that the CPU path is no slower."""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable
from functools import partial

import torch

from sweep import sae
from sweep.errors import first_line

from .common import Context, Size
from .ensembles import feeder, init_members, l1_grid, make_batches, make_ensemble
from .loop import LoopTrainer
from .timing import fmt_rate, interleaved, med, table

SIZES = [  # (size, members): issue 10's table
    (Size("128x512", 128, 512, 1024), 16),
    (Size("512x4096", 512, 4096, 4096), 16),
    (Size("768x24576", 768, 24576, 4096), 8),
    (Size("2304x18432", 2304, 18432, 4096), 4),
]
TARGETS = {"128x512": None, "512x4096": 0.55, "768x24576": 0.65, "2304x18432": 0.65}
"""Fraction of the bf16 matmul peak the sweep step must reach on the H200 (issue 10)."""


def matmul_peak(device: torch.device, dtype: torch.dtype, ctx: Context) -> float:
    """FLOP/s of one large square matmul in ``dtype`` on ``device``."""
    n = 8192 if device.type == "cuda" else 2048
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    out = torch.empty(n, n, device=device, dtype=dtype)
    repeats, min_time = budget(ctx)
    secs = interleaved({"mm": lambda: torch.mm(a, b, out=out)}, ctx.timer, repeats, min_time)
    return 2.0 * n**3 / med(secs["mm"])


def on(flag: str) -> bool:
    """Whether the environment switches ``flag`` on (set, and not to 0)."""
    return os.environ.get(flag, "0") not in ("", "0")


def budget(ctx: Context) -> tuple[int, float]:
    """(repeats, seconds each) of this section's timings: on CUDA at least 3 of 0.5 s each,
    whatever ``--quick`` says (the headline figures)."""
    if ctx.device.type != "cuda":
        return ctx.st.repeats, ctx.st.min_time
    return max(ctx.st.repeats, 3), max(ctx.st.min_time, 0.5)


class AutocastLoop(LoopTrainer):
    """The loop under bf16 autocast (on CUDA), optionally with ``torch.compile``d losses."""

    def __init__(
        self, members: list[sae.Params], values: list[float], cuda: bool, compiled: bool
    ) -> None:
        super().__init__(members, values)
        self.cuda = cuda
        # static: a second size would otherwise recompile the same code with dynamic shapes
        self.loss = torch.compile(sae.loss_fn, dynamic=False) if compiled else sae.loss_fn

    def step(self, x_BD: torch.Tensor) -> None:
        cast = (
            torch.autocast("cuda", dtype=torch.bfloat16) if self.cuda else contextlib.nullcontext()
        )
        for p, opt, hy in zip(self.params, self.opts, self.hypers, strict=True):
            opt.zero_grad()
            with cast:
                loss, _ = self.loss(p, x_BD, hy, arch=self.arch, kmax=0)
            loss.backward()
            opt.step()
            with torch.no_grad():
                w = p["W_dec"]
                w.div_(w.norm(dim=1, keepdim=True).clamp_min(1e-12))


def warmed(name: str, make: Callable[[], Callable[[], object]]) -> Callable[[], object] | None:
    """Variant ``name`` built and called twice (compiling it); None, with the reason printed,
    when that fails, so one failing variant does not cost the others' figures."""
    try:
        fn = make()
        fn(), fn()
        return fn
    except Exception as err:  # noqa: BLE001 (report any failure and go on)
        print(f"  {name} failed: {type(err).__name__}: {first_line(err)[:200]}")
        return None


def sweep_step(
    members: list,
    l1s: list,
    batches: list,
    cuda: bool,
    compiled: bool,
    graphs: bool = False,
    bf16: bool = True,
) -> Callable[[], object]:
    """sweep's step (bf16 compute on CUDA unless not ``bf16``): eager, compiled, or compiled
    under CUDA graphs (``train.cuda_graphs``; it fails rather than run without the graphs)."""
    ens = make_ensemble(members, l1s, compiled=compiled, cuda_graphs=graphs)
    ens.autocast_dtype = torch.bfloat16 if cuda and bf16 else None
    fn = feeder(batches, partial(ens.step, full=False))
    if graphs:
        fn(), fn(), fn()  # warm-up, record, replay
        torch.cuda.synchronize()
    return fn


def variants(size: Size, k: int, ctx: Context) -> tuple[dict, Callable[[], object] | None]:
    """Every variant that builds and runs, and (on CUDA) a maker of the CUDA-graph one, built
    only once the others are timed: a failed capture can spoil the context for what follows."""
    cuda = ctx.device.type == "cuda"
    batches = make_batches(size, 2, ctx.device)
    members, l1s = init_members(size, k, ctx.device), l1_grid(k)
    makers: dict[str, Callable[[], Callable[[], object]]] = {
        "sweep_eager": lambda: sweep_step(members, l1s, batches, cuda, False),
        "sweep_compiled": lambda: sweep_step(members, l1s, batches, cuda, True),
        "loop": lambda: feeder(batches, AutocastLoop(members, l1s, cuda, False).step),
        "loop_compiled": lambda: feeder(batches, AutocastLoop(members, l1s, cuda, True).step),
    }
    if cuda and on("SWEEP_PEAK_FP32"):  # train.dtype=float32
        makers["sweep_fp32"] = lambda: sweep_step(members, l1s, batches, cuda, True, bf16=False)
    if cuda or size.m <= 512:  # vmap materialises per-member activations: small sizes on CPU
        ref = make_ensemble(members, l1s, fast=False)
        makers["vmap_fp32"] = lambda: feeder(batches, lambda x: ref.step(x, full=False))
    built = {name: warmed(name, make) for name, make in makers.items()}
    graphs = (lambda: sweep_step(members, l1s, batches, cuda, True, True)) if cuda else None
    return {name: fn for name, fn in built.items() if fn is not None}, graphs


def profile(step: Callable[[], object], cuda: bool, steps: int = 5) -> None:
    """Where the default step's time goes (``SWEEP_PEAK_PROFILE=1``): torch.profiler over a
    few steps, the top operators by device (CPU: host) time, and kernels launched per step.
    A profiler failure is printed, never the end of the section."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    try:
        with torch_profile(activities=acts) as prof:
            for _ in range(steps):
                step()
            if cuda:
                torch.cuda.synchronize()
        events = prof.key_averages()
        key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
        print(events.table(sort_by=key, row_limit=15), flush=True)
    except Exception as err:  # noqa: BLE001 (the rates are already printed and saved)
        print(f"  profile failed: {type(err).__name__}: {first_line(err)[:200]}")
        return
    if cuda:
        launches = sum(e.count for e in events if "LaunchKernel" in e.key)  # runtime or driver
        print(f"  kernel launches per step: {launches / steps:.0f}", flush=True)


def sizes(cuda: bool) -> list[tuple[Size, int]]:
    """Issue 10's sizes on CUDA (``SWEEP_PEAK_SIZES``, e.g. ``128x512,768x24576``, picks some);
    the smallest on the CPU."""
    if not cuda:
        return SIZES[:1]
    picked = [n.strip() for n in os.environ.get("SWEEP_PEAK_SIZES", "").split(",") if n.strip()]
    unknown = sorted(set(picked) - {s.name for s, _ in SIZES})
    if unknown:
        raise SystemExit(f"SWEEP_PEAK_SIZES: unknown {unknown}; use {[s.name for s, _ in SIZES]}")
    return [(s, k) for s, k in SIZES if not picked or s.name in picked]


def timed(fns: dict, graphs: Callable | None, ctx: Context, used: str) -> dict:
    """Seconds per step of each variant, interleaved, printed as measured; then the profile
    (when asked) and the graph variant, timed alone (a failed capture can spoil the context,
    so it comes last)."""
    repeats, min_time = budget(ctx)
    secs = interleaved(fns, ctx.timer, repeats, min_time)
    print("  " + ", ".join(f"{n} {med(v) * 1e3:.3g} ms" for n, v in secs.items()), flush=True)
    if on("SWEEP_PEAK_PROFILE") and used in fns:
        profile(fns[used], ctx.device.type == "cuda")
    fn = warmed("sweep_graphs", graphs) if graphs is not None else None
    if fn is not None:
        secs.update(interleaved({"sweep_graphs": fn}, ctx.timer, repeats, min_time))
    return secs


def run(ctx: Context) -> dict:
    cuda = ctx.device.type == "cuda"
    peak = matmul_peak(ctx.device, torch.bfloat16 if cuda else torch.float32, ctx)
    print(f"  matmul peak ({'bf16' if cuda else 'fp32'}): {fmt_rate(peak)}FLOP/s", flush=True)
    results, rows = [], []
    for size, k in sizes(cuda):
        fns, graphs = variants(size, k, ctx)
        secs = timed(fns, graphs, ctx, "sweep_compiled" if cuda else "sweep_eager")
        used = next((n for n in HELD[cuda] if n in secs), "sweep_eager")
        if used != HELD[cuda][0]:
            print(f"  {HELD[cuda][0]} is missing: 'of peak' uses {used}", flush=True)
        rate = {n: size.batch * k / med(s) for n, s in secs.items()}
        rate["sweep"] = rate.get(used, math.nan)  # the step held to the targets
        frac = rate["sweep"] * 12.0 * size.d * size.m / peak
        target = TARGETS[size.name] if cuda else None
        results.append({"size": size.name, "k": k, "seconds": secs, "rows_x_members_per_s": rate,
                        "fraction_of_peak": frac, "target_fraction": target})  # fmt: skip
        vs_loop = rate["sweep"] / rate["loop_compiled"] if "loop_compiled" in rate else math.nan
        rows.append([size.name, str(size.batch), str(k), *(fmt_rate(rate[n]) if n in rate else "-" for n in NAMES),
                     f"{vs_loop:.2f}x", f"{frac:.3f}", "-" if target is None else f">= {target}"])  # fmt: skip
        print(f"  {size.name} K={k}: " + ", ".join(f"{n} {fmt_rate(r)}" for n, r in rate.items())
              + f"; {frac:.3f} of peak", flush=True)  # fmt: skip
        if "sweep_fp32" in rate and "sweep_compiled" in rate:
            auto = rate["sweep_compiled"] / rate["sweep_fp32"]
            results[-1]["dtype_auto_over_fp32"] = auto
            print(f"  train.dtype=auto (bf16) / float32, compiled step: {auto:.2f}x", flush=True)
    table(["size", "B", "K", *NAMES, "sweep/loop_compiled", "of peak", "target"], rows)
    print("  rows x members per second (median); 'of peak' and sweep/loop_compiled use the step")
    print("  step held to the targets: on CUDA the compiled one replayed as CUDA graphs")
    print("  (train.compile=true, cuda_graphs=auto; compile=auto leaves the step eager until a")
    print("  compiled GPU run resumes bit-exactly), eager on the CPU (auto).")
    print("  Issue 10 targets on the H200: the fractions of")
    print("  peak above, >= 6x the 5.0M of 128x512 before the work, >= 1.4x the compiled loop.")
    return {"peak_flops": peak, "results": results}


NAMES = [
    "sweep_eager",
    "sweep_compiled",
    "sweep_graphs",
    "sweep_fp32",
    "loop",
    "loop_compiled",
    "vmap_fp32",
]
HELD = {True: ("sweep_graphs", "sweep_compiled", "sweep_eager"), False: ("sweep_eager",)}
"""The step held to the targets (the first of these that ran): on CUDA the compiled one under
CUDA graphs (``train.compile=true``, ``train.cuda_graphs=auto``), on the CPU the eager one
(which ``train.compile=auto`` runs)."""
