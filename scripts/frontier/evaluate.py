"""One evaluation for every dictionary, sweep's and SAELens's alike.

A dictionary is four tensors (and for BatchTopK and JumpReLU a threshold) in the *scaled*
space (activations times the store's scale, the space both methods trained in)::

    codes = relu((x - b_dec) @ W_enc + b_enc)        x_hat = codes @ W_dec + b_dec

(BatchTopK, JumpReLU: ``codes = relu(pre) * (pre > threshold)``, BatchTopK's inference form;
TopK: each row's k largest ``relu(pre)``; Gated: ``b_enc`` is the gate's bias, ``codes =
[pre > 0] * relu((x - b_dec) @ W_enc * exp(r_mag) + b_mag)``.)

Metrics on the held-out rows ``x_ND`` (the store's last ``eval_rows``, scaled):
FVU = residual sum of squares / total sum of squares around the rows' mean; L0 = mean number
of active features per row; dead fraction = features that never fire on those rows.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import NamedTuple

import torch


class Dictionary(NamedTuple):
    W_enc: torch.Tensor  # (D, F)
    b_enc: torch.Tensor  # (F,)
    W_dec: torch.Tensor  # (F, D)
    b_dec: torch.Tensor  # (D,)
    threshold: torch.Tensor | None = None  # (F,) or (): codes need pre > threshold
    k: int = 0  # > 0: each row keeps its k largest codes (TopK)
    r_mag: torch.Tensor | None = None  # (F,): a gated SAE's magnitude path (with b_mag)
    b_mag: torch.Tensor | None = None


def from_sweep_run(folder: str | Path, scale: float) -> Dictionary:
    """A sweep run folder's SAE, read with ``sweep.load_run`` (which takes RAW activations),
    moved into the space scaled by ``scale`` (checked against the run's recorded scale)."""
    import sweep
    from sweep.archs.jumprelu import threshold_of

    sae = sweep.load_run(folder)
    recorded = float(sae.cfg.get("act_scale", 1.0))
    if not math.isclose(recorded, scale, rel_tol=1e-5):
        raise ValueError(f"{folder} was trained at scale {recorded}, the store's is {scale}")
    # raw: relu((x - b_dec) @ W_enc + b_enc) @ W_dec + b_dec, with x = x_s / s and the
    # reconstruction times s: W_enc_s = W_enc / s, W_dec_s = W_dec * s, b_dec_s = b_dec * s.
    buffers = dict(sae.named_buffers())  # a threshold, in either recipe's form, or none
    gated = {k: buffers.pop(k) for k in ("r_mag", "b_mag") if k in buffers}  # (or those)
    threshold = threshold_of(buffers) if buffers else None  # on pre-activations: both spaces
    k = sae.k if sae.arch.name == "topk" else 0
    return Dictionary(
        sae.W_enc / scale, sae.b_enc.clone(), sae.W_dec * scale, sae.b_dec * scale, threshold, k,
        **gated,
    )  # fmt: skip


def from_saelens_file(path: str | Path) -> Dictionary:
    """Weights saved by ``saelens_train.py`` (already in the scaled space)."""
    from safetensors.torch import load_file

    w = load_file(str(path))
    k = int(w["k"]) if "k" in w else 0
    b_enc = w["b_gate"] if "b_gate" in w else w["b_enc"]  # (a gated SAE's gate bias)
    return Dictionary(
        w["W_enc"], b_enc, w["W_dec"], w["b_dec"], w.get("threshold"), k,
        w.get("r_mag"), w.get("b_mag"),
    )  # fmt: skip


@torch.no_grad()
def evaluate(d: Dictionary, x_ND: torch.Tensor, batch: int = 4096) -> dict[str, float]:
    """``fvu``, ``l0`` and ``dead_fraction`` of ``d`` on the scaled held-out rows ``x_ND``."""
    n = x_ND.shape[0]
    total = float((x_ND - x_ND.mean(dim=0)).pow(2).sum())
    rss, active = 0.0, 0.0
    fired = torch.zeros(d.W_enc.shape[1], dtype=torch.bool)  # (F,)
    for at in range(0, n, batch):
        x = x_ND[at : at + batch]  # (b, D)
        z = (x - d.b_dec) @ d.W_enc  # (b, D) -> (b, F)
        pre = z + d.b_enc
        codes = torch.relu(pre) if d.threshold is None else torch.relu(pre) * (pre > d.threshold)
        if d.r_mag is not None:  # gated: the gate opens, the magnitude path sets the code
            codes = (pre > 0) * torch.relu(z * d.r_mag.exp() + d.b_mag)
        if d.k > 0:
            vals, idx = codes.topk(d.k, dim=-1)
            codes = torch.zeros_like(codes).scatter_(-1, idx, vals)
        rss += float((codes @ d.W_dec + d.b_dec - x).pow(2).sum())  # (b, F) -> (b, D)
        on = codes > 0
        active += float(on.sum())
        fired |= on.any(dim=0)
    return {
        "fvu": rss / max(total, 1e-12),
        "l0": active / n,
        "dead_fraction": float((~fired).double().mean()),
    }
