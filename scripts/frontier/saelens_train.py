"""Train SAELens's standard ReLU-L1 SAEs (or, ``--arch topk`` / ``batchtopk``, its TopK /
BatchTopK SAEs, ``--l1`` then giving k; ``--arch jumprelu``, its JumpReLU SAEs, ``--l1``
giving the L0 coefficient) with its own trainer on a sweep chunk store.

Runs in ``.venv-saelens`` (``scripts/frontier/setup_saelens.sh``), not in sweep's venv: it
reads the store with numpy alone. Every (lr, l1) pair trains one ``StandardTrainingSAE`` with
``SAETrainer`` and the schedule of SAELens's tutorial (L1 warm-up over the first 5% of steps,
constant LR decaying linearly to 0 over the last 20%, Adam, gradient-norm clipping at 1), on:

- exactly sweep's training rows: every row but the store's last ``--eval-rows``;
- in sweep's scale: rows times ``--scale`` (what sweep's ``data.normalize`` uses), with
  SAELens's own normalisation off;
- with sweep's step count: per epoch, each chunk gives ``floor(train rows / batch)`` full
  batches (rows reshuffled every epoch).

Each result is ``OUT/lr_<lr>-l1_<l1>.safetensors`` (W_enc (D, F), b_enc (F,), W_dec (F, D),
b_dec (D,), in the scaled space, SAELens's formula ``relu((x - b_dec) @ W_enc + b_enc) @ W_dec
+ b_dec``) with a ``.json`` beside it; existing results are skipped.

    .venv-saelens/bin/python scripts/frontier/saelens_train.py --store S --scale 0.23 \
        --out OUT --lr 1e-3 3e-3 --l1 1 3 10 [--eval-rows 16384 --batch-size 1024 --epochs 3]
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

SCHEDULE = {"l1_warm_up": 0.05, "lr_decay": 0.2}  # fractions of the steps (SAELens tutorial)


def train_chunks(store: Path, eval_rows: int) -> list[np.ndarray]:
    """Each chunk's training rows as float32 (sweep never trains on the last ``eval_rows``)."""
    manifest = json.loads((store / "manifest.json").read_text())
    if manifest["dtype"] not in ("float32", "float16"):
        raise SystemExit(f"store dtype {manifest['dtype']} is not supported here (float32/16)")
    limit = int(manifest["total_rows"]) - eval_rows
    chunks, at = [], 0
    for c in manifest["chunks"]:
        take = max(0, min(int(c["rows"]), limit - at))
        if take:
            chunks.append(np.load(store / c["file"], mmap_mode="r")[:take].astype(np.float32))
        at += int(c["rows"])
    return chunks


def steps_per_epoch(chunks: list[np.ndarray], batch: int) -> int:
    return sum(len(c) // batch for c in chunks)


def batches(
    chunks: list[np.ndarray], batch: int, scale: float, seed: int
) -> Iterator[torch.Tensor]:
    """Scaled (batch, D) batches forever: per epoch, chunks in a shuffled order, rows shuffled
    within each chunk, full batches only."""
    rng = np.random.default_rng(seed)
    while True:
        for ci in rng.permutation(len(chunks)):
            rows = chunks[ci]
            order = rng.permutation(len(rows))
            for at in range(0, len(rows) - batch + 1, batch):
                yield torch.from_numpy(rows[order[at : at + batch]]) * scale  # (B, D)


def make_sae(
    arch: str, width: int, d_sae: int, value: float, steps: int, levels: tuple[float, ...] = ()
):
    """SAELens's training SAE: ``standard`` (ReLU-L1, ``value`` = its L1 coefficient; ``gated``
    too), ``jumprelu`` (``value`` = its L0 coefficient) or ``topk`` / ``batchtopk`` / ``matryoshka``
    (``value`` = k; its defaults otherwise: AuxK coefficient 1, threshold learning rate 0.01,
    activations rescaled by decoder norm; Matryoshka's widths ``round(level * d_sae)`` for
    ``levels``, then ``d_sae``)."""
    import sae_lens

    if arch == "matryoshka":
        cfg = sae_lens.MatryoshkaBatchTopKTrainingSAEConfig(
            d_in=width, d_sae=d_sae, k=int(value), normalize_activations="none", device="cpu",
            matryoshka_widths=[*(round(v * d_sae) for v in levels), d_sae],
        )  # fmt: skip
        return sae_lens.MatryoshkaBatchTopKTrainingSAE(cfg)
    if arch in ("topk", "batchtopk"):
        kind = "BatchTopK" if arch == "batchtopk" else "TopK"
        cfg = getattr(sae_lens, f"{kind}TrainingSAEConfig")(
            d_in=width, d_sae=d_sae, k=int(value), normalize_activations="none", device="cpu"
        )
        return getattr(sae_lens, f"{kind}TrainingSAE")(cfg)
    if arch == "gated":  # L1 on the gate, weighted by decoder norms; its auxiliary term
        cfg = sae_lens.GatedTrainingSAEConfig(
            d_in=width, d_sae=d_sae, l1_coefficient=value,
            l1_warm_up_steps=int(steps * SCHEDULE["l1_warm_up"]), normalize_activations="none",
            device="cpu",
        )  # fmt: skip
        return sae_lens.GatedTrainingSAE(cfg)
    if arch == "jumprelu":  # step L0 penalty, threshold from 0.01, bandwidth 0.05 (defaults)
        cfg = sae_lens.JumpReLUTrainingSAEConfig(
            d_in=width, d_sae=d_sae, l0_coefficient=value, normalize_activations="none",
            device="cpu",
        )  # fmt: skip
        return sae_lens.JumpReLUTrainingSAE(cfg)
    cfg = sae_lens.StandardTrainingSAEConfig(
        d_in=width,
        d_sae=d_sae,
        l1_coefficient=value,
        l1_warm_up_steps=int(steps * SCHEDULE["l1_warm_up"]),
        normalize_activations="none",
        device="cpu",
    )
    return sae_lens.StandardTrainingSAE(cfg)


def inference_weights(sae, arch: str) -> dict[str, torch.Tensor]:
    """W_enc, b_enc, W_dec, b_dec (+ a BatchTopK SAE's threshold on every feature, a TopK
    SAE's k; decoder norms folded in), as SAELens saves the inference form."""
    state = dict(sae.state_dict())
    if arch != "standard":
        sae.process_state_dict_for_saving_inference(state)
    if arch == "topk":
        state["k"] = torch.tensor(float(sae.cfg.k))
    return {k: v.detach().float().contiguous() for k, v in state.items()}


def train_one(chunks, width: int, d_sae: int, lr: float, l1: float, args) -> tuple[dict, dict]:
    """One SAE with SAETrainer; returns (weights, facts)."""
    from sae_lens import LoggingConfig
    from sae_lens.config import SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    steps = steps_per_epoch(chunks, args.batch_size) * args.epochs
    torch.manual_seed(args.seed)
    sae = make_sae(args.arch, width, d_sae, l1, steps, tuple(args.levels))
    cfg = SAETrainerConfig(
        total_training_samples=steps * args.batch_size,
        train_batch_size_samples=args.batch_size,
        lr=lr,
        lr_end=lr,
        lr_scheduler_name="constant",
        lr_warm_up_steps=0,
        lr_decay_steps=int(steps * SCHEDULE["lr_decay"]),
        device="cpu",
        logger=LoggingConfig(log_to_wandb=False),
    )
    data = batches(chunks, args.batch_size, args.scale, args.seed)
    t = time.perf_counter()
    trainer = SAETrainer(cfg=cfg, sae=sae, data_provider=data)
    trained = trainer.fit()
    seconds = time.perf_counter() - t
    weights = inference_weights(trained, args.arch)
    facts = {"lr": lr, "l1": l1, "steps": trainer.n_training_steps, "seconds": seconds}
    return weights, facts


def main() -> None:
    import importlib.metadata

    from safetensors.torch import save_file

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--store", type=Path, required=True)
    ap.add_argument("--scale", type=float, required=True, help="sweep's activation scale")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--lr", type=float, nargs="+", required=True)
    ap.add_argument(
        "--l1", type=float, nargs="+", required=True, help="(jumprelu: L0 coefficient; topk: k)"
    )
    ap.add_argument(
        "--arch", choices=("standard", "jumprelu", "gated", "topk", "batchtopk", "matryoshka"),
        default="standard",
    )  # fmt: skip
    ap.add_argument(
        "--levels", type=float, nargs="*", default=[], help="matryoshka: dictionary fractions"
    )
    ap.add_argument("--eval-rows", type=int, default=16384)
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--dict-ratio", type=float, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    chunks = train_chunks(args.store, args.eval_rows)
    width = chunks[0].shape[1]
    d_sae = round(args.dict_ratio * width)
    args.out.mkdir(parents=True, exist_ok=True)
    version = importlib.metadata.version("sae-lens")
    for lr in args.lr:
        for l1 in args.l1:
            stem = args.out / f"lr_{lr:.0e}-l1_{l1:.4g}"  # no with_suffix: "l1_1.15" has a dot
            if Path(f"{stem}.json").is_file():
                continue
            weights, facts = train_one(chunks, width, d_sae, lr, l1, args)
            save_file(weights, f"{stem}.safetensors")
            facts.update(sae_lens=version, batch_size=args.batch_size, scale=args.scale)
            Path(f"{stem}.json").write_text(json.dumps(facts, indent=2) + "\n")
            print(
                f"saelens lr={lr:g} l1={l1:g}: {facts['steps']} steps, {facts['seconds']:.1f}s",
                flush=True,
            )


if __name__ == "__main__":
    main()
