"""Hand-batched gradients of :func:`sweep.sae.loss_fn` for tied members (the ensemble's fast
path for ``sae=tied``; the vmapped single-member math stays the reference and equality with
it is tested).

A tied SAE's decoder is its encoder's columns made unit, ``W_dec[f] = w_f / n_f`` with
``w_f = W_enc[:, f]`` and ``n_f = max(||w_f||, 1e-12)`` (:func:`sweep.archs.base.unit_rows`
of ``W_enc^T``). The step is the shared one of :mod:`sweep.fastpath` (an untied ReLU SAE's)
on that decoder; its gradient ``G_f`` w.r.t. ``W_dec[f]`` reaches ``w_f`` through the
normalisation as ``(G_f - (G_f . u_f) u_f) / n_f`` (``u_f = W_dec[f]``), added to the
encoder's own gradient: parameter-sized work, in place but for the decoder itself (formed
contiguous, so neither its GEMMs nor the dot products copy it).
"""

from __future__ import annotations

import torch

from sweep.archs import Architecture, Hyper, Params
from sweep.fastpath import shared_grads
from sweep.sae import LossParts


def grads(
    arch: Architecture,
    params: Params,
    x_BD: torch.Tensor,
    hyper: Hyper,
    *,
    with_l0: bool,
    ws: dict[str, torch.Tensor] | None,
    compute_dtype: torch.dtype | None,
    cast: Params | None,
) -> tuple[Params, LossParts, torch.Tensor]:
    """:func:`sweep.fastpath.grads` for tied members (its signature; no top-k, no AuxK)."""
    W_enc = params["W_enc"]  # (E, D, F)
    E, D, F_ = W_enc.shape
    norms = W_enc.norm(dim=1, keepdim=True).clamp_min(1e-12)  # (E, 1, F)
    W_dec = W_enc.new_empty(E, F_, D)  # unit rows, as arch.decoder makes them; contiguous
    torch.div(W_enc.transpose(1, 2), norms.transpose(1, 2), out=W_dec)
    decoded = {**params, "W_dec": W_dec}
    out, parts, codes = shared_grads(
        arch, decoded, x_BD, hyper, with_l0=with_l0, ws=ws, compute_dtype=compute_dtype, cast=cast
    )
    G = out.pop("W_dec")  # (E, F, D), a buffer of the step's own: changed in place
    radial = torch.matmul(G[:, :, None, :], W_dec[:, :, :, None])[..., 0]  # (E, F, 1): G_f . u_f
    G.addcmul_(radial, W_dec, value=-1).div_(norms.transpose(1, 2))
    out["W_enc"] += G.transpose(1, 2)
    return out, parts, codes
