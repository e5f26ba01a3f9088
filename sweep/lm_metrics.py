"""Language-model metrics of a dictionary: the model's next-token loss with the SAE spliced in.

On held-out contexts (the tokens right after a harvest's range, saved with the store as
``lm_eval_tokens.npy``), at the store's hook. The SAE is spliced in at the positions it was
trained on (a dropped BOS position keeps its own activation). Our own names:

- ``ce_loss_clean``    mean next-token cross-entropy of the unmodified model
- ``ce_loss_spliced``  with the hook's activations replaced by the SAE's reconstruction
- ``ce_loss_ablated``  with the activations the SAE replaces set to zero
- ``loss_recovered``   ``(ablated - spliced) / (ablated - clean)``: 1 = splicing the SAE in
  costs nothing, 0 = as bad as deleting the activations

all averaged over every predicted position (all but the last of each context). And as
SAEBench's core evaluation computes them (``sae_bench/evals/core/main.py``), so they compare
with its published figures: averaged only over positions whose token is not a special token
(BOS, EOS, PAD: SAEBench's ``ignore_tokens``), the ablation zeroing the hook at every
position (its zero-ablation hook):

- ``ce_loss_without_sae``, ``ce_loss_with_sae``, ``ce_loss_with_ablation``, ``ce_loss_score``
- ``kl_div_with_sae``, ``kl_div_with_ablation``  mean KL(clean next-token distribution ||
  distribution with the SAE spliced in / with the hook zeroed), in nats
- ``kl_div_score``     ``(kl_div_with_ablation - kl_div_with_sae) / kl_div_with_ablation``

(One difference stays: SAEBench's ``exclude_special_tokens_from_reconstruction`` keeps every
special position's own activation; we splice the SAE wherever it was trained, which includes
the document separators inside a context.)

Both come from float32 log-softmaxes of the logits. The clean distribution is never kept for
all tokens (contexts x vocabulary can be gigabytes): each batch runs the clean model next to
the modified ones. Clean and ablated numbers are computed once per :class:`LMEval`, with its
first dictionaries.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch

from sweep.activations import lm
from sweep.activations.harvest_dir import EVAL_TOKENS_FILE, tokens_digest
from sweep.activations.store import ChunkStore
from sweep.errors import SweepError, first_line
from sweep.sae import SAE, Params

log = logging.getLogger(__name__)


class LMLosses(NamedTuple):
    """One dictionary's LM metrics (see the module's docstring for each)."""

    ce_loss_clean: float
    ce_loss_spliced: float
    ce_loss_ablated: float
    loss_recovered: float
    kl_div_with_sae: float
    kl_div_with_ablation: float
    kl_div_score: float
    ce_loss_score: float
    ce_loss_with_sae: float
    ce_loss_with_ablation: float
    ce_loss_without_sae: float

    def as_dict(self) -> dict[str, float]:
        return self._asdict()


class Means(NamedTuple):
    """One pass's mean cross-entropy and KL(clean || pass): over every position, and over
    the positions SAEBench keeps (``kept``: no special token)."""

    ce: float
    kl: float
    ce_kept: float
    kl_kept: float


def lm_losses(clean: Means, ablated: Means, zeroed: Means, spliced: Means) -> LMLosses:
    """The metrics from the passes: ``ablated`` zeroes what the SAE replaces, ``zeroed`` all."""
    return LMLosses(
        ce_loss_clean=clean.ce,
        ce_loss_spliced=spliced.ce,
        ce_loss_ablated=ablated.ce,
        loss_recovered=loss_recovered(clean.ce, spliced.ce, ablated.ce),
        kl_div_with_sae=spliced.kl_kept,
        kl_div_with_ablation=zeroed.kl_kept,
        kl_div_score=kl_div_score(spliced.kl_kept, zeroed.kl_kept),
        ce_loss_score=loss_recovered(clean.ce_kept, spliced.ce_kept, zeroed.ce_kept),
        ce_loss_with_sae=spliced.ce_kept,
        ce_loss_with_ablation=zeroed.ce_kept,
        ce_loss_without_sae=clean.ce_kept,
    )


def loss_recovered(clean: float, spliced: float, ablated: float) -> float:
    """(ablated - spliced) / (ablated - clean); NaN when ablation does not change the loss."""
    gap = ablated - clean
    return (ablated - spliced) / gap if abs(gap) > 1e-12 else math.nan


def kl_div_score(kl_sae: float, kl_ablation: float) -> float:
    """(kl_ablation - kl_sae) / kl_ablation; NaN when ablation does not change the outputs."""
    return (kl_ablation - kl_sae) / kl_ablation if abs(kl_ablation) > 1e-12 else math.nan


Replace = Callable[[torch.Tensor], torch.Tensor]


def _hook_fn(replace: Replace, first: int) -> Callable[..., torch.Tensor]:
    """A forward hook applying ``replace`` to positions ``first:`` of (B, P, ...) activations."""

    def hook_fn(act: torch.Tensor, hook: Any = None) -> torch.Tensor:
        flat = act.reshape(*act.shape[:2], -1).clone()  # (B, P, ...) -> (B, P, d)
        flat[:, first:] = replace(flat[:, first:])
        return flat.reshape(act.shape)  # (B, P, d) -> (B, P, ...)

    return hook_fn


RESID_MID = re.compile(r"blocks\.(\d+)\.hook_resid_mid")


def splice_hooks(hook: str, replace: Replace, first: int) -> list[tuple[str, Callable]]:
    """The forward hooks that put ``replace`` in at ``hook``. A block's ``hook_resid_mid`` is,
    in transformer_lens's TransformerBridge, the input of its second LayerNorm (or MLP): read
    there, it is the residual stream between attention and MLP, but what a hook returns there
    reaches only the MLP, while the stream goes on unchanged. So the replacement goes in
    through the attention's output: ``attn_out' = replace(resid_pre + attn_out) - resid_pre``
    makes the stream ``replace(resid_mid)`` (:func:`check_splice` makes sure, per model)."""
    mid = RESID_MID.fullmatch(hook)
    if not mid:
        return [(hook, _hook_fn(replace, first))]
    seen: dict[str, torch.Tensor] = {}

    def keep_pre(act: torch.Tensor, hook: Any = None) -> torch.Tensor:
        seen["pre"] = act
        return act

    def through_attn(act: torch.Tensor, hook: Any = None) -> torch.Tensor:
        pre, out = seen.pop("pre"), act.clone()  # (B, P, d) each
        out[:, first:] = replace(pre[:, first:] + act[:, first:]) - pre[:, first:]
        return out

    block = f"blocks.{mid[1]}"
    return [(f"{block}.hook_resid_pre", keep_pre), (f"{block}.hook_attn_out", through_attn)]


@torch.inference_mode()
def check_splice(model: Any, hook: str, tokens_NP: torch.Tensor, first: int) -> str | None:
    """Why splicing at ``hook`` would not replace what the SAE was trained on (None: it
    does): halving the activations must halve them as read at ``hook`` downstream."""
    if not RESID_MID.fullmatch(hook):
        return None
    toks = tokens_NP[:1].to(next(model.parameters()).device)  # (1, P)
    seen: list[torch.Tensor] = []

    def read(act: torch.Tensor, hook: Any = None) -> torch.Tensor:
        seen.append(act.float())
        return act

    halve = splice_hooks(hook, lambda x: x / 2, first)
    try:
        model.run_with_hooks(toks, fwd_hooks=[(hook, read)])
        model.run_with_hooks(toks, fwd_hooks=[*halve, (hook, read)])
    except Exception as err:  # noqa: BLE001 (a model without the hooks the splice needs)
        return f"a dictionary cannot be spliced in at {hook} in this model ({first_line(err)})"
    clean, got = seen[0][:, first:], seen[1][:, first:]
    if torch.allclose(got, clean / 2, rtol=0.02, atol=0.02 * float(clean.abs().max())):
        return None
    return (
        f"splicing a dictionary in at {hook} does not replace the residual stream in this "
        "model (its stream is not resid_pre + attn_out), so its LM metrics are not computed"
    )


def _log_probs(
    model: Any, toks_BP: torch.Tensor, hook: str | None, replace: Replace | None, first: int
) -> torch.Tensor:
    """Next-token log-probabilities (B, P, V) float32, with ``replace`` at ``hook`` if given."""
    if hook is None or replace is None:
        logits = model(toks_BP, return_type="logits")
    else:
        hooks = splice_hooks(hook, replace, first)
        logits = model.run_with_hooks(toks_BP, fwd_hooks=hooks, return_type="logits")
    lp = logits.float()  # the logits themselves when already float32: normalised in place
    del logits
    lp -= lp.logsumexp(dim=-1, keepdim=True)  # (B, P, V)
    return lp


def _ce_tokens(lp_BPV: torch.Tensor, toks_BP: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy at each predicted position: (B, P - 1) float64."""
    return -lp_BPV[:, :-1].gather(-1, toks_BP[:, 1:, None])[..., 0].double()


def _kl_tokens(ref_BPV: torch.Tensor, lp_BPV: torch.Tensor) -> torch.Tensor:
    """KL(ref || lp) at each position, both log-probabilities: (B, P) float64; one context at
    a time so the temporaries stay (P, V)."""
    return torch.stack(
        [
            torch.nn.functional.kl_div(lp, ref, reduction="none", log_target=True).sum(-1)
            for ref, lp in zip(ref_BPV, lp_BPV, strict=True)  # (P, V) each
        ]
    ).double()


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
        total += float(_ce_tokens(_log_probs(model, toks, hook, replace, first), toks).sum())
        count += toks.shape[0] * (toks.shape[1] - 1)  # predicted positions
    return total / count


@dataclass(frozen=True)
class Intervention:
    """``replace`` applied at the hook to positions ``first:`` (earlier ones keep their own)."""

    replace: Replace
    first: int = 0


class _Sums:
    """Running sums of per-position losses over all positions and over the kept ones."""

    def __init__(self) -> None:
        self.ce = self.kl = self.ce_kept = self.kl_kept = 0.0

    def add(self, ce_BQ: torch.Tensor, kl_BP: torch.Tensor | None, keep_BP: torch.Tensor) -> None:
        self.ce += float(ce_BQ.sum())
        self.ce_kept += float(ce_BQ[keep_BP[:, :-1]].sum())
        if kl_BP is not None:
            self.kl += float(kl_BP.sum())
            self.kl_kept += float(kl_BP[keep_BP].sum())

    def means(self, counts: _Sums) -> Means:
        """The means, ``counts`` holding the number of positions each sum is over."""
        return Means(*(_mean(a, n) for a, n in zip(self._vals(), counts._vals(), strict=True)))

    def _vals(self) -> tuple[float, float, float, float]:
        return self.ce, self.kl, self.ce_kept, self.kl_kept


def _mean(total: float, count: float) -> float:
    return total / count if count else math.nan


@torch.inference_mode()
def ce_and_kl(
    model: Any,
    tokens_NP: torch.Tensor,
    hook: str,
    interventions: Sequence[Intervention],
    batch: int = 16,
    ignore: Collection[int] = (),
) -> tuple[Means, list[Means]]:
    """The clean model's :class:`Means` (its KL 0) and each intervention's at ``hook``;
    ``ignore``: token ids whose positions the ``kept`` means leave out. One clean forward per
    batch serves all interventions; no more than one batch's clean log-probabilities is held."""
    device = next(model.parameters()).device
    ignored = torch.tensor(sorted(ignore), dtype=torch.long, device=device)
    clean, sums, counts = _Sums(), [_Sums() for _ in interventions], _Sums()
    for at in range(0, tokens_NP.shape[0], batch):
        toks = tokens_NP[at : at + batch].to(device)  # (b, P)
        keep = ~torch.isin(toks, ignored)  # (b, P)
        ref = _log_probs(model, toks, None, None, 0)  # (b, P, V)
        clean.add(_ce_tokens(ref, toks), None, keep)
        for acc, act in zip(sums, interventions, strict=True):
            lp = _log_probs(model, toks, hook, act.replace, act.first)  # (b, P, V)
            acc.add(_ce_tokens(lp, toks), _kl_tokens(ref, lp), keep)
            del lp
        del ref
        ones = torch.ones(toks.shape, dtype=torch.float64, device=device)
        counts.add(ones[:, 1:], ones, keep)
    return clean.means(counts), [acc.means(counts) for acc in sums]


def _zero(x: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(x)


def special_ids(model: Any) -> set[int]:
    """The tokenizer's BOS, EOS and PAD ids (SAEBench's ``ignore_tokens``)."""
    tok = getattr(model, "tokenizer", None)
    ids = (getattr(tok, f"{k}_token_id", None) for k in ("bos", "eos", "pad"))
    return {int(i) for i in ids if isinstance(i, int)}


def _splice(sae: SAE) -> Replace:
    def replace(x: torch.Tensor) -> torch.Tensor:
        return sae(x.float()).to(x.dtype)  # (B, P', d): raw-space reconstruction

    return replace


LOGITS_BYTES = 2**31
"""What one batch's log-probabilities may hold: three (b, P, V) float32 tensors are alive at
once (the clean ones, a replaced pass's and its normalisation's temporary)."""


def contexts_per_batch(model: Any, positions: int, most: int = 16) -> int:
    """Contexts per forward: at most ``most``, fewer for a large vocabulary or long contexts
    (a 256k vocabulary at 1024 positions: one)."""
    vocab = int(getattr(getattr(model, "cfg", None), "d_vocab", 0) or 0)
    if vocab <= 0:
        return most
    return max(1, min(most, LOGITS_BYTES // (3 * 4 * positions * vocab)))


class LMEval:
    """LM metrics of many SAEs at one hook: clean and ablated losses are computed once."""

    def __init__(
        self,
        model: Any,
        hook: str,
        tokens_NP: torch.Tensor,
        first: int = 0,
        batch: int = 0,
        ignore: Collection[int] | None = None,
    ) -> None:
        """``batch``: contexts per forward (0: as many as :data:`LOGITS_BYTES` allows);
        ``ignore``: special token ids (default: the tokenizer's BOS, EOS and PAD)."""
        self.model, self.hook, self.tokens, self.first = model, hook, tokens_NP, first
        self.batch = batch or contexts_per_batch(model, tokens_NP.shape[1])
        self.ignore = special_ids(model) if ignore is None else set(ignore)
        self._baseline: tuple[Means, Means, Means] | None = None  # clean, ablated, zeroed

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def losses(self, sae: SAE) -> LMLosses:
        return self.losses_of([sae])[0]

    def losses_of(self, saes: Sequence[SAE]) -> list[LMLosses]:
        """Each dictionary's losses, all from the same passes over the tokens: one clean
        forward per batch serves every dictionary (and, the first time, the ablations)."""
        splices = [Intervention(_splice(sae.to(self.device)), self.first) for sae in saes]
        if self._baseline is None:  # the first dictionaries: clean and ablated in the same pass
            ablations = [Intervention(_zero, self.first)] + [Intervention(_zero)] * (self.first > 0)
            clean, means = self._measure([*ablations, *splices])
            ablated, zeroed = means[0], means[len(ablations) - 1]
            self._baseline, spliced = (clean, ablated, zeroed), means[len(ablations) :]
        else:
            _, spliced = self._measure(splices)
        return [lm_losses(*self._baseline, m) for m in spliced]

    def _measure(self, interventions: Sequence[Intervention]) -> tuple[Means, list[Means]]:
        return ce_and_kl(self.model, self.tokens, self.hook, interventions, self.batch, self.ignore)

    @classmethod
    def prepare(
        cls, store: ChunkStore, device: torch.device | str, max_tokens: int | None = None
    ) -> tuple[LMEval | None, str | None]:
        """(evaluator, None), or (None, why not) — why is None where there is nothing to
        evaluate (a store without a model, or ``max_tokens`` 0)."""
        info = store.provenance.get("source_info", {})
        if not info.get("model") or not info.get("hook") or max_tokens == 0:
            return None, None
        held_out = store.provenance.get("lm_eval", {})
        f = store.path / held_out.get("file", EVAL_TOKENS_FILE)
        if not f.is_file():
            return None, f"store {store.path} has no held-out tokens ({f.name})"
        if held_out.get("sha256") and tokens_digest(f) != held_out["sha256"]:
            return None, (
                f"held-out tokens {f} hold other bits than the harvest wrote: re-run the "
                "'sweep harvest' command that made the store to write them again"
            )
        try:
            tokens = torch.from_numpy(np.load(f, allow_pickle=False).astype(np.int64))  # (N, P)
            if tokens.ndim != 2 or tokens.shape[1] == 0:
                raise ValueError(f"shape {tuple(tokens.shape)}, not (contexts, positions)")
        except Exception as err:  # noqa: BLE001 (an npz, a zip, a damaged header: all unusable)
            return None, f"held-out tokens {f} are unreadable ({err})"
        if max_tokens is not None:
            tokens = tokens[: max(1, math.ceil(max_tokens / tokens.shape[1]))]
        if tokens.shape[0] == 0:
            return None, None
        try:
            model = lm.load_model(info["model"], device, info.get("model_dtype", "float32"))
        except SweepError as err:
            return None, str(err)
        first = int(bool(info.get("prepend_bos")) and bool(info.get("drop_bos")))
        why = check_splice(model, info["hook"], tokens, first)
        return (None, why) if why else (cls(model, info["hook"], tokens, first), None)


def member_metrics(ev: LMEval | None, params: Params, cfg: dict) -> dict[str, float]:
    """LM metrics of one run's dictionary (``params`` as trained, ``cfg`` its cfg.json); {} when
    there is no evaluator or the dictionary is not finite (diverged)."""
    return members_metrics(ev, [params], [cfg])[0]


GROUP_BYTES = 2**31
"""Dictionaries spliced in the same passes at most hold this many bytes together (each is a
copy of a member's weights, scaled, on the model's device)."""


def members_metrics(
    ev: LMEval | None, params: Sequence[Params], cfgs: Sequence[dict]
) -> list[dict[str, float]]:
    """:func:`member_metrics` of many runs, in groups that share their passes (a clean forward
    per batch for a group, not per run)."""
    out: list[dict[str, float]] = [{} for _ in params]
    if ev is None:
        return out
    finite = [
        i for i, p in enumerate(params) if all(bool(torch.isfinite(v).all()) for v in p.values())
    ]
    for group in groups_of(params, finite):
        saes = [SAE(params[i], cfgs[i]) for i in group]
        for i, losses in zip(group, ev.losses_of(saes), strict=True):
            out[i] = losses.as_dict()
        del saes
    return out


def groups_of(params: Sequence[Params], members: list[int] | None = None) -> list[list[int]]:
    """``members`` (default: all) in order, cut into groups whose weights hold at most
    :data:`GROUP_BYTES` (one member at least)."""
    members = list(range(len(params))) if members is None else members
    nbytes = [sum(v.numel() * 4 for v in p.values()) for p in params]
    groups: list[list[int]] = []
    size = 0
    for i in members:
        if not groups or size + nbytes[i] > GROUP_BYTES:
            groups.append([])
            size = 0
        groups[-1].append(i)
        size += nbytes[i]
    return groups
