"""Section 8, the step against the chip (issue 10): rows*members/s of sweep's ``Ensemble.step``
at issue 10's sizes against the baselines a researcher writes — a loop of K plain autograd
SAEs with ``torch.optim.Adam`` under bf16 autocast, the same loop with its loss
``torch.compile``d, and the naive ``vmap(grad)`` in fp32 — and as a fraction of the bf16 (on
CPU: fp32) matmul peak measured in the same run (nominal 12*B*d*m FLOPs per member-step).

On CUDA every size of the issue's table runs; on CPU only the smallest (the larger ones take
seconds per step there), which checks the code and that the CPU path is no slower."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from functools import partial

import torch

from sweep import sae
from sweep.compiled import compile_step
from sweep.ensemble import Ensemble

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
    secs = interleaved(
        {"mm": lambda: torch.mm(a, b, out=out)}, ctx.timer, ctx.st.repeats, ctx.st.min_time
    )
    return 2.0 * n**3 / med(secs["mm"])


class AutocastLoop(LoopTrainer):
    """The loop under bf16 autocast (on CUDA), optionally with ``torch.compile``d losses."""

    def __init__(
        self, members: list[sae.Params], values: list[float], cuda: bool, compiled: bool
    ) -> None:
        super().__init__(members, values)
        self.cuda = cuda
        self.loss = torch.compile(sae.loss_fn) if compiled else sae.loss_fn

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


def with_cuda_graphs(ens: Ensemble, batches: list[torch.Tensor]) -> Callable[[], object] | None:
    """An experiment, not a product path: the compiled step under CUDA graphs (torch.compile's
    ``reduce-overhead``; parameters and optimizer state marked static so their in-place
    updates are allowed). None, with the reason printed, when it does not work."""
    ens.autocast_dtype, ens.compiled = torch.bfloat16, True
    tensors = [*ens.params.values(), *ens.buffers.values(), ens.active, ens._scales]
    for d in (ens.state.exp_avg, ens.state.exp_avg_sq, ens.state.step):
        tensors += d.values()
    for t in tensors:
        torch._dynamo.mark_static_address(t, guard=False)
    ens._compiled_fn = compile_step(ens._spec(), mode="reduce-overhead")
    try:
        for x in batches * 2:  # warm-up, record, replay
            ens.step(x, full=False)
        torch.cuda.synchronize()
    except Exception as err:  # noqa: BLE001 (report any failure and go on)
        print(f"  sweep_graphs failed: {type(err).__name__}: {str(err).splitlines()[0][:200]}")
        return None
    return feeder(batches, partial(ens.step, full=False))


def variants(size: Size, k: int, ctx: Context) -> dict[str, Callable[[], object]]:
    cuda = ctx.device.type == "cuda"
    batches = make_batches(size, 2, ctx.device)
    members, l1s = init_members(size, k, ctx.device), l1_grid(k)
    out = {}
    for name, compiled in (("sweep_eager", False), ("sweep_compiled", True)):
        ens = make_ensemble(members, l1s)
        ens.autocast_dtype, ens.compiled = torch.bfloat16 if cuda else None, compiled
        out[name] = feeder(batches, partial(ens.step, full=False))
    if cuda:
        graphs = with_cuda_graphs(make_ensemble(members, l1s), batches)
        if graphs is not None:
            out["sweep_graphs"] = graphs
    for name, compiled in (("loop", False), ("loop_compiled", True)):
        loop = AutocastLoop(members, l1s, cuda, compiled)
        out[name] = feeder(batches, loop.step)
    if cuda or size.m <= 512:  # vmap materialises per-member activations: small sizes on CPU
        ref = make_ensemble(members, l1s, fast=False)
        out["vmap_fp32"] = feeder(batches, lambda x: ref.step(x, full=False))
    return out


def run(ctx: Context) -> dict:
    cuda = ctx.device.type == "cuda"
    peak = matmul_peak(ctx.device, torch.bfloat16 if cuda else torch.float32, ctx)
    print(f"  matmul peak ({'bf16' if cuda else 'fp32'}): {fmt_rate(peak)}FLOP/s")
    results, rows = [], []
    for size, k in SIZES if cuda else SIZES[:1]:
        secs = interleaved(variants(size, k, ctx), ctx.timer, ctx.st.repeats, ctx.st.min_time)
        rate = {n: size.batch * k / med(s) for n, s in secs.items()}
        rate["sweep"] = rate[DEFAULT[cuda]]  # as train.compile=auto runs it
        frac = rate["sweep"] * 12.0 * size.d * size.m / peak
        target = TARGETS[size.name] if cuda else None
        results.append({"size": size.name, "k": k, "seconds": secs, "rows_x_members_per_s": rate,
                        "fraction_of_peak": frac, "target_fraction": target})  # fmt: skip
        rows.append([size.name, str(size.batch), str(k), *(fmt_rate(rate[n]) if n in rate else "-" for n in NAMES),
                     f"{rate['sweep'] / rate['loop_compiled']:.2f}x", f"{frac:.3f}",
                     "-" if target is None else f">= {target}"])  # fmt: skip
    table(["size", "B", "K", *NAMES, "sweep/loop_compiled", "of peak", "target"], rows)
    print("  rows x members per second (median); 'of peak' and sweep/loop_compiled use the step")
    print("  train.compile=auto runs (compiled on CUDA, eager on the CPU).")
    print("  Issue 10 targets on the H200: the fractions of")
    print("  peak above, >= 6x the 5.0M of 128x512 before the work, >= 1.4x the compiled loop.")
    return {"peak_flops": peak, "results": results}


NAMES = ["sweep_eager", "sweep_compiled", "sweep_graphs", "loop", "loop_compiled", "vmap_fp32"]
DEFAULT = {True: "sweep_compiled", False: "sweep_eager"}
"""The step ``train.compile=auto`` runs, on CUDA and on the CPU (the one held to the targets)."""
