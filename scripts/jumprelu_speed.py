"""What JumpReLU's ``log`` recipe pays in speed for its precision (tf32 on a GPU, see
``scripts/jumprelu_precision.py``): ``Ensemble.step`` rows x members per second of a JumpReLU
ensemble for ``linear`` in bfloat16 (the default recipe's GPU default) and ``log`` in
bfloat16, tf32 and float32, interleaved and timed as the benchmark times (CUDA events there).

    python scripts/jumprelu_speed.py --device cuda [--size 768x24576] [--members 8] [--json F]

On the CPU tf32 is float32 (the figures then show only bfloat16's cost there).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))  # scripts/benchmarks
from benchmarks.common import Size  # noqa: E402
from benchmarks.ensembles import l1_grid, make_batches, make_ensemble  # noqa: E402
from benchmarks.timing import Timer, fmt_rate, interleaved, med  # noqa: E402

from sweep import archs  # noqa: E402
from sweep.config import TrainConfig  # noqa: E402
from sweep.ensemble import Ensemble  # noqa: E402

VARIANTS = (("linear", "bfloat16"), ("log", "bfloat16"), ("log", "tf32"), ("log", "float32"))


def ensemble(recipe: str, dtype: str, members: int, size: Size, device: torch.device) -> Ensemble:
    """A JumpReLU ensemble of ``recipe`` computing in ``dtype``, as the worker builds it."""
    arch = archs.get("jumprelu").configure(recipe)
    g = torch.Generator().manual_seed(0)
    init = [arch.init_params(size.d, size.m, g) for _ in range(members)]
    init = [{k: v.to(device) for k, v in p.items()} for p in init]
    cast = torch.bfloat16 if dtype == "bfloat16" else None
    clip = TrainConfig().grad_clip
    return make_ensemble(init, l1_grid(members), arch=arch, autocast_dtype=cast, grad_clip=clip)


def stepper(ens: Ensemble, dtype: str, batches: list[torch.Tensor]):
    """One step on the next batch at ``dtype`` (tf32: the process-wide matmul flag, set per
    call, as the variants interleave)."""
    cycle = itertools.cycle(batches)

    def step() -> None:
        torch.backends.cuda.matmul.allow_tf32 = dtype == "tf32"
        ens.step(next(cycle), full=False)

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--size", default="768x24576", help="width x dict size")
    ap.add_argument("--members", type=int, default=8)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--min-time", type=float, default=1.0)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    device = torch.device(a.device)
    d, m = (int(v) for v in a.size.split("x"))
    size = Size("jumprelu", d, m, a.batch)
    batches = make_batches(size, 4, device)
    steps = {}
    for recipe, dtype in VARIANTS:
        ens = ensemble(recipe, dtype, a.members, size, device)
        steps[f"{recipe} {dtype}"] = stepper(ens, dtype, batches)
    secs = interleaved(steps, Timer(device), a.repeats, a.min_time)
    rate = {name: a.batch * a.members / med(s) for name, s in secs.items()}
    base = rate["linear bfloat16"]
    for name, r in rate.items():
        print(f"  {name:16s} {fmt_rate(r):>8s} rows x members/s  ({r / base:.2f}x linear bfloat16)")
    if a.json:
        out = {"device": str(device), "size": a.size, "members": a.members, "batch": a.batch}
        a.json.write_text(json.dumps({**out, "seconds": secs, "rate": rate}, indent=1))


if __name__ == "__main__":
    main()
