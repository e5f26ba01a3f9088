"""``jumprelu`` (Rajamanoharan et al. 2024; the Gemma Scope recipe).

Parameters as the untied SAE plus ``log_threshold (F,)``; ``threshold = exp(log_threshold)``::

    codes = pre * (pre > threshold)                      pre = (x - b_dec) @ W_enc + b_enc
    loss  = mean((x_hat - x)**2) + l1 * mean_batch(L0)   L0 = sum_features(pre > threshold)

The grid's ``l1`` is the L0 coefficient. Our MSE is a mean over dimensions, so ``l1`` here is
SAELens's / Gemma Scope's coefficient (whose MSE sums over dimensions) divided by the width.
The step function has no gradient; the threshold learns through straight-through estimators
with a rectangle kernel of width :data:`BANDWIDTH` (Gemma Scope's):

    d codes / d threshold = -(threshold / BANDWIDTH) * [|pre - threshold| < BANDWIDTH / 2]
    d L0    / d threshold = -(1 / BANDWIDTH)         * [|pre - threshold| < BANDWIDTH / 2]

Decoder rows are kept at unit norm; thresholds start at :data:`INIT_THRESHOLD` (SAELens's
defaults, for activations scaled to mean row norm sqrt(width) as ours are).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch

from sweep.archs.base import Architecture, Hyper, Params, register

BANDWIDTH = 1e-3
INIT_THRESHOLD = 1e-3
RESPONSIVE_THRESHOLD = 0.1
"""A threshold below this cannot sparsify codes of activations scaled to mean row norm
sqrt(width) (see :meth:`JumpReLU.check_schedule`)."""
JUMPRELU_LOSS = "mean((x_hat - x)**2) + l1 * mean_batch(sum_features(pre > threshold))"


def _window(pre: torch.Tensor, thr: torch.Tensor) -> torch.Tensor:
    return ((pre - thr).abs() < BANDWIDTH / 2).to(pre.dtype)


class _JumpReLU(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(pre: torch.Tensor, thr: torch.Tensor) -> torch.Tensor:
        return pre * (pre > thr).to(pre.dtype)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pre, thr = ctx.saved_tensors  # (B, F), (F,)
        g_pre = g * (pre > thr).to(g.dtype)
        g_thr = -(thr / BANDWIDTH) * _window(pre, thr) * g
        return g_pre, g_thr.sum(dim=0)


class _Step(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(pre: torch.Tensor, thr: torch.Tensor) -> torch.Tensor:
        return (pre > thr).to(pre.dtype)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pre, thr = ctx.saved_tensors
        g_thr = -(1.0 / BANDWIDTH) * _window(pre, thr) * g
        return torch.zeros_like(pre), g_thr.sum(dim=0)


@register
class JumpReLU(Architecture):
    name: ClassVar[str] = "jumprelu"
    loss_text = JUMPRELU_LOSS
    saelens: ClassVar[str] = "jumprelu"

    def init_params(
        self, d: int, f: int, g: torch.Generator, b_dec: torch.Tensor | None = None
    ) -> Params:
        params = super().init_params(d, f, g, b_dec)
        params["log_threshold"] = torch.full((f,), math.log(INIT_THRESHOLD))
        return params

    def activate(
        self, pre_BF: torch.Tensor, hyper: Hyper, params: Params, kmax: int
    ) -> torch.Tensor:
        return _JumpReLU.apply(pre_BF, params["log_threshold"].exp())

    def infer(self, pre_BF: torch.Tensor, k: int, params: Params) -> torch.Tensor:
        return pre_BF * (pre_BF > params["log_threshold"].exp()).to(pre_BF.dtype)

    def saelens_form(self, saved: Params, k: int) -> tuple[Params, dict]:
        return {"threshold": saved["log_threshold"].exp().float()}, {}

    def check_schedule(self, steps: int, lr: float) -> str | None:
        """Adam moves ``log_threshold`` by at most about ``lr`` a step: from
        :data:`INIT_THRESHOLD` a threshold reaches ``INIT_THRESHOLD * exp(lr * steps)`` at most.
        Below :data:`RESPONSIVE_THRESHOLD` (pre-activations of scaled activations are O(0.1-1))
        the L0 penalty cannot change which codes fire: every ``l1`` gives the same dense L0
        (measured on SmolLM2 activations, BENCHMARKS.md)."""
        reach = INIT_THRESHOLD * math.exp(min(lr * steps, 50.0))
        if reach >= RESPONSIVE_THRESHOLD:
            return None
        need = math.ceil(math.log(RESPONSIVE_THRESHOLD / INIT_THRESHOLD) / lr)
        return (
            f"jumprelu thresholds start at {INIT_THRESHOLD:g} and move at most ~lr per step in "
            f"log space: in {steps} steps at lr {lr:g} they stay below {reach:.2g}, so grid.l1 "
            f"will barely change L0; train for >= {need} steps (more rows or train.epochs) or "
            "use sae=topk / sae=batchtopk for a short sweep"
        )

    def penalty(
        self, params: Params, codes_BF: torch.Tensor, pre_BF: torch.Tensor, hyper: Hyper
    ) -> torch.Tensor:
        l0_BF = _Step.apply(pre_BF, params["log_threshold"].exp())
        return hyper["l1"] * l0_BF.sum(dim=1).mean()
