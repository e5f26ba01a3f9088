"""Section 2, achieved FLOP/s: the fast ensemble at the large size, as a fraction of this
machine's dense fp32 matmul rate measured in the same run (nominal 12*B*d*m FLOPs per
member-step)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from .common import LARGE, Context
from .ensembles import feeder, init_members, l1_grid, make_batches, make_ensemble
from .timing import Seconds, fmt_rate, interleaved, med, table, verdict

TARGET = 0.75
MATMULS = {"mm_a": (4096, 512, 2048), "mm_b": (2048, 2048, 2048)}


def matmul_fn(m: int, k: int, n: int, device: torch.device) -> tuple[Callable[[], object], float]:
    a, b = torch.randn(m, k, device=device), torch.randn(k, n, device=device)
    out = torch.empty(m, n, device=device)
    return (lambda: torch.mm(a, b, out=out)), 2.0 * m * k * n


def rates(secs: Seconds, work: dict[str, float], pick: Callable[[list[float]], float]) -> dict:
    """FLOP/s of every variant, from its seconds per call reduced by ``pick`` (median or min)."""
    return {name: work[name] / pick(secs[name]) for name in work}


def run(ctx: Context) -> dict:
    k, size = max(ctx.st.large_k), LARGE
    mms = {name: matmul_fn(*shape, ctx.device) for name, shape in MATMULS.items()}
    ens = make_ensemble(init_members(size, k, ctx.device), l1_grid(k))
    step = feeder(make_batches(size, 2, ctx.device), lambda x: ens.step(x, full=False))
    variants = {**{name: fn for name, (fn, _) in mms.items()}, "ensemble": step}
    secs = interleaved(variants, ctx.timer, ctx.st.repeats, ctx.st.min_time)
    work = {name: flop for name, (_, flop) in mms.items()}
    work["ensemble"] = 12.0 * size.batch * size.d * size.m * k  # nominal FLOPs per step
    r, best_r = rates(secs, work, med), rates(secs, work, min)
    peak, nominal = max(r["mm_a"], r["mm_b"]), r["ensemble"]
    frac, best = nominal / peak, best_r["ensemble"] / max(best_r["mm_a"], best_r["mm_b"])
    executed = nominal * 10 / 12  # the fast path runs 5 GEMMs (no gradient w.r.t. the input)
    print_flops(r, peak, k, executed)
    print(f"  achieved (nominal) / machine fp32 matmul: {frac:.2f}, best-of {best:.2f}", end="")
    print(f"  (target >= {TARGET}: {verdict(frac, TARGET)})")
    return {
        "k": k, "seconds": secs, "matmul_flops": [r["mm_a"], r["mm_b"]], "peak": peak,
        "nominal_flops": nominal, "executed_flops": executed, "fraction": frac,
        "fraction_best": best, "target": TARGET,
    }  # fmt: skip


def print_flops(r: dict, peak: float, k: int, executed: float) -> None:
    nominal = r["ensemble"]
    table(
        ["what", "FLOP/s", "/ matmul peak"],
        [
            ["matmul (4096x512)@(512x2048)", fmt_rate(r["mm_a"]), f"{r['mm_a'] / peak:.2f}"],
            ["matmul (2048x2048)@(2048x2048)", fmt_rate(r["mm_b"]), f"{r['mm_b'] / peak:.2f}"],
            [f"fast ensemble, large, K={k}: nominal 12*B*d*m", fmt_rate(nominal), f"{nominal / peak:.2f}"],
            ["  same, executed 10*B*d*m (its 5 GEMMs)", fmt_rate(executed), f"{executed / peak:.2f}"],
        ],
    )  # fmt: skip
