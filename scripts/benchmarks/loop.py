"""Section 1, ensemble vs loop: rows*members/s of sweep's ``Ensemble.step`` (the hand-batched
fast path and the vmapped torch.func reference) against a Python loop of K plain autograd SAEs,
each with its own ``torch.optim.Adam`` (torch's default implementation) and decoder
renormalisation."""

from __future__ import annotations

import torch

from sweep import archs, grid, sae
from sweep.config import TrainConfig
from sweep.devices import host_memory_bytes

from .common import LARGE, SMALL, Context, Size
from .ensembles import (
    feeder,
    init_members,
    l1_grid,
    make_batches,
    make_ensemble,
    size_cells,
    size_fields,
)  # fmt: skip
from .timing import fmt_rate, interleaved, med, speedup, table, verdict


class LoopTrainer:
    """K independent SAEs written as a user would: autograd through ``sae.loss_fn``,
    one ``torch.optim.Adam`` each (torch's default implementation), decoder renormalisation."""

    def __init__(
        self, members: list[sae.Params], values: list[float], arch: str = "untied"
    ) -> None:
        self.params = [{n: v.clone().requires_grad_() for n, v in p.items()} for p in members]
        self.opts = [torch.optim.Adam(list(p.values()), lr=TrainConfig().lr) for p in self.params]
        self.arch = archs.get(arch)
        k_family = self.arch.knob == "k"
        dev = members[0]["W_enc"].device
        self.ks = [int(v) if k_family else 0 for v in values]  # a plain int: no device sync
        self.hypers = [
            {
                "l1": torch.tensor(0.0 if k_family else v, device=dev),
                "k": torch.tensor(k, device=dev),
            }
            for v, k in zip(values, self.ks, strict=True)
        ]

    def step(self, x_BD: torch.Tensor) -> None:
        for p, opt, hy, k in zip(self.params, self.opts, self.hypers, self.ks, strict=True):
            opt.zero_grad()
            loss, _ = sae.loss_fn(p, x_BD, hy, arch=self.arch, kmax=k)
            loss.backward()
            opt.step()
            if "W_dec" in p:  # (a tied SAE's decoder is its encoder's unit columns)
                with torch.no_grad():
                    w = p["W_dec"]  # (F, D)
                    w.div_(w.norm(dim=1, keepdim=True).clamp_min(1e-12))


def member_budget(size: Size, device: torch.device) -> int:
    """The members sweep would put in one ensemble of this size on this device (the driver's
    budget: half the RAM on CPU, the whole GPU on CUDA)."""
    if device.type == "cuda":
        total = float(torch.cuda.get_device_properties(device).total_memory)
        return grid.member_budget(size.d, size.m, size.batch, "float32", total, True, 0)
    total = host_memory_bytes() * 0.5
    return grid.member_budget(size.d, size.m, size.batch, "float32", total, False, 0)


def ensemble_vs_loop(size: Size, k: int, ctx: Context) -> dict:
    batches = make_batches(size, 4, ctx.device)
    members, l1s = init_members(size, k, ctx.device), l1_grid(k)
    fast, ref = make_ensemble(members, l1s), make_ensemble(members, l1s, fast=False)
    loop = LoopTrainer(members, l1s)
    variants = {
        "fast": feeder(batches, lambda x: fast.step(x, full=False)),
        "vmap": feeder(batches, lambda x: ref.step(x, full=False)),
        "loop": feeder(batches, loop.step),
    }
    secs = interleaved(variants, ctx.timer, ctx.st.repeats, ctx.st.min_time)
    rate = {name: size.batch * k / med(s) for name, s in secs.items()}
    (fast_loop, fast_best), (vmap_loop, _) = (
        speedup(secs, "fast", "loop"),
        speedup(secs, "vmap", "loop"),
    )
    target = 1.5 if size is SMALL else 1.0
    return {
        **size_fields(size, k), "seconds": secs,
        "rows_x_members_per_s": rate, "fast_over_loop": fast_loop, "fast_over_loop_best": fast_best,
        "vmap_over_loop": vmap_loop, "target_fast_over_loop": target,
    }  # fmt: skip


def loop_row(r: dict) -> list[str]:
    rate, target = r["rows_x_members_per_s"], r["target_fast_over_loop"]
    return [
        *size_cells(r),
        fmt_rate(rate["fast"]), fmt_rate(rate["vmap"]), fmt_rate(rate["loop"]),
        f"{r['fast_over_loop']:.2f}x", f"{r['fast_over_loop_best']:.2f}x",
        f">= {target:g}x: {verdict(r['fast_over_loop'], target)}", f"{r['vmap_over_loop']:.2f}x",
    ]  # fmt: skip


def run(ctx: Context) -> dict:
    budgets = {s.name: member_budget(s, ctx.device) for s in (SMALL, LARGE)}
    capped = min(budgets[SMALL.name], 8)
    small_k = sorted({*ctx.st.small_k, capped})
    print(f"  members sweep's memory model allows (CPU cap {grid.CPU_MAX_MEMBERS}): {budgets}")
    print(f"  small K = {small_k} (budget capped at 8: {capped}), large K = {list(ctx.st.large_k)}")
    print("  loop: K autograd SAEs (sae.loss_fn, which also computes l0 and fvu every step),")
    print("  torch.optim.Adam each, decoder renorm; the ensembles step with full=False (no L0),")
    print("  as the worker does on non-logging steps\n")
    results = [ensemble_vs_loop(SMALL, k, ctx) for k in small_k]
    results += [ensemble_vs_loop(LARGE, k, ctx) for k in ctx.st.large_k]
    headers = ["size", "d x m", "B", "K", "fast", "vmap", "loop", "fast/loop", "best-of"]
    table([*headers, "target (fast/loop)", "vmap/loop"], [loop_row(r) for r in results])
    print("  fast / vmap / loop: rows x members per second (median of the repeats); best-of:")
    print("  fast/loop from each variant's fastest repeat. Issue target: the ensemble is never")
    print("  slower than the loop, and >= 1.5x the loop at the small size.")
    return {"budgets": budgets, "results": results}
