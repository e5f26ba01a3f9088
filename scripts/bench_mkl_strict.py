"""What sweep's ``MKL_CBWR=AUTO,STRICT`` costs on this CPU: ``Ensemble.step`` (fast path) at the
benchmark's small and large sizes, in alternating processes with MKL's default (``AUTO``) and
strict mode, ms per step (median of 5 x 1.5 s each).

    .venv/bin/python scripts/bench_mkl_strict.py [--pairs 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CASES = (("small", 8), ("small", 1), ("large", 4), ("large", 1))


def probe(threads: int) -> None:
    """In this process (MKL_CBWR as set): one line of ms per step for each case."""
    import torch

    sys.path.insert(0, str(ROOT))
    from scripts.benchmarks.ensembles import init_members, l1_grid, make_batches, make_ensemble

    torch.set_num_threads(threads)
    cpu, cells = torch.device("cpu"), []
    for name, k in CASES:
        size = _sizes()[name]
        ens = make_ensemble(init_members(size, k, cpu), l1_grid(k))
        x = make_batches(size, 1, cpu)[0]
        for _ in range(3):
            ens.step(x, full=False)
        cells.append(f"{statistics.median(_per_step(ens, x)):.1f}")
    print(" ".join(cells), flush=True)


def _sizes() -> dict:
    from scripts.benchmarks.common import LARGE, SMALL

    return {"small": SMALL, "large": LARGE}


def _per_step(ens, x) -> list[float]:
    out = []
    for _ in range(5):
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < 1.5:
            ens.step(x, full=False)
            n += 1
        out.append((time.perf_counter() - t0) / n * 1e3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.probe:
        return probe(args.threads)
    got: dict[str, list[list[str]]] = {"AUTO": [], "AUTO,STRICT": []}
    for _ in range(args.pairs):
        for mode in got:
            cmd = [sys.executable, __file__, "--probe", "--threads", str(args.threads)]
            env = {**os.environ, "MKL_CBWR": mode}
            line = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
            got[mode].append(line.split())
    print("| step (d x m, B, K) | MKL_CBWR=AUTO | AUTO,STRICT (sweep's default) |\n|---|---|---|")
    for i, (name, k) in enumerate(CASES):
        s = _sizes()[name]
        row = [", ".join(r[i] for r in got[mode]) for mode in got]
        print(f"| {s.d} x {s.m}, B {s.batch}, K {k} | {row[0]} | {row[1]} |")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
