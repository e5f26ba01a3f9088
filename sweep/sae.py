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

import json
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F

from sweep import rundir

if TYPE_CHECKING:
    from sweep.grid import RunSpec

Params = dict[str, torch.Tensor]


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


class SAE(torch.nn.Module):
    """A trained dictionary that takes RAW activations (the training scale is folded in).

    With ``s`` the store's scale, training saw ``s * x``; folding gives
    ``W_enc' = s W_enc``, ``b_dec' = b_dec / s``, ``W_dec' = W_dec / s``, so the codes are
    exactly the training codes and ``decode`` returns raw-space reconstructions.

    The weights are parameters without gradients (``sae.requires_grad_(True)`` to fine-tune);
    ``encode``/``decode`` also take numpy arrays and nested lists.
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
        self.requires_grad_(False)

    def _tensor(self, x: object, width: int, what: str) -> torch.Tensor:
        """``x`` as a float tensor on this SAE's device, or a one-line TypeError/ValueError."""
        if not isinstance(x, torch.Tensor):
            try:
                x = torch.as_tensor(x)
            except (TypeError, ValueError, RuntimeError) as err:
                raise TypeError(
                    f"{what} must be a tensor or array of shape (..., {width}), got {type(x).__name__}"
                ) from err
        if x.shape[-1:] != (width,):
            raise ValueError(f"{what} must have shape (..., {width}), got {tuple(x.shape)}")
        return x.to(self.W_enc.device, self.W_enc.dtype)

    @property
    def d_in(self) -> int:
        return self.W_enc.shape[0]

    @property
    def d_sae(self) -> int:
        return self.W_enc.shape[1]

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(..., D) raw activations -> (..., F) codes."""
        x = self._tensor(x, self.d_in, "activations")
        return F.relu((x - self.b_dec) @ self.W_enc + self.b_enc)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """(..., F) codes -> (..., D) raw-space reconstruction."""
        codes = self._tensor(codes, self.d_sae, "codes")
        return codes @ self.W_dec + self.b_dec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))


LOSS_TEXT = "mean((x_hat - x)**2) + l1 * mean_batch(sum_features(codes))"


def run_cfg(run: RunSpec, act_scale: float, store: str, provenance: dict) -> dict:
    """A run folder's ``cfg.json``: everything :func:`load_run` needs, plus provenance."""
    return {
        "format": "sweep-sae",
        "version": 1,
        "architecture": run.arch,
        "d_in": run.width,
        "d_sae": run.dict_size,
        "act_scale": act_scale,
        "l1": run.l1,
        "dict_ratio": run.dict_ratio,
        "seed": run.seed,
        "run_id": run.run_id,
        "loss": LOSS_TEXT,
        "store": store,
        "provenance": provenance,
        "dtype": "float32",
    }


def load_run(path: str | Path, device: str | torch.device = "cpu") -> SAE:
    """Rebuild the SAE of one run folder (needs only its ``cfg.json`` and ``sae.safetensors``)."""
    from safetensors.torch import load_file

    folder = Path(path)
    for name in (rundir.CFG, rundir.WEIGHTS):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder} has no {name}: not a finished sweep run folder")
    cfg = json.loads((folder / rundir.CFG).read_text())
    params = load_file(str(folder / rundir.WEIGHTS), device=str(device))
    return SAE(params, cfg).to(device)
