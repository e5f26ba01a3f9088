"""Harvest throughput on a small model (offline): what the names filter and stop-at-layer save,
and whether writing chunks keeps up with the model.

    .venv/bin/python scripts/bench_harvest.py                 # Pythia-70M-shaped random model
    .venv/bin/python scripts/bench_harvest.py --device cuda --contexts 2048 --batch 64

The model is a randomly initialised GPT-NeoX with Pythia-70M's shape (6 layers, width 512,
vocab 50304) saved to a temp folder and loaded through ``TransformerBridge.boot_transformers``,
exactly as ``sweep harvest`` loads a local model; the text is random words. Speed does not
depend on the weights, so the figures hold for the real Pythia-70M. Every ratio is measured in
this run, on this machine.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # (tests.tiny_lm's tokenizer)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from sweep.activations import harvest, lm  # noqa: E402
from sweep.activations.store import StoreWriter  # noqa: E402
from sweep.config import HarvestConfig  # noqa: E402


def make_model(folder: Path, layers: int, width: int, vocab: int) -> Path:
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from tests.tiny_lm import char_tokenizer

    cfg = GPTNeoXConfig(
        vocab_size=vocab,
        hidden_size=width,
        num_hidden_layers=layers,
        num_attention_heads=8,
        intermediate_size=4 * width,
        max_position_embeddings=2048,
        bos_token_id=0,
        eos_token_id=0,
        tie_word_embeddings=False,
    )
    GPTNeoXForCausalLM(cfg).save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    return folder


def make_text(path: Path, n_chars: int) -> Path:
    rng = random.Random(0)
    words = "the of and to in is was for on that with as by at from his her it an be this".split()
    docs, size = [], 0
    while size < n_chars:
        doc = " ".join(rng.choice(words) for _ in range(rng.randint(50, 400)))
        docs.append(doc)
        size += len(doc) + 2
    path.write_text("\n\n".join(docs))
    return path


def forward_rate(
    model, tokens: torch.Tensor, hooks: list[str], batch: int, names_filter: bool, stop: bool
) -> float:
    """Tokens per second of the capture forward pass (one warm-up batch excluded)."""
    lm.capture(model, tokens[:batch], hooks, names_filter, stop)
    sync = torch.cuda.synchronize if tokens.is_cuda else (lambda: None)
    sync()
    t = time.perf_counter()
    for at in range(0, tokens.shape[0], batch):
        acts = lm.capture(model, tokens[at : at + batch], hooks, names_filter, stop)
        for a in acts.values():
            a.cpu()
    sync()
    return tokens.numel() / (time.perf_counter() - t)


def plain_rate(model, tokens: torch.Tensor, batch: int) -> float:
    with torch.inference_mode():
        model(tokens[:batch], return_type="logits")
        t = time.perf_counter()
        for at in range(0, tokens.shape[0], batch):
            model(tokens[at : at + batch], return_type="logits")
        if tokens.is_cuda:
            torch.cuda.synchronize()
    return tokens.numel() / (time.perf_counter() - t)


def write_rate(folder: Path, rows: int, width: int, dtype: str) -> float:
    """Rows per second StoreWriter sustains (atomic .npy + stats sidecar), alone."""
    w = StoreWriter(folder, width, dtype, rows)
    x = torch.randn(rows, width)
    t = time.perf_counter()
    for i in range(3):
        w.write_chunk(i, x)
    return 3 * rows / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=50304)
    ap.add_argument("--hook", default="blocks.2.hook_resid_post")
    ap.add_argument("--contexts", type=int, default=32, help="contexts per measurement")
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16, help="contexts per forward pass")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="float16", help="store dtype")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model_dir = make_model(root / "model", args.layers, args.width, args.vocab)
        text = make_text(root / "text.txt", 2 * args.contexts * args.context + 10_000)
        model = lm.load_model(str(model_dir), args.device)
        device = next(model.parameters()).device
        cfg = HarvestConfig(
            model=str(model_dir),
            dataset=str(text),
            hooks=[args.hook],
            rows=args.contexts * (args.context - 1),
            context=args.context,
            batch_contexts=args.batch,
            rows_per_chunk=max(1024, args.contexts * args.context // 4),
            dtype=args.dtype,
            lm_eval_tokens=0,
            store_dir=str(root / "store"),
            device=str(device),
            progress=False,
        )
        stores, results = harvest.harvest_with_stats(cfg, model)
        tokens = torch.from_numpy(
            np.load(root / "store" / harvest.TOKENS_FILE).astype(np.int64)
        ).to(device)
        n_tok = sum(r.tokens for r in results)
        fwd, wr = sum(r.forward_s for r in results), sum(r.write_s for r in results)
        rates = {
            "plain forward, no hooks (reference)": plain_rate(model, tokens, args.batch),
            "cache every hook, full forward": forward_rate(
                model, tokens, [args.hook], args.batch, False, False
            ),
            "names filter, full forward": forward_rate(
                model, tokens, [args.hook], args.batch, True, False
            ),
            "names filter + stop at layer (harvest)": forward_rate(
                model, tokens, [args.hook], args.batch, True, True
            ),
        }
        w_rows = write_rate(
            root / "wbench", cfg.rows_per_chunk, stores[args.hook].width, args.dtype
        )
    print(
        f"device {device}, torch threads {torch.get_num_threads()}, model {args.layers} layers x {args.width} "
        f"(vocab {args.vocab}), hook {args.hook}, {tokens.shape[0]} contexts x {args.context}, batch {args.batch}"
    )
    base = rates["cache every hook, full forward"]
    for name, r in rates.items():
        print(f"  {name:42s} {r:10.0f} tok/s   x{r / base:5.2f} vs caching every hook")
    print(
        f"  harvest end to end: {n_tok} tokens, model forward {fwd:.2f}s ({n_tok / fwd:.0f} tok/s), "
        f"chunk writes {wr:.2f}s (in a background thread, overlapped with the forward)"
    )
    print(f"  write / forward time: {wr / fwd:.3f}  (< 1: writing is not the bottleneck)")
    print(
        f"  StoreWriter alone: {w_rows:.0f} rows/s = {w_rows / (n_tok / fwd):.1f}x the harvest's row rate"
    )


if __name__ == "__main__":
    main()
