"""Language-model metrics of a dictionary: the model's next-token loss with the SAE spliced in.

On held-out contexts (the tokens right after a harvest's range, saved with the store as
``lm_eval_tokens.npy``), at the store's hook:

- ``ce_loss_clean``    mean next-token cross-entropy of the unmodified model
- ``ce_loss_spliced``  with the hook's activations replaced by the SAE's reconstruction
- ``ce_loss_ablated``  with the hook's activations set to zero
- ``loss_recovered``   ``(ablated - spliced) / (ablated - clean)``: 1 = splicing the SAE in
  costs nothing, 0 = as bad as deleting the activations

Interventions touch only the positions the SAE was trained on (a dropped BOS position keeps
its own activation).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import torch

from sweep.activations import lm
from sweep.activations.store import ChunkStore
from sweep.errors import SweepError
from sweep.sae import SAE, Params

log = logging.getLogger(__name__)

EVAL_TOKENS_FILE = "lm_eval_tokens.npy"  # written by sweep.activations.harvest


class LMLosses(NamedTuple):
    ce_loss_clean: float
    ce_loss_spliced: float
    ce_loss_ablated: float
    loss_recovered: float

    def as_dict(self) -> dict[str, float]:
        return self._asdict()


def loss_recovered(clean: float, spliced: float, ablated: float) -> float:
    """(ablated - spliced) / (ablated - clean); NaN when ablation does not change the loss."""
    gap = ablated - clean
    return (ablated - spliced) / gap if abs(gap) > 1e-12 else math.nan


Replace = Callable[[torch.Tensor], torch.Tensor]


def _hook_fn(replace: Replace, first: int) -> Callable[..., torch.Tensor]:
    """A forward hook applying ``replace`` to positions ``first:`` of (B, P, ...) activations."""

    def hook_fn(act: torch.Tensor, hook: Any = None) -> torch.Tensor:
        flat = act.reshape(*act.shape[:2], -1).clone()  # (B, P, ...) -> (B, P, d)
        flat[:, first:] = replace(flat[:, first:])
        return flat.reshape(act.shape)  # (B, P, d) -> (B, P, ...)

    return hook_fn


@torch.inference_mode()
def ce_loss(
    model: Any,
    tokens_NP: torch.Tensor,
    hook: str | None = None,
    replace: Replace | None = None,
    first: int = 0,
    batch: int = 16,
) -> float:
    """Mean next-token cross-entropy over ``tokens_NP`` (N contexts of P tokens), optionally
    with ``replace`` applied to the activations at ``hook``."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for at in range(0, tokens_NP.shape[0], batch):
        toks = tokens_NP[at : at + batch].to(device)  # (b, P)
        if hook is None or replace is None:
            loss = model(toks, return_type="loss")
        else:
            loss = model.run_with_hooks(
                toks, fwd_hooks=[(hook, _hook_fn(replace, first))], return_type="loss"
            )
        n = toks.shape[0] * (toks.shape[1] - 1)  # predicted positions
        total += float(loss) * n
        count += n
    return total / count


def _zero(x: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(x)


def _splice(sae: SAE) -> Replace:
    def replace(x: torch.Tensor) -> torch.Tensor:
        return sae(x.float()).to(x.dtype)  # (B, P', d): raw-space reconstruction

    return replace


class LMEval:
    """LM metrics of many SAEs at one hook: clean and ablated losses are computed once."""

    def __init__(
        self, model: Any, hook: str, tokens_NP: torch.Tensor, first: int = 0, batch: int = 16
    ) -> None:
        self.model, self.hook, self.tokens, self.first, self.batch = (
            model,
            hook,
            tokens_NP,
            first,
            batch,
        )
        self._clean: float | None = None
        self._ablated: float | None = None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _loss(self, replace: Replace | None) -> float:
        return ce_loss(
            self.model, self.tokens, self.hook if replace else None, replace, self.first, self.batch
        )

    def losses(self, sae: SAE) -> LMLosses:
        if self._clean is None:
            self._clean = self._loss(None)
            self._ablated = self._loss(_zero)
        spliced = self._loss(_splice(sae.to(self.device)))
        assert self._ablated is not None
        return LMLosses(
            self._clean, spliced, self._ablated, loss_recovered(self._clean, spliced, self._ablated)
        )

    @classmethod
    def for_store(
        cls, store: ChunkStore, device: torch.device | str, max_tokens: int | None = None
    ) -> LMEval | None:
        """An evaluator for runs trained on ``store``, or None (logged) when it has no model,
        no held-out tokens, or its model cannot be loaded here."""
        info = store.provenance.get("source_info", {})
        if not info.get("model") or not info.get("hook") or max_tokens == 0:
            return None
        f = store.path / store.provenance.get("lm_eval", {}).get("file", EVAL_TOKENS_FILE)
        if not f.is_file():
            log.warning(
                "LM metrics skipped: store %s has no held-out tokens (%s)", store.path, f.name
            )
            return None
        tokens = torch.from_numpy(np.load(f, allow_pickle=False).astype(np.int64))  # (N, P)
        if max_tokens is not None:
            tokens = tokens[: max(1, math.ceil(max_tokens / tokens.shape[1]))]
        if tokens.shape[0] == 0:
            return None
        try:
            model = lm.load_model(info["model"], device, info.get("model_dtype", "float32"))
        except SweepError as err:
            log.warning("LM metrics skipped: %s", err)
            return None
        first = int(bool(info.get("prepend_bos")) and bool(info.get("drop_bos")))
        return cls(model, info["hook"], tokens, first)


def member_metrics(ev: LMEval | None, params: Params, cfg: dict) -> dict[str, float]:
    """LM metrics of one run's dictionary (``params`` as trained, ``cfg`` its cfg.json); {} when
    there is no evaluator or the dictionary is not finite (diverged)."""
    if ev is None or not all(bool(torch.isfinite(v).all()) for v in params.values()):
        return {}
    return ev.losses(SAE(params, cfg)).as_dict()
