"""``jumprelu`` (Rajamanoharan et al. 2024, Gemma Scope), in one of two recipes
(``sae.recipe``) for how the per-feature threshold is trained::

    codes = pre * (pre > threshold)                      pre = (x - b_dec) @ W_enc + b_enc
    loss  = mean((x_hat - x)**2) + l1 * mean_batch(L0)   L0 = sum_features(pre > threshold)

The grid's ``l1`` is the L0 coefficient. Our MSE is a mean over dimensions, so ``l1`` here is
SAELens's / Gemma Scope's coefficient (whose MSE sums over dimensions) divided by the width.
The step function has no gradient; the threshold learns through straight-through estimators
with a rectangle kernel of width ``bandwidth``:

    d codes / d threshold = -(threshold / bandwidth) * [|pre - threshold| < bandwidth / 2]
    d L0    / d threshold = -(1 / bandwidth)         * [|pre - threshold| < bandwidth / 2]

- ``linear`` (default; SAELens 6's): the parameter ``threshold (F,)`` itself, starting at
  0.01, bandwidth 0.05, kept >= 0 after each step. Adam moves it ~lr a step, so a few hundred
  steps reach the codes' scale.
- ``log`` (Gemma Scope's, SAELens 5's): ``log_threshold (F,)``, threshold =
  exp(log_threshold), starting at 0.001, bandwidth 0.001. Adam moves the log by ~lr a step,
  so the threshold grows at most by exp(lr) a step: on SmolLM2 activations every ``l1`` gave
  the same dense L0 after 126 steps (BENCHMARKS.md); it needs thousands of steps.

Decoder rows are kept at unit norm. Thresholds are in the space of activations scaled to mean
row norm sqrt(width), as SAELens's are.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from sweep.archs.base import Architecture, Hyper, Params, register


@dataclass(frozen=True)
class Recipe:
    param: str
    """The parameter the optimizer trains: ``threshold`` or ``log_threshold``."""
    init: float
    """Initial threshold."""
    bandwidth: float
    gpu_dtype: str
    """What ``train.dtype=auto`` computes in on a GPU. Not bfloat16 for a bandwidth below its
    spacing of pre-activations (2^-8 to 2^-7 between 0.5 and 2): the window would hold a
    rounded value or none, and each feature's threshold gradient is off by how near its
    threshold lies to a bfloat16 value (cosine 0.41 to fp32's, averaged over 164k rows:
    ``scripts/jumprelu_precision.py``)."""


RECIPES = {
    "linear": Recipe("threshold", 0.01, 0.05, "bfloat16"),
    "log": Recipe("log_threshold", 1e-3, 1e-3, "tf32"),
}
RESPONSIVE_THRESHOLD = 0.1
"""A threshold below this cannot sparsify codes of activations scaled to mean row norm
sqrt(width) (see :meth:`JumpReLU.check_schedule`)."""
JUMPRELU_LOSS = "mean((x_hat - x)**2) + l1 * mean_batch(sum_features(pre > threshold))"


def _window(pre: torch.Tensor, thr: torch.Tensor, bandwidth: float) -> torch.Tensor:
    return ((pre - thr).abs() < bandwidth / 2).to(pre.dtype)


class _JumpReLU(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(pre: torch.Tensor, thr: torch.Tensor, bandwidth: float) -> torch.Tensor:
        return pre * (pre > thr).to(pre.dtype)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
        ctx.save_for_backward(*inputs[:2])
        ctx.bandwidth = inputs[2]

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        pre, thr = ctx.saved_tensors  # (B, F), (F,)
        g_pre = g * (pre > thr).to(g.dtype)
        g_thr = -(thr / ctx.bandwidth) * _window(pre, thr, ctx.bandwidth) * g
        return g_pre, g_thr.sum(dim=0), None


class _Step(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(pre: torch.Tensor, thr: torch.Tensor, bandwidth: float) -> torch.Tensor:
        return (pre > thr).to(pre.dtype)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
        ctx.save_for_backward(*inputs[:2])
        ctx.bandwidth = inputs[2]

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        pre, thr = ctx.saved_tensors
        g_thr = -(1.0 / ctx.bandwidth) * _window(pre, thr, ctx.bandwidth) * g
        return torch.zeros_like(pre), g_thr.sum(dim=0), None


def threshold_of(params: Params) -> torch.Tensor:
    """The thresholds of trained parameters in either recipe's form."""
    if "threshold" in params:
        return params["threshold"]
    return params["log_threshold"].exp()


@register
class JumpReLU(Architecture):
    name: ClassVar[str] = "jumprelu"
    loss_text = JUMPRELU_LOSS
    saelens: ClassVar[str] = "jumprelu"
    fast: ClassVar[bool] = True
    l1_codes: ClassVar[bool] = False
    l0_penalty: ClassVar[bool] = True
    keeps_pre: ClassVar[bool] = True
    recipes: ClassVar[tuple[str, ...]] = tuple(RECIPES)
    recipe = "linear"
    form: Recipe = RECIPES["linear"]

    def apply_recipe(self, recipe: str) -> None:
        self.recipe, self.form = recipe, RECIPES[recipe]
        self.gpu_dtype = self.form.gpu_dtype

    def init_params(
        self, d: int, f: int, g: torch.Generator, b_dec: torch.Tensor | None = None
    ) -> Params:
        params = super().init_params(d, f, g, b_dec)
        init = self.form.init if self.form.param == "threshold" else math.log(self.form.init)
        params[self.form.param] = torch.full((f,), init)
        return params

    def activate(
        self, pre_BF: torch.Tensor, hyper: Hyper, params: Params, kmax: int
    ) -> torch.Tensor:
        return _JumpReLU.apply(pre_BF, threshold_of(params), self.form.bandwidth)

    def infer(self, pre_BF: torch.Tensor, k: int, params: Params) -> torch.Tensor:
        return pre_BF * (pre_BF > threshold_of(params)).to(pre_BF.dtype)

    def keep_batched(
        self,
        pre_EBF: torch.Tensor,
        hyper: Hyper,
        kmax: int,
        params: Params,
        scratch: torch.Tensor,
    ) -> None:
        """Codes above each member's thresholds (>= 0, so every kept code is positive). The
        mask is built in floats, in ``scratch``: on CPU an op mixing a bool tensor into float
        arithmetic runs ~7x slower."""
        pre_EBF.mul_(torch.gt(pre_EBF, threshold_of(params)[:, None, :], out=scratch))

    def fast_grads(
        self, g_EBF: torch.Tensor, pre_EBF: torch.Tensor | None, params: Params, hyper: Hyper
    ) -> Params:
        """The thresholds' straight-through gradients (module docstring), both terms from
        one window over the pre-activations (whose buffer then serves as scratch); a log
        threshold's by the chain rule."""
        assert pre_EBF is not None
        thr = threshold_of(params)  # (E, F) float32
        B, bw = g_EBF.shape[1], self.form.bandwidth
        near = pre_EBF.sub_(thr[:, None, :]).abs_().lt_(bw / 2)  # (E, B, F) 1.0 / 0.0
        through_l0 = near.sum(dim=1, dtype=torch.float32) * (hyper["l1"][:, None] / B)
        through_codes = near.mul_(g_EBF).sum(dim=1, dtype=torch.float32)  # (E, F)
        d_thr = -(thr * through_codes + through_l0) / bw
        if self.form.param == "log_threshold":
            return {"log_threshold": d_thr * thr}
        return {"threshold": d_thr}

    def constrain(self, params: Params, active: torch.Tensor) -> None:
        """Unit decoder rows; a linear threshold is kept >= 0 (below, the gate would pass
        negative pre-activations) by projection, which leaves its gradient alone."""
        super().constrain(params, active)
        if self.form.param == "threshold":
            t = params["threshold"]  # (E, F)
            t.copy_(torch.where(active[:, None], t.clamp(min=0.0), t))

    def saelens_form(self, saved: Params, k: int) -> tuple[Params, dict]:
        return {"threshold": threshold_of(saved).float()}, {}

    def check_schedule(self, steps: int, lr: float) -> str | None:
        """Adam moves a parameter by at most about ``lr`` a step: a linear threshold reaches
        ``init + lr * steps``, a log one ``init * exp(lr * steps)``. Below
        :data:`RESPONSIVE_THRESHOLD` (codes of scaled activations are O(0.1-1)) the L0 penalty
        cannot change which codes fire: every ``l1`` gives the same dense L0 (measured on
        SmolLM2 activations with the log recipe, BENCHMARKS.md)."""
        init, linear = self.form.init, self.form.param == "threshold"
        reach = init + lr * steps if linear else init * math.exp(min(lr * steps, 50.0))
        if reach >= RESPONSIVE_THRESHOLD:
            return None
        gap = RESPONSIVE_THRESHOLD - init if linear else math.log(RESPONSIVE_THRESHOLD / init)
        how, other = ("", "") if linear else (" in log space", "use sae.recipe=linear, ")
        return (
            f"jumprelu thresholds (sae.recipe={self.recipe}) start at {init:g} and move at most "
            f"~lr per step{how}: in {steps} steps at a mean lr of {lr:g} they stay below "
            f"{reach:.2g}, so "
            f"grid.l1 will barely change L0; train for >= {math.ceil(gap / lr - 1e-6)} steps "
            f"(more rows or train.epochs), {other}or use sae=topk / sae=batchtopk"
        )

    def penalty(
        self, params: Params, codes_BF: torch.Tensor, pre_BF: torch.Tensor, hyper: Hyper
    ) -> torch.Tensor:
        l0_BF = _Step.apply(pre_BF, threshold_of(params), self.form.bandwidth)
        return hyper["l1"] * l0_BF.sum(dim=1).mean()
