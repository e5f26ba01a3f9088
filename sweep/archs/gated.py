"""``gated`` (Rajamanoharan et al. 2024, "Improving Dictionary Learning with Gated Sparse
Autoencoders"): which features fire and how strongly are decided by two paths that share the
encoder's directions (the paper's weight sharing, ``W_mag = W_enc * exp(r_mag)``)::

    z      = (x - b_dec) @ W_enc                       (B, F)  (what :meth:`Gated.pre` returns)
    gate   = z + b_enc                                 b_enc is the gate's bias: SAELens's b_gate
    mag    = z * exp(r_mag) + b_mag
    codes  = [gate > 0] * relu(mag)
    x_hat  = codes @ W_dec + b_dec
    loss   = mean((x_hat - x)**2)
             + l1 * mean_batch(sum_features(relu(gate)))
             + mean((relu(gate) @ sg(W_dec) + sg(b_dec) - x)**2)

``sg``: stop-gradient (the paper's frozen decoder copy, as dictionary_learning trains it;
SAELens lets that term's gradient reach the decoder too). The step ``[gate > 0]`` has no
gradient: the gate learns through the L1 and auxiliary terms alone, the magnitudes through
the reconstruction. Decoder rows are kept at unit norm (so the paper's L1 weighted by decoder
norms is the plain L1 here). Our MSEs are means over dimensions, the paper's sums: ``l1``
here is its coefficient divided by the width. ``r_mag`` and ``b_mag`` start at 0, so the two
paths start equal (the codes are a ReLU SAE's).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import torch
import torch.nn.functional as F

from sweep.archs.base import Architecture, Hyper, Params, register

GATED_LOSS = (
    "mean((x_hat - x)**2) + l1 * mean_batch(sum_features(relu(gate)))"
    " + mean((relu(gate) @ sg(W_dec) + sg(b_dec) - x)**2)"
)
MAGNITUDE = ("r_mag", "b_mag")
"""The magnitude path's own per-feature parameters."""


@register
class Gated(Architecture):
    name: ClassVar[str] = "gated"
    loss_text = GATED_LOSS
    saelens: ClassVar[str] = "gated"
    saelens_renamed: ClassVar[dict[str, str]] = {"b_enc": "b_gate"}
    fast: ClassVar[bool] = True  # (its own: sweep.fastgated, see batched_grads)
    l1_codes: ClassVar[bool] = False
    resamples: ClassVar[bool] = True
    feature_params: ClassVar[tuple[str, ...]] = MAGNITUDE

    def batch_buffers_at(self, d: int, f: int) -> float:
        """The fast step's (B, F) buffers per member (:mod:`sweep.fastgated`: z, the gate's
        ReLU, the codes, their gradient) and its second (B, D) error, ``d / f`` of one."""
        return 4 + d / f

    def batched_grads(self) -> Callable:
        from sweep import fastgated  # (it imports the archs)

        return fastgated.grads

    def init_params(
        self, d: int, f: int, g: torch.Generator, b_dec: torch.Tensor | None = None
    ) -> Params:
        params = super().init_params(d, f, g, b_dec)
        return {**params, **{name: torch.zeros(f) for name in MAGNITUDE}}

    def pre(self, params: Params, x_BD: torch.Tensor) -> torch.Tensor:
        return (x_BD - params["b_dec"]) @ params["W_enc"]  # z: both paths' shared product

    def activate(
        self, pre_BF: torch.Tensor, hyper: Hyper, params: Params, kmax: int
    ) -> torch.Tensor:
        return self.infer(pre_BF, 0, params)

    def infer(self, pre_BF: torch.Tensor, k: int, params: Params) -> torch.Tensor:
        open_BF = (pre_BF + params["b_enc"] > 0).to(pre_BF.dtype)  # no gradient
        return open_BF * F.relu(pre_BF * params["r_mag"].exp() + params["b_mag"])

    def gate_codes(self, params: Params, pre_BF: torch.Tensor) -> torch.Tensor:
        return F.relu(pre_BF + params["b_enc"])

    def penalty(
        self, params: Params, codes_BF: torch.Tensor, pre_BF: torch.Tensor, hyper: Hyper
    ) -> torch.Tensor:
        return hyper["l1"] * self.gate_codes(params, pre_BF).sum(dim=1).mean()

    def saelens_form(self, saved: Params, k: int) -> tuple[Params, dict]:
        return {name: saved[name].float() for name in MAGNITUDE}, {}
