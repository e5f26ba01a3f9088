"""Section 4, checkpoint cost: ``worker.train_ensemble`` with a periodic checkpoint policy vs the
same run with checkpointing off, both set through ``TrainConfig`` only.

The worker checkpoints every ``train.checkpoint_minutes`` (default 10) and, when set, every
``train.checkpoint_every`` steps, and always once at the end (before the final files). A
benchmark run is far shorter than 10 minutes, so the default policy would write only that final
checkpoint; the measured policy is therefore ``checkpoint_every=N``, with N chosen from the run's
length to give ``Settings.ckpt_periodic`` periodic checkpoints (far denser than the default:
an upper bound on its cost). "Off" is ``checkpoint_minutes=1e9, checkpoint_every=None``: only
the final checkpoint remains. The checkpoint counts and seconds are the worker's own
``EnsembleResult.timings``. Then :mod:`.stall`: one researcher-size member's file, written as
sweep writes it and as ``safetensors.torch.save`` would.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from sweep.config import TrainConfig
from sweep.worker import EnsembleResult

from . import stall
from .common import SMALL, Context
from .ensembles import ensemble_spec, l1_grid, seconds_per_step
from .runs import epochs_for, steps_per_epoch, train_run
from .timing import Seconds, med, table, verdict

K, TARGET = 8, 0.05
Runs = dict[str, list[tuple[float, dict]]]
"""Per variant, (wall seconds, checkpoint summary) of each repeat."""


def policies(base: TrainConfig, every: int) -> dict[str, TrainConfig]:
    """``without``: checkpointing off (the final checkpoint only); ``with``: also every
    ``every`` steps (``checkpoint_minutes`` stays at its default)."""
    return {
        "without": replace(base, checkpoint_minutes=1e9, checkpoint_every=None),
        "with": replace(base, checkpoint_every=every),
    }


def summary(result: EnsembleResult) -> dict:
    """The worker's checkpoint figures of one run (``periodic``: all but the final one)."""
    t = result.timings
    calls = int(t["checkpoints"])
    return {
        "calls": calls,
        "periodic": calls - 1,
        "seconds": float(t["checkpoint"]),
        "steps": result.steps,
        "result_seconds": result.seconds,
        "timings": t,
    }


def run(ctx: Context) -> dict:
    store, size, st = ctx.stores.get("ckpt"), SMALL, ctx.st
    per_epoch = steps_per_epoch(store, size.batch, st.eval_rows)
    sps = seconds_per_step(size, K, ctx.threads, ctx.device, ctx.timer)
    epochs = epochs_for(st.ckpt_seconds, sps, per_epoch)
    steps = per_epoch * epochs
    every = steps // (st.ckpt_periodic + 1) + 1  # st.ckpt_periodic of them, none at the last step
    base = TrainConfig(
        batch_size=size.batch, epochs=epochs, device=ctx.device.type, threads=ctx.threads
    )
    configs, spec = policies(base, every), ensemble_spec(size, l1_grid(K))
    describe(epochs, steps, every, sps, base.checkpoint_minutes)
    runs: Runs = {name: [] for name in configs}
    for _ in range(st.ckpt_repeats):
        for name, train in configs.items():
            wall, result = train_run(Path(store.path), spec, train, st.eval_rows, ctx.tmp)
            runs[name].append((wall, summary(result)))
    torch.set_num_threads(ctx.threads)  # train_ensemble sets it too; keep ours for later sections
    figures = report(runs, every, base.checkpoint_minutes)
    writers = stall.run(ctx.tmp, st.stall_latents, st.ckpt_repeats)
    return {**figures, "steps": steps, "checkpoint_every": every, "writers": writers}


def describe(epochs: int, steps: int, every: int, sps: float, default_minutes: float) -> None:
    shape = f"{SMALL.d}x{SMALL.m} K={K} B={SMALL.batch}"
    print(f"  worker.train_ensemble, ensemble {shape}, {epochs} epochs = {steps} steps")
    print(f"  (~{steps * sps:.1f} s of steps); checkpoint policies set through TrainConfig only:")
    print("    off:      checkpoint_minutes=1e9, checkpoint_every=None")
    print(f"    periodic: checkpoint_every={every} (~{every * sps:.1f} s of steps apart),")
    print(f"              checkpoint_minutes={default_minutes:g} (the default; never reached here)")
    print("  both runs end with the worker's final checkpoint; wall = one train_ensemble call")
    print("  (restore, steps, checkpoints, evaluation, final files); checkpoint counts and")
    print("  seconds are the worker's own EnsembleResult.timings")


def report(runs: Runs, every: int, default_minutes: float) -> dict:
    secs: Seconds = {n: [w for w, _ in r] for n, r in runs.items()}
    writing = {n: med([s["seconds"] for _, s in r]) for n, r in runs.items()}
    on, off = runs["with"][0][1], runs["without"][0][1]
    t_with, t_without = med(secs["with"]), med(secs["without"])
    overhead, best = t_with / t_without - 1, min(secs["with"]) / min(secs["without"]) - 1
    direct = (writing["with"] - writing["without"]) / t_without
    each = writing["with"] / max(1, on["calls"])
    estimate = each / (default_minutes * 60)  # one checkpoint per default interval of training
    table(
        ["variant", "wall s (median)", "wall s (best)", "checkpoints", "s writing checkpoints"],
        [row("checkpointing off", secs["without"], off, writing["without"]),
         row(f"every {every} steps", secs["with"], on, writing["with"])],
    )  # fmt: skip
    print(f"  overhead (with - without) / without: {overhead:+.3f}, best-of {best:+.3f}", end="")
    print(f"  (target < {TARGET}: {verdict(overhead, TARGET, higher=False)})")
    print(f"  extra seconds writing checkpoints (worker timings) / run without: {direct:.3f}")
    print(f"  at the default policy (one per {default_minutes:g} min of training) the same")
    print(
        f"  checkpoints would cost about {estimate:.1e} of training time ({1e3 * each:.0f} ms each)"
    )
    return {
        "runs": runs,
        "overhead": overhead,
        "overhead_best": best,
        "direct_overhead": direct,
        "default_policy_estimate": estimate,
        "target": TARGET,
    }


def row(name: str, walls: list[float], s: dict, writing: float) -> list[str]:
    what = f"{s['calls']} ({s['periodic']} periodic + final)"
    each = f"{writing:.2f} ({1e3 * writing / max(1, s['calls']):.0f} ms each)"
    return [name, f"{med(walls):.2f}", f"{min(walls):.2f}", what, each]
