"""transformer_lens models for harvesting and LM metrics: loading, hook names, capture.

Models load through ``TransformerBridge.boot_transformers`` (a hub name or a local Hugging
Face model folder); hook names are transformer_lens names (``blocks.2.hook_resid_post``,
``blocks.3.mlp.hook_post`` ...). ``transformer_lens`` is imported lazily: it is slow to import
and only harvest and LM metrics need it.
"""

from __future__ import annotations

import difflib
import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from sweep.devices import resolve_device, torch_dtype
from sweep.errors import SweepError, first_line

log = logging.getLogger(__name__)

_WEIGHT_GLOBS = ("*.safetensors", "pytorch_model*.bin", "*.safetensors.index.json", "*.pt", "*.pth")
_EMBED_PREFIXES = ("hook_embed", "hook_pos_embed", "hook_tokens", "embed.", "pos_embed.")


def model_ref(name: str) -> str:
    """How a model is recorded in provenance: an absolute path for a local folder (also one
    since removed, if its name says it is a path), else the name."""
    p = Path(name).expanduser()
    return str(p.resolve()) if p.exists() or name.startswith((".", "/", "~")) else name


def check_model_folder(name: str) -> None:
    """A local model folder must hold a config and weights; fail with one line if not."""
    p = Path(name).expanduser()
    if not p.exists():
        if name.startswith((".", "/", "~")):
            raise SweepError(
                f"model folder {name} does not exist; pass a local model folder or a model name"
            )
        return
    if not p.is_dir():
        raise SweepError(
            f"model {name} is a file, not a model folder; pass the folder save_pretrained wrote"
        )
    if not (p / "config.json").is_file():
        raise SweepError(
            f"model folder {p} has no config.json; save the model with save_pretrained"
        )
    if not any(any(p.glob(g)) for g in _WEIGHT_GLOBS):
        raise SweepError(
            f"model folder {p} has no weights (model.safetensors / pytorch_model.bin); "
            "save the model with save_pretrained or pass a model name"
        )


@contextmanager
def quiet_hub() -> Iterator[None]:
    """Hide huggingface_hub's per-retry warnings (the final failure becomes one SweepError
    line) and transformers' "Loading weights" bars and notices (they end up in logs)."""
    from transformers.utils import logging as tf_logging

    hub = logging.getLogger("huggingface_hub")
    level, verbosity = hub.level, tf_logging.get_verbosity()
    bars = tf_logging.is_progress_bar_enabled()
    hub.setLevel(logging.ERROR)
    tf_logging.set_verbosity_error()
    tf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hub.setLevel(level)
        tf_logging.set_verbosity(verbosity)
        if bars:
            tf_logging.enable_progress_bar()


def load_model(name: str, device: str | torch.device = "auto", dtype: str = "float32") -> Any:
    """A ``TransformerBridge`` for ``name`` (hub name or local folder), in eval mode."""
    check_model_folder(name)
    from transformer_lens.model_bridge import TransformerBridge

    dev = resolve_device(device, "device") if isinstance(device, str) else device
    try:
        with quiet_hub():
            model = TransformerBridge.boot_transformers(name, device=dev, dtype=torch_dtype(dtype))
    except Exception as err:  # hub, network, format and architecture errors all mean "cannot load"
        raise SweepError(
            f"cannot load model '{name}' ({_first_line(err)}); pass a local model folder or check the name"
        ) from err
    model.eval()
    if getattr(model, "tokenizer", None) is None:
        raise SweepError(
            f"model '{name}' has no tokenizer; save one next to the weights (tokenizer.json)"
        )
    return model


def load_tokenizer(name: str) -> Any:
    """The model's tokenizer alone (for building the token stream without loading weights)."""
    check_model_folder(name)
    from transformers import AutoTokenizer

    try:
        with quiet_hub():
            return AutoTokenizer.from_pretrained(name)
    except Exception as err:
        raise SweepError(
            f"cannot load the tokenizer of '{name}' ({_first_line(err)}); check the model name or folder"
        ) from err


def _first_line(err: BaseException) -> str:
    return first_line(err) or type(err).__name__


def hook_names(model: Any) -> list[str]:
    """Every hook name the model accepts (canonical names and transformer_lens aliases)."""
    return sorted(model.hook_dict)


def check_hooks(model: Any, hooks: list[str], model_name: str) -> None:
    """Reject unknown hook names, listing the valid names nearest to each."""
    valid = hook_names(model)
    known = set(valid)
    for h in hooks:
        if h in known:
            continue
        near = difflib.get_close_matches(h, valid, n=6, cutoff=0.6)
        if not near:
            prefix = h.rsplit(".", 1)[0]
            near = [v for v in valid if v.startswith(prefix)][:6]
        hint = (
            f"; nearest valid names: {', '.join(near)}"
            if near
            else f"; valid names start with e.g. {', '.join(valid[:6])}"
        )
        raise SweepError(
            f"unknown hook '{h}' for model {model_name}{hint} ({len(valid)} hooks in all)"
        )


def layer_of(hook: str) -> int | None:
    """Block index a hook belongs to: -1 for embedding hooks, None for hooks after the blocks."""
    m = re.match(r"blocks\.(\d+)\.", hook)
    if m:
        return int(m.group(1))
    return -1 if hook.startswith(_EMBED_PREFIXES) else None


def stop_layer(hooks: list[str], n_layers: int) -> int | None:
    """The ``stop_at_layer`` that still fires every hook (None: the whole model must run)."""
    layers = [layer_of(h) for h in hooks]
    if any(layer is None for layer in layers):
        return None
    stop = max(layers) + 1  # type: ignore[type-var, operator]
    return stop if stop < n_layers else None


def canonical(model: Any, hook: str) -> str:
    point = model.hook_dict.get(hook)
    return getattr(point, "name", None) or hook


@torch.inference_mode()
def capture(
    model: Any,
    tokens_BP: torch.Tensor,
    hooks: list[str],
    names_filter: bool = True,
    stop: bool = True,
) -> dict[str, torch.Tensor]:
    """Activations of ``hooks`` on ``tokens_BP`` in one forward pass: each (B, P, d).

    ``names_filter`` caches only the requested hooks; ``stop`` ends the forward pass after the
    last block they need. (Both default on; off only to measure what they save.)
    """
    stop_at = stop_layer(hooks, model.cfg.n_layers) if stop else None
    _, cache = model.run_with_cache(
        tokens_BP,
        names_filter=list(hooks) if names_filter else None,
        stop_at_layer=stop_at,
        return_cache_object=False,
    )
    out = {}
    B, P = tokens_BP.shape
    for h in hooks:
        act = cache.get(h)
        if act is None:
            act = cache.get(canonical(model, h))
        if act is None:
            raise SweepError(
                f"hook '{h}' did not fire in a forward pass; choose a hook of the residual stream or MLP"
            )
        if act.ndim < 3 or tuple(act.shape[:2]) != (B, P):
            raise SweepError(
                f"hook '{h}' gives activations of shape {tuple(act.shape)}, not (batch, position, ...); "
                "choose a per-token hook such as blocks.N.hook_resid_post"
            )
        out[h] = act.reshape(B, P, -1)  # (B, P, *rest) -> (B, P, d)
    return out
