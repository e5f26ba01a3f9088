"""Tiny offline language models and text for harvest / LM-metric tests (no hub access).

- :func:`char_tokenizer`: a character-level ``PreTrainedTokenizerFast`` (BOS = EOS = id 0).
- :func:`save_tiny_gpt2`: a random 2-layer GPT-2 (width 32) and that tokenizer, saved with
  ``save_pretrained`` so ``TransformerBridge.boot_transformers(folder)`` loads it offline.
- :func:`native_model`: a random transformer_lens-native model (``TransformerBridge.boot_native``).
- :func:`write_text`: a small ``.txt`` dataset of blank-line separated documents.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

CHARS = [chr(i) for i in range(32, 127)] + ["\n"]
EOT = "<|endoftext|>"
WORDS = "the a fox dog cat sat ran over under quick lazy brown red blue seven apples river stone".split()


def char_tokenizer(special: bool = True):  # type: ignore[no-untyped-def]
    """``special=False``: no BOS, EOS or ``<|endoftext|>`` at all (ids 0.. are the characters)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    unk = EOT if special else "?"
    vocab = {**({EOT: 0} if special else {}), **{c: i + special for i, c in enumerate(CHARS)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=unk))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.decoder = decoders.Fuse()
    marks = dict(bos_token=EOT, eos_token=EOT) if special else {}
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=unk, **marks)


def save_tiny_gpt2(
    folder: Path,
    n_layer: int = 2,
    width: int = 32,
    n_ctx: int = 64,
    seed: int = 0,
    special: bool = True,
) -> Path:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = char_tokenizer(special)
    cfg = GPT2Config(
        vocab_size=len(tok),
        n_positions=n_ctx,
        n_embd=width,
        n_layer=n_layer,
        n_head=2,
        bos_token_id=0 if special else None,
        eos_token_id=0 if special else None,
    )
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(cfg)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def native_model(
    tok_dir: Path, n_layers: int = 2, d_model: int = 32, n_ctx: int = 64, seed: int = 0
):  # type: ignore[no-untyped-def]
    """A random TL-native model; its tokenizer is saved in ``tok_dir`` (transformer_lens reloads it from there)."""
    from transformer_lens.config import TransformerBridgeConfig
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import AutoTokenizer

    char_tokenizer().save_pretrained(tok_dir)
    tok = AutoTokenizer.from_pretrained(tok_dir)
    cfg = TransformerBridgeConfig(
        d_model=d_model,
        n_layers=n_layers,
        n_heads=2,
        d_head=d_model // 2,
        d_mlp=4 * d_model,
        d_vocab=len(tok),
        n_ctx=n_ctx,
        act_fn="gelu",
        normalization_type="LN",
        seed=seed,
    )
    return TransformerBridge.boot_native(cfg, tokenizer=tok).eval()


def write_text(path: Path, n_docs: int = 120, seed: int = 0) -> Path:
    rng = random.Random(seed)
    docs = [
        " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 30))) + "." for _ in range(n_docs)
    ]
    path.write_text("\n\n".join(docs) + "\n")
    return path
