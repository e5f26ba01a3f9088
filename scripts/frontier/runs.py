"""The benchmark's child processes: ``sweep harvest``, ``sweep run`` and SAELens's trainer.

Each runs as a subprocess with its output in a log file (printed on failure) and returns the
wall time it took. Every step is resumable: a complete harvest is reused by sweep itself, a
finished sweep run is kept by ``sweep run``, and ``saelens_train.py`` skips trained pairs.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SWEEP = Path(sys.executable).with_name("sweep")
SAELENS_TRAIN = Path(__file__).with_name("saelens_train.py")
TOPK_FAMILY = ("topk", "batchtopk", "matryoshka")
ARCHS = ("relu", "jumprelu", "gated", *TOPK_FAMILY)
"""``--arch``: the same architecture in both methods (relu: SAELens's standard SAE)."""
ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TQDM_DISABLE": "1"}


def _floats(values: Sequence[float]) -> str:
    return "[" + ",".join(f"{v:.6g}" for v in values) + "]"


def run_logged(cmd: list[str], log: Path) -> float:
    """Run ``cmd`` in the repository root with its output in ``log``; exit on failure."""
    log.parent.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run(
            cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, **ENV}
        )
    if proc.returncode != 0:
        tail = log.read_text(errors="replace")[-3000:]
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n--- {log} ---\n{tail}")
    return time.perf_counter() - t


def store_paths(store_dir: Path, hooks: Sequence[str]) -> dict[str, Path]:
    """Where ``sweep harvest`` puts each hook's store (the folder itself for a single hook)."""
    if len(hooks) == 1:
        return {hooks[0]: store_dir}
    return {h: store_dir / h.replace("/", "_") for h in hooks}


def harvest(model: Path, text: Path, hooks: Sequence[str], rows: int, store_dir: Path) -> float:
    """Harvest ``hooks`` of ``model`` on ``text`` into float32 stores (no LM-eval tokens: the
    benchmark needs no ``loss_recovered``, and computing it costs minutes per dictionary)."""
    cmd = [
        str(SWEEP),
        "harvest",
        f"model={model}",
        f"dataset={text}",
        "hooks=[" + ",".join(hooks) + "]",
        f"rows={rows}",
        f"store_dir={store_dir}",
        "dtype=float32",
        "lm_eval_tokens=0",
        "progress=false",
    ]
    return run_logged(cmd, store_dir.parent / f"{store_dir.name}.harvest.log")


def sweep_run(
    store: Path, sweep_dir: Path, lr: float, l1s: Sequence[float], args, extra: Sequence[str]
) -> float:
    """One ``sweep run`` of every L1 (``--arch jumprelu``: L0 coefficient; ``topk`` /
    ``batchtopk``: k) at one learning rate (one ensemble at one dict ratio)."""
    name = "k" if args.arch in TOPK_FAMILY else "l1"
    knob = [f"grid.{name}={_floats(l1s)}"] + ([f"sae={args.arch}"] if args.arch != "relu" else [])
    cmd = [
        str(SWEEP),
        "run",
        "data=chunks",
        f"data.path={store}",
        f"data.eval_rows={args.eval_rows}",
        f"sweep_dir={sweep_dir}",
        *knob,
        f"grid.dict_ratio=[{args.dict_ratio:g}]",
        f"train.batch_size={args.batch_size}",
        f"train.epochs={args.epochs}",
        f"train.lr={lr:g}",
        "progress=false",
        *extra,
    ]
    return run_logged(cmd, sweep_dir.with_suffix(".log"))


def saelens_run(
    python: Path,
    store: Path,
    scale: float,
    out: Path,
    lrs: Sequence[float],
    l1s: Sequence[float],
    args,
) -> float:
    """SAELens's trainer on the same rows, scale, batch size and steps (in ``python``'s venv)."""
    cmd = [
        str(python),
        str(SAELENS_TRAIN),
        f"--store={store}",
        f"--scale={scale!r}",
        f"--out={out}",
        "--lr",
        *[f"{v:g}" for v in lrs],
        "--l1",
        *[f"{v:.6g}" for v in l1s],
        f"--eval-rows={args.eval_rows}",
        f"--batch-size={args.batch_size}",
        f"--epochs={args.epochs}",
        f"--dict-ratio={args.dict_ratio:g}",
        f"--arch={'standard' if args.arch == 'relu' else args.arch}",
        *_levels(args),
    ]
    return run_logged(cmd, out.with_suffix(".log"))


def _levels(args) -> list[str]:
    """``--levels`` for SAELens's Matryoshka: sweep's default levels (fractions of the
    dictionary), so both methods nest the same sizes."""
    if args.arch != "matryoshka":
        return []
    from sweep.archs.matryoshka import DEFAULT_LEVELS

    return ["--levels", *(f"{v!r}" for v in DEFAULT_LEVELS)]
