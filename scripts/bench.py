"""Training throughput of sweep, as ratios measured within one run on this machine.

    .venv/bin/python scripts/bench.py                      # full benchmark (~6-8 min, 2 CPU cores)
    .venv/bin/python scripts/bench.py --quick --skip-ray   # smoke version (~30 s)
    .venv/bin/python scripts/bench.py --device cuda --json bench.json

Sections (one module each under scripts/benchmarks/; each ratio is printed next to its target;
nothing here asserts on time):

1. ensemble vs loop: rows*members/s of sweep's ``Ensemble.step`` (hand-batched fast path and
   the vmapped torch.func reference) against a Python loop of K plain autograd SAEs, each with
   its own ``torch.optim.Adam`` (torch's default implementation) and decoder renormalisation.
2. achieved FLOP/s of the fast ensemble at the large size, as a fraction of this machine's
   dense fp32 matmul rate measured here (nominal 12*B*d*m FLOPs per member-step).
3. streamed vs in-memory: one ensemble trained from ``BatchStream`` over an on-disk chunk
   store vs from a pre-shuffled tensor already in memory; the stream alone at issue 9's
   widths, the store's reads and verification, and the synthetic generator alone.
4. checkpoint cost: ``worker.train_ensemble`` with a periodic checkpoint policy
   (``train.checkpoint_every`` set to give a few checkpoints per run: a bench run never reaches
   the default ``train.checkpoint_minutes``) vs the same run with checkpointing off
   (``checkpoint_minutes=1e9, checkpoint_every=None``: only the worker's final checkpoint);
   counts and seconds from the worker's ``EnsembleResult.timings``.
5. scheduling makespan: N equal ensembles through ``driver.run_sweep`` on a local Ray with W
   (fake) GPUs, vs the ideal sum(ensemble seconds) / W.
6. end to end: the training-phase rows/s of a real ``sweep run`` (from the workers' timings in
   each run's placement.json) over the pure ``Ensemble.step`` rate of the same ensembles, the
   checkpoint share, GPU utilisation (nvidia-smi) and the wall time split into start-up (its
   own phases too), store generation, training and evaluation (issue 9's sizes on CUDA; small
   on CPU; ``SWEEP_E2E_ROWS`` / ``_RATIOS`` / ``_SHARES`` / ``_COMPILE`` change the rows, dict
   ratios, ``launch.gpus_per_ensemble`` values and ``train.compile``).
7. architectures vs loop: the TopK, BatchTopK, Matryoshka, JumpReLU and Gated ensemble steps
   against a loop of K plain SAEs of the same architecture (JumpReLU also against its vmapped
   step; the verdict is the TopK family's, issue 11's target).
8. the step against the chip: rows*members/s of the default step at issue 10's sizes against
   a researcher's bf16-autocast loop, its ``torch.compile``d variant and the naive
   ``vmap(grad)``, and as a fraction of the bf16 matmul peak measured in the same run
   (``SWEEP_PEAK_SIZES`` picks sizes, ``SWEEP_PEAK_PROFILE=1`` adds a profile).

On CUDA, timings run between CUDA events.

The machine may be shared, so absolute figures drift; every comparison interleaves its
variants and reports the median of the repeats (and the best-of-N, which contention cannot
inflate), so each ratio compares variants timed under the same conditions.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402
from benchmarks.common import FULL, QUICK, Context, Settings  # noqa: E402
from benchmarks.sections import SECTIONS  # noqa: E402


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
        "--skip-ray", action="store_true", help="skip the sections that start a local Ray instance"
    )
    p.add_argument(
        "--sections",
        default=",".join(map(str, SECTIONS)),
        help="comma-separated section numbers to run (default: all)",
    )
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


def wanted(args: argparse.Namespace) -> list[int]:
    """The registered sections asked for, less those ``--skip-ray`` excludes."""
    asked = {int(s) for s in args.sections.split(",") if s.strip()}
    return [n for n in SECTIONS if n in asked and not (args.skip_ray and SECTIONS[n].ray)]


def run_sections(args: argparse.Namespace, ctx: Context, out: dict) -> bool:
    """Each wanted section into ``out`` (and the JSON file, rewritten after each: a run cut
    short keeps what it measured). A section that raises is reported and the others still
    run; returns whether all succeeded."""
    ok = True
    for num in wanted(args):
        section = SECTIONS[num]
        print(f"\n== {section.title} ==")
        if section.cuda and ctx.device.type != "cuda":
            print("  skipped: needs a CUDA device (--device cuda)")
            continue
        t0 = time.perf_counter()
        try:
            out[f"section{num}"] = section.run(ctx)
        except Exception as err:  # noqa: BLE001 (one broken section must not cost the rest)
            traceback.print_exc()
            out[f"section{num}"] = {"error": f"{type(err).__name__}: {err}"}
            ok = False
        print(f"  [section took {time.perf_counter() - t0:.0f} s]", flush=True)
        save(args.json, out)
    return ok


def save(path: Path | None, out: dict) -> None:
    if path is not None:
        path.write_text(json.dumps(out, indent=2, default=str))


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
        ok = run_sections(args, Context(device, st, args.threads, tmp), out)
    out["info"]["total_seconds"] = time.perf_counter() - t0
    print(f"\ntotal {out['info']['total_seconds']:.0f} s")
    save(args.json, out)
    if args.json:
        print(f"wrote {args.json}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
