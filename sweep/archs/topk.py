"""Direct sparsity control: ``topk`` (Gao et al. 2024) and ``batchtopk`` (Bussmann et al. 2024).

Both are untied SAEs with unit-norm decoder rows and a data-mean ``b_dec``; no sparsity
penalty (``loss = mean((x_hat - x)**2)`` plus, when on, the AuxK term of
:func:`sweep.sae.auxk_loss`).

- ``topk``: each row keeps its ``k`` largest pre-activations (then ReLU); all others are 0.
- ``batchtopk``: each member keeps the ``k * B`` largest ReLU'd pre-activations of the whole
  batch (every code at least the ``k * B``-th largest: a tie at that value keeps all its
  codes), so a row may use more or fewer than ``k``. At inference there is no batch: a code
  is kept when its pre-activation exceeds ``threshold``, a running average (factor
  :data:`THRESHOLD_BETA` per step) of the smallest code kept in each training batch, saved
  with the weights.

Members of one ensemble may have different ``k``. On a GPU every member takes one
top-``kmax`` (the largest k in the ensemble) and keeps the first ``k`` of its sorted values
(TopK) or the codes at least its ``k * B``-th value (BatchTopK): one launch, no host sync.
On CPU, where a top-k's cost grows with k, each member selects at its own k (TopK: an
unsorted top-k per row; BatchTopK: its exact threshold from :func:`nth_largest`, no sort).
All select the same codes, up to ties: equal values at the k-th place may be broken
differently, so in bfloat16, where half of the rows of a 16384-latent dictionary have such a
tie, a member's latents depend on which others share its ensemble (its codes' values do not).
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F

from sweep.archs.base import Architecture, Hyper, Params, register

TOPK_LOSS = "mean((x_hat - x)**2) [+ auxk_alpha * AuxK]"
THRESHOLD_BETA = 0.9
"""BatchTopK's threshold: threshold <- beta * threshold + (1 - beta) * (smallest kept code).
Measured on SmolLM2-135M activations (BENCHMARKS.md): the smallest kept code falls about 3x
over the first hundred steps, and with SAELens's 0.99 the threshold lagged so far behind that
inference kept k/2 codes per row after 126 steps; at 0.9 it keeps k. The statistic is the
(k*B)-th largest of B*F codes, so a short average is not noisy."""


def keep_first(vals: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Zero all but the first ``k`` entries of the last axis (``k`` a 0-d tensor)."""
    rank = torch.arange(vals.shape[-1], device=vals.device)
    return vals * (rank < k).to(vals.dtype)


def nth_largest(flat_N: torch.Tensor, n: int, f: int) -> torch.Tensor:
    """The ``n``-th largest entry of ``flat_N`` (a batch of codes, ``f`` latents per row),
    exactly, without sorting it: a strided sample (the stride shares no factor with ``f``,
    so every latent is sampled) bounds it from below; the exact value is selected among the
    entries above that bound (all of them if the bound was too high)."""
    stride = next(p for p in (17, 19, 23, 29, 31, 37) if f % p)
    sample = flat_N[::stride]
    expect = n / stride  # entries of the sample above the n-th largest, on average
    j = min(sample.numel(), int(expect + 4 * math.sqrt(expect)) + 16)  # + 4 sigma + 16
    low = sample.kthvalue(sample.numel() - j + 1).values  # the sample's j-th largest
    cand = flat_N[flat_N >= low]
    if cand.numel() < n:
        cand = flat_N
    return cand.kthvalue(cand.numel() - n + 1).values


@register
class TopK(Architecture):
    name: ClassVar[str] = "topk"
    knob: ClassVar[str] = "k"
    loss_text = TOPK_LOSS
    saelens: ClassVar[str] = "topk"
    fast: ClassVar[bool] = True
    l1_codes: ClassVar[bool] = False

    def activate(
        self, pre_BF: torch.Tensor, hyper: Hyper, params: Params, kmax: int
    ) -> torch.Tensor:
        vals, idx = pre_BF.topk(kmax, dim=-1)  # (B, kmax), sorted
        vals = keep_first(F.relu(vals), hyper["k"])
        return torch.zeros_like(pre_BF).scatter(-1, idx, vals)

    def infer(self, pre_BF: torch.Tensor, k: int, params: Params) -> torch.Tensor:
        vals, idx = pre_BF.topk(k, dim=-1)
        return torch.zeros_like(pre_BF).scatter(-1, idx, F.relu(vals))

    def keep_batched(
        self,
        pre_EBF: torch.Tensor,
        hyper: Hyper,
        kmax: int,
        params: Params,
        scratch: torch.Tensor,
    ) -> None:
        if pre_EBF.device.type == "cpu" and not torch.compiler.is_compiling():
            # a top-k's cost grows with k: each member at its own
            self.keep_each(pre_EBF, hyper["k"].tolist())
        else:  # one launch, no host sync
            self.keep_all(pre_EBF, hyper["k"], kmax)

    def keep_all(self, pre_EBF: torch.Tensor, k_E: torch.Tensor, kmax: int) -> None:
        """:meth:`keep_batched` as one top-``kmax`` and a per-member rank mask."""
        vals, idx = pre_EBF.topk(kmax, dim=-1)  # (E, B, kmax)
        rank = torch.arange(kmax, device=vals.device)
        vals.relu_().mul_((rank[None, None, :] < k_E[:, None, None]).to(vals.dtype))
        pre_EBF.zero_().scatter_(-1, idx, vals)

    def keep_each(self, pre_EBF: torch.Tensor, ks: list[int]) -> None:
        """:meth:`keep_batched` member by member, each at its own k."""
        for pre_BF, k in zip(pre_EBF, ks, strict=True):
            vals, idx = pre_BF.topk(k, dim=-1, sorted=False)
            pre_BF.zero_().scatter_(-1, idx, vals.relu_())

    def saelens_form(self, saved: Params, k: int) -> tuple[Params, dict]:
        return {}, {"k": k, "rescale_acts_by_decoder_norm": False}

    def check_hyper(self, value: float, dict_size: int) -> str | None:
        if value != int(value) or not 0 < value <= dict_size:
            return (
                f"grid.k values must be whole numbers in [1, dict size {dict_size}], got {value:g}"
            )
        return None


@register
class BatchTopK(TopK):
    name: ClassVar[str] = "batchtopk"
    saelens: ClassVar[str] = "jumprelu"
    """SAELens saves a trained BatchTopK SAE for inference as a JumpReLU SAE whose every
    feature has the learned threshold (relu(pre) * (pre > threshold): our inference form)."""
    buffers: ClassVar[tuple[str, ...]] = ("threshold",)

    def init_buffers(self, f: int) -> Params:
        return {"threshold": torch.full((), -1.0)}  # < 0: not measured yet

    def activate(
        self, pre_BF: torch.Tensor, hyper: Hyper, params: Params, kmax: int
    ) -> torch.Tensor:
        B = pre_BF.shape[0]
        flat = F.relu(pre_BF).reshape(-1)  # (B*F,)
        vals = flat.topk(min(kmax * B, flat.shape[0])).values  # sorted, descending
        n = (hyper["k"] * B).clamp(max=vals.shape[0]).reshape(1)
        tau = vals.gather(0, n - 1)  # the (k*B)-th largest code
        return (flat * (flat >= tau).to(flat.dtype)).reshape(pre_BF.shape)

    def infer(self, pre_BF: torch.Tensor, k: int, params: Params) -> torch.Tensor:
        return F.relu(pre_BF) * (pre_BF > params["threshold"]).to(pre_BF.dtype)

    def keep_all(self, pre_EBF: torch.Tensor, k_E: torch.Tensor, kmax: int) -> None:
        E, B, F_ = pre_EBF.shape
        flat = pre_EBF.view(E, B * F_).relu_()
        vals = flat.topk(min(kmax * B, B * F_), dim=-1).values  # (E, kmax*B), descending
        n = (k_E * B).clamp(max=vals.shape[1])[:, None]
        flat.mul_((flat >= vals.gather(1, n - 1)).to(flat.dtype))

    def keep_each(self, pre_EBF: torch.Tensor, ks: list[int]) -> None:
        E, B, F_ = pre_EBF.shape
        for flat_N, k in zip(pre_EBF.view(E, B * F_).relu_(), ks, strict=True):
            if k * B < flat_N.numel():
                tau = nth_largest(flat_N, k * B, F_)
                below = torch.nextafter(tau, tau.new_tensor(-math.inf))  # in codes' dtype
                F.threshold_(flat_N, float(below), 0.0)  # keep codes >= tau

    def saelens_form(self, saved: Params, k: int) -> tuple[Params, dict]:
        f = saved["b_enc"].shape[0]
        return {"threshold": saved["threshold"].float() * torch.ones(f)}, {}

    def update_buffers(
        self, buffers: Params, codes_EBF: torch.Tensor, active: torch.Tensor
    ) -> None:
        """Fold each member's smallest kept code of this batch into its threshold."""
        kept = F.threshold(codes_EBF, 0.0, torch.inf).amin(dim=(1, 2))  # (E,) codes are >= 0
        old = buffers["threshold"]  # (E,)
        new = torch.where(old < 0, kept, THRESHOLD_BETA * old + (1 - THRESHOLD_BETA) * kept)
        ok = active & torch.isfinite(kept)
        old.copy_(torch.where(ok, new, old))
