"""Stacked SAEs trained as one vmapped program. The only place that adds the member axis.

Every parameter has a leading member axis E; ``torch.func.vmap`` maps the single-member loss
of :mod:`sweep.sae` over it (the batch ``x`` is shared, each member's ``l1`` is a vmapped
input), ``torch.func.grad`` differentiates it, and :class:`sweep.optim.Adam` updates the
stacked tensors. For untied SAEs a hand-batched formulation of the same gradients
(:func:`untied_grads`) is the default fast path (the benchmark shows vmap's generic batching
is slower than a Python loop on CPU); the vmapped single-member math stays the reference
and the equivalence tests cover both. A member whose loss turns NaN/inf is frozen (no further updates, its step
count stops) and the others train on, without a host sync in the step loop.
"""

from __future__ import annotations

import contextlib

import torch
from torch.func import grad, vmap

from sweep import sae
from sweep.optim import Adam, AdamState
from sweep.sae import LossParts, Params

_grad_fn = vmap(grad(sae.loss_fn, has_aux=True), in_dims=(0, None, 0))  # (E,..), (B,D), (E,)


def untied_grads(
    params: Params,
    x_BD: torch.Tensor,
    l1_E: torch.Tensor,
    with_l0: bool = True,
    ws: dict[str, torch.Tensor] | None = None,
    compute_dtype: torch.dtype | None = None,
) -> tuple[Params, LossParts]:
    """Hand-batched gradients of :func:`sweep.sae.loss_fn` for untied members (the fast path).

    The same math as ``vmap(grad(sae.loss_fn))``, written as five batched GEMMs and a few
    in-place elementwise passes into reusable buffers ``ws`` (the returned gradients live
    there too, valid until the next call). It never forms the gradient w.r.t. the centred
    input: ``b_dec``'s effect on the encoder enters through rank-one corrections, saving one
    of the six GEMMs autograd runs. Equality with the vmapped reference is tested.
    ``compute_dtype`` (e.g. bfloat16) runs the GEMMs and buffers in that dtype; parameters,
    gradients and loss parts stay float32.
    """
    dt = compute_dtype or params["W_enc"].dtype
    W_enc, b_enc, W_dec, b_dec = (params[k].to(dt) for k in ("W_enc", "b_enc", "W_dec", "b_dec"))
    x_BD = x_BD.to(dt)
    E, D, F = W_enc.shape
    B = x_BD.shape[0]
    ws = {} if ws is None else ws
    buf = _Buffers(ws, x_BD.device, dt)
    # (x - b_dec) @ W_enc + b_enc  ==  x @ W_enc + (b_enc - b_dec @ W_enc)
    shift_EF = b_enc - torch.bmm(b_dec[:, None, :], W_enc).squeeze(
        1
    )  # (E, D) @ (E, D, F) -> (E, F)
    codes_EBF = torch.bmm(
        x_BD.expand(E, B, D), W_enc, out=buf("codes", E, B, F)
    )  # (E, B, D) @ (E, D, F)
    codes_EBF.add_(shift_EF[:, None, :]).relu_()  # pre-activations -> codes, in place
    err_EBD = torch.bmm(
        codes_EBF, W_dec, out=buf("err", E, B, D)
    )  # (E, B, F) @ (E, F, D) -> (E, B, D)
    err_EBD.add_(b_dec[:, None, :]).sub_(x_BD)  # x_hat - x
    sq_E = torch.linalg.vector_norm(err_EBD, dim=(1, 2)).pow(2)  # (E,)
    sparsity_E = codes_EBF.sum(dim=(1, 2)) / B  # (E,)
    mse_E = sq_E / (B * D)
    var = (x_BD - x_BD.mean(dim=0)).pow(2).sum().clamp_min(1e-12)
    parts = LossParts(
        loss=mse_E + l1_E * sparsity_E,
        mse=mse_E,
        sparsity=sparsity_E,
        l0=torch.sign(codes_EBF).sum(dim=(1, 2)) / B if with_l0 else None,
        fvu=sq_E / var,
    )
    g_err_EBD = err_EBD.mul_(2.0 / (B * D))  # d loss / d x_hat, in place
    dW_dec = torch.bmm(
        codes_EBF.transpose(1, 2), g_err_EBD, out=buf("dW_dec", E, F, D)
    )  # (E, F, B) @ (E, B, D)
    g_EBF = torch.bmm(
        g_err_EBD, W_dec.transpose(1, 2), out=buf("g", E, B, F)
    )  # (E, B, D) @ (E, D, F)
    g_EBF += (l1_E / B)[:, None, None]  # + d (l1 * sparsity) / d codes
    torch.ops.aten.threshold_backward.grad_input(
        g_EBF, codes_EBF, 0.0, grad_input=g_EBF
    )  # relu backward
    db_enc = g_EBF.sum(dim=1)  # (E, F)
    dW_enc = torch.bmm(
        x_BD.T.expand(E, D, B), g_EBF, out=buf("dW_enc", E, D, F)
    )  # (E, D, B) @ (E, B, F)
    dW_enc -= b_dec[:, :, None] * db_enc[:, None, :]  # centring term: -b_dec (x) sum_B g_pre
    db_dec = g_err_EBD.sum(dim=1) - torch.bmm(W_enc, db_enc[:, :, None]).squeeze(2)  # (E, D)
    grads = {"W_enc": dW_enc, "b_enc": db_enc, "W_dec": dW_dec, "b_dec": db_dec}
    if dt != torch.float32:
        grads = {k: v.float() for k, v in grads.items()}
        parts = LossParts(*(None if v is None else v.float() for v in parts))
    return grads, parts


class _Buffers:
    """Named scratch tensors reused across steps (in-place CPU ops avoid page faults)."""

    def __init__(
        self, ws: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype
    ) -> None:
        self.ws, self.device, self.dtype = ws, device, dtype

    def __call__(self, name: str, *shape: int) -> torch.Tensor:
        t = self.ws.get(name)
        if t is None or tuple(t.shape) != shape or t.dtype != self.dtype:
            t = self.ws[name] = torch.empty(shape, device=self.device, dtype=self.dtype)
        return t


def stack(members: list[Params]) -> Params:
    """[{name: (...)}] * E -> {name: (E, ...)}."""
    return {k: torch.stack([m[k] for m in members]) for k in members[0]}


class Ensemble:
    """E SAEs of one shape, trained together on the same batches."""

    def __init__(
        self,
        params: Params,
        l1: torch.Tensor,
        adam: Adam,
        state: AdamState | None = None,
        active: torch.Tensor | None = None,
        autocast_dtype: torch.dtype | None = None,
        fast: bool = True,
    ) -> None:
        self.params = params  # {name: (E, ...)}
        self.l1 = l1  # (E,)
        self.adam = adam
        self.state = state if state is not None else AdamState.zeros_like(params)
        self.n = l1.shape[0]
        dev = l1.device
        self.active = (
            active if active is not None else torch.ones(self.n, dtype=torch.bool, device=dev)
        )  # (E,)
        self.autocast_dtype = autocast_dtype
        self.fast = fast and "W_dec" in params
        self._ws: dict[str, torch.Tensor] = {}

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.l1.device.type, dtype=self.autocast_dtype)

    def step(
        self, x_BD: torch.Tensor, full: bool = True, lr_scale: float = 1.0, l1_scale: float = 1.0
    ) -> LossParts:
        """One Adam step of every active member on batch ``x_BD``; returns (E,) loss parts.

        ``full=False`` lets the fast path skip L0 (one pass over the codes) on steps that
        are not logged. ``lr_scale`` and ``l1_scale`` come from the schedule (warmup/decay).
        """
        l1 = self.l1 if l1_scale == 1.0 else self.l1 * l1_scale
        if self.fast:
            grads, parts = untied_grads(
                self.params, x_BD, l1, with_l0=full, ws=self._ws, compute_dtype=self.autocast_dtype
            )
        else:
            with self._autocast():
                grads, parts = _grad_fn(self.params, x_BD, l1)  # {name: (E, ...)}, (E,) each
        self.active &= torch.isfinite(parts.loss)
        skip = (~self.active).float()  # (E,) 1.0 = leave this member untouched
        self.adam.update(self.params, grads, self.state, skip, lr_scale)
        if "W_dec" in self.params:
            w = self.params["W_dec"]  # (E, F, D)
            unit = w / w.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            w.copy_(torch.where(self.active[:, None, None], unit, w))
        return parts
