"""ReLU SAEs with an L1 penalty: ``untied`` (a separate decoder) and ``tied`` (the decoder
is the row-normalised transpose of the encoder).

Untied, parameters ``W_enc (D, F)``, ``b_enc (F,)``, ``W_dec (F, D)``, ``b_dec (D,)``::

    codes = relu((x - b_dec) @ W_enc + b_enc)
    x_hat = codes @ W_dec + b_dec

and one of two recipes (``sae.recipe``):

- ``unit``: decoder rows renormalised to unit norm after every step, initialised at unit norm::

    loss = mean((x_hat - x)**2) + l1 * mean_batch(sum_features(codes))

- ``weighted`` (Anthropic's April 2024 update, SAELens's standard SAE): the decoder norm is
  free, each code's L1 is weighted by its decoder row's norm, decoder rows start at norm
  ``sae.init_decoder_norm`` (0.1) with the encoder as their transpose::

    loss = mean((x_hat - x)**2) + l1 * mean_batch(sum_features(codes * ||W_dec_f||))

The MSE is a mean over batch AND dimensions; the L1 is NOT scaled by dictionary size.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import torch

from sweep.archs.base import Architecture, Hyper, Params, register, unit_rows

L1_LOSS = "mean((x_hat - x)**2) + l1 * mean_batch(sum_features(codes))"
WEIGHTED_LOSS = "mean((x_hat - x)**2) + l1 * mean_batch(sum_features(codes * ||W_dec_f||))"
WEIGHTED_INIT_NORM = 0.1


@register
class Untied(Architecture):
    name: ClassVar[str] = "untied"
    resamples: ClassVar[bool] = True
    fast: ClassVar[bool] = True
    recipes: ClassVar[tuple[str, ...]] = ("unit", "weighted")
    recipe = "unit"
    loss_text = L1_LOSS

    def apply_recipe(self, recipe: str) -> None:
        self.recipe = recipe
        weighted = recipe == "weighted"
        self.unit_decoder, self.weighted_l1 = not weighted, weighted
        self.init_decoder_norm = WEIGHTED_INIT_NORM if weighted else 1.0
        self.loss_text = WEIGHTED_LOSS if weighted else L1_LOSS

    def penalty(
        self, params: Params, codes_BF: torch.Tensor, pre_BF: torch.Tensor, hyper: Hyper
    ) -> torch.Tensor:
        if self.weighted_l1:
            codes_BF = codes_BF * params["W_dec"].norm(dim=1)  # (B, F) * (F,)
        return hyper["l1"] * codes_BF.sum(dim=1).mean()  # codes >= 0: the mean L1 norm


@register
class Tied(Untied):
    name: ClassVar[str] = "tied"
    fast: ClassVar[bool] = True  # (its own: sweep.fasttied, see batched_grads)
    recipes: ClassVar[tuple[str, ...]] = ()
    recipe = ""

    def batched_grads(self) -> Callable:
        from sweep import fasttied  # (it imports the archs)

        return fasttied.grads

    def init_params(
        self, d: int, f: int, g: torch.Generator, b_dec: torch.Tensor | None = None
    ) -> Params:
        params = super().init_params(d, f, g, b_dec)
        del params["W_dec"]
        return params

    def decoder(self, params: Params) -> torch.Tensor:
        return unit_rows(params["W_enc"].T)  # (D, F) -> (F, D)
