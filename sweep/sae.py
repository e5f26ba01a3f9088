"""The math of ONE sparse autoencoder, written for a single member.

``ensemble.py`` is the only place that adds the member axis (with ``torch.func.vmap``).

Shapes: ``x_BD`` a batch of B activations of width D; ``codes_BF`` F dictionary features.

Untied SAE (``arch="untied"``), parameters ``W_enc (D, F)``, ``b_enc (F,)``,
``W_dec (F, D)`` with unit-norm rows, ``b_dec (D,)``::

    codes = relu((x - b_dec) @ W_enc + b_enc)
    x_hat = codes @ W_dec + b_dec

Tied SAE (``arch="tied"``): no ``W_dec`` parameter; the decoder is ``W_enc.T`` with each
row normalised to unit norm.

Loss (the one convention used everywhere; L1 is NOT scaled by dictionary size)::

    mse      = mean over batch and dimensions of (x_hat - x)**2
    sparsity = mean over batch of sum over features of |codes|
    loss     = mse + l1 * sparsity

Training sees activations scaled so the store's mean row norm is sqrt(D) (``data.normalize``),
so per-element variance is about 1 and one L1 grid means similar sparsity on any model/layer.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

Params = dict[str, torch.Tensor]
ARCHS = ("untied", "tied")


class LossParts(NamedTuple):
    """Per-batch training quantities (scalars for one member; (E,) in an ensemble)."""

    loss: torch.Tensor
    mse: torch.Tensor
    sparsity: torch.Tensor
    """Mean over the batch of the L1 norm of the codes."""
    l0: torch.Tensor | None
    """Mean number of active features per row (None where a caller skipped it for speed)."""
    fvu: torch.Tensor
    """Residual variance / variance of x around its batch mean."""


def init_params(
    arch: str, d: int, f: int, generator: torch.Generator, b_dec: torch.Tensor | None = None
) -> Params:
    """Random unit-norm decoder rows, encoder = decoder transpose, zero encoder bias.

    ``b_dec`` defaults to zeros; the worker passes the (scaled) data mean.
    """
    w = torch.randn(f, d, generator=generator)  # (F, D)
    w = w / w.norm(dim=1, keepdim=True)
    params: Params = {
        "W_enc": w.T.contiguous(),  # (D, F)
        "b_enc": torch.zeros(f),
        "b_dec": torch.zeros(d) if b_dec is None else b_dec.detach().clone().float(),
    }
    if arch == "untied":
        params["W_dec"] = w.clone()  # (F, D)
    return params


def decoder(params: Params) -> torch.Tensor:
    """(F, D) decoder with unit-norm rows (for tied SAEs, the normalised encoder)."""
    if "W_dec" in params:
        return params["W_dec"]
    w = params["W_enc"].T  # (D, F) -> (F, D)
    return w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)


def encode(params: Params, x_BD: torch.Tensor) -> torch.Tensor:
    pre_BF = (x_BD - params["b_dec"]) @ params["W_enc"] + params["b_enc"]  # (B, D) -> (B, F)
    return F.relu(pre_BF)


def decode(params: Params, codes_BF: torch.Tensor) -> torch.Tensor:
    return codes_BF @ decoder(params) + params["b_dec"]  # (B, F) -> (B, D)


def loss_fn(params: Params, x_BD: torch.Tensor, l1: torch.Tensor) -> tuple[torch.Tensor, LossParts]:
    """The training loss of one SAE on one batch, with its parts (all detached but ``loss``)."""
    codes_BF = encode(params, x_BD)
    err_BD = decode(params, codes_BF) - x_BD
    mse = err_BD.pow(2).mean()
    sparsity = codes_BF.sum(dim=1).mean()  # codes >= 0, so this is the mean L1 norm
    loss = mse + l1 * sparsity
    with torch.no_grad():
        var = (x_BD - x_BD.mean(dim=0)).pow(2).sum()
        parts = LossParts(
            loss=loss.detach(),
            mse=mse.detach(),
            sparsity=sparsity.detach(),
            l0=torch.sign(codes_BF).sum(dim=1).mean(),  # codes >= 0: sign counts active ones
            fvu=err_BD.pow(2).sum() / var.clamp_min(1e-12),
        )
    return loss, parts


def renormalize(params: Params) -> Params:
    """Project decoder rows back to unit norm (a no-op for tied SAEs)."""
    if "W_dec" not in params:
        return params
    w = params["W_dec"]
    return {**params, "W_dec": w / w.norm(dim=-1, keepdim=True).clamp_min(1e-12)}


class SAE(torch.nn.Module):
    """A trained dictionary that takes RAW activations (the training scale is folded in).

    With ``s`` the store's scale, training saw ``s * x``; folding gives
    ``W_enc' = s W_enc``, ``b_dec' = b_dec / s``, ``W_dec' = W_dec / s``, so the codes are
    exactly the training codes and ``decode`` returns raw-space reconstructions.
    """

    def __init__(self, params: Params, cfg: dict) -> None:
        super().__init__()
        self.cfg = cfg
        s = float(cfg.get("act_scale", 1.0))
        dec = decoder(params)  # (F, D) unit rows, training space
        self.W_enc = torch.nn.Parameter(params["W_enc"] * s)  # (D, F)
        self.b_enc = torch.nn.Parameter(params["b_enc"].clone())  # (F,)
        self.W_dec = torch.nn.Parameter(dec / s)  # (F, D)
        self.b_dec = torch.nn.Parameter(params["b_dec"] / s)  # (D,)

    @property
    def d_in(self) -> int:
        return self.W_enc.shape[0]

    @property
    def d_sae(self) -> int:
        return self.W_enc.shape[1]

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(..., D) raw activations -> (..., F) codes."""
        return F.relu((x - self.b_dec) @ self.W_enc + self.b_enc)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """(..., F) codes -> (..., D) raw-space reconstruction."""
        return codes @ self.W_dec + self.b_dec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))


def load_run(path: str, device: str | torch.device = "cpu") -> SAE:
    """Rebuild the SAE of one run folder (needs only its ``cfg.json`` and ``sae.safetensors``)."""
    import json
    from pathlib import Path

    from safetensors.torch import load_file

    folder = Path(path)
    for name in ("cfg.json", "sae.safetensors"):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder} has no {name}: not a finished sweep run folder")
    cfg = json.loads((folder / "cfg.json").read_text())
    params = load_file(str(folder / "sae.safetensors"), device=str(device))
    return SAE(params, cfg).to(device)
