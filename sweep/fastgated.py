"""Hand-batched gradients of :func:`sweep.sae.loss_fn` for gated members (the ensemble's fast
path for ``sae=gated``; the vmapped single-member math stays the reference and equality with
it is tested). The shared formulation of :mod:`sweep.fastpath` does not fit: a gated code's
gradient reaches the encoder through two paths, not as the code's own gradient masked.

With ``z = (x - b_dec) @ W_enc``, ``h = relu(z + b_gate)``, ``s = exp(r_mag)``,
``codes = [h > 0] * relu(z * s + b_mag)``, ``e = codes @ W_dec + b_dec - x`` and the gate's
reconstruction ``e2 = h @ sg(W_dec) + sg(b_dec) - x`` (``sg``: no gradient), per member::

    g_mag  = (2/BD) e @ W_dec^T * [codes > 0]         d loss / d (z * s + b_mag)
    g_gate = ((2/BD) e2 @ W_dec^T + l1 / B) * [h > 0]  d loss / d (z + b_gate)
    d r_mag = s * sum_B(g_mag * z),  d b_mag = sum_B g_mag,  d b_gate = sum_B g_gate
    d z    = g_mag * s + g_gate
    d W_dec = codes^T (2/BD) e   (the auxiliary term's decoder is frozen)

then ``W_enc`` and ``b_dec`` as in :mod:`sweep.fastpath` (rank-one corrections, no centred
input formed). Seven batched GEMMs: the encoder's, two decodes, two products with ``W_dec^T``,
``dW_dec`` and ``dW_enc``; four (E, B, F) buffers.
"""

from __future__ import annotations

import torch

from sweep.archs import Architecture, Hyper, Params
from sweep.fastpath import _Buffers, _parts, _per_member_mv, _shifted
from sweep.sae import LossParts
from sweep.sums import member_sums

_keep = torch.ops.aten.threshold_backward.grad_input
"""``_keep(g, t, 0.0, grad_input=g)``: g where t > 0, else 0 (in place, no bool tensor)."""


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
    """:func:`sweep.fastpath.grads` for gated members (no top-k: no ``kmax``, no AuxK)."""
    dt = compute_dtype or params["W_enc"].dtype
    W_enc, b_gate, W_dec = (
        (cast or {}).get(k, params[k]).to(dt) for k in ("W_enc", "b_enc", "W_dec")
    )
    x_c, b_dec = _shifted(x_BD, params["b_dec"], dt)
    E, D, F_ = W_enc.shape
    B = x_c.shape[0]
    buf = _Buffers({} if ws is None else ws, x_c.device, dt)
    spare = buf("dW_enc", E, D, F_)  # free until dW_enc is written there
    z, h, codes = _forward(params, x_c, b_dec, W_enc, b_gate, buf, spare)
    err = _decode(codes, W_dec, b_dec, x_c, buf("err", E, B, D))
    err2 = _decode(h, W_dec, b_dec, x_c, buf("err2", E, B, D))
    parts = _loss_parts(arch, codes, h, err, err2, x_BD, hyper, with_l0, buf("g", E, B, F_))
    share = 2.0 / (B * D)  # d mean(e**2) / d e
    err.mul_(share)
    err2.mul_(share)
    dW_dec = torch.bmm(codes.transpose(1, 2), err, out=buf("dW_dec", E, F_, D))
    g = torch.bmm(err, W_dec.transpose(1, 2), out=buf("g", E, B, F_))  # d loss / d codes
    _keep(g, codes, 0.0, grad_input=g)  # d loss / d mag: where the gate is open and mag > 0
    s_EF = params["r_mag"].exp()  # (E, F) float32
    db_mag = g.sum(dim=1, dtype=torch.float32)
    dr_mag = z.mul_(g).sum(dim=1, dtype=torch.float32) * s_EF  # (z is read no more)
    g.mul_(s_EF[:, None, :].to(dt))  # d loss / d z through the magnitudes
    g_gate = torch.bmm(err2, W_dec.transpose(1, 2), out=z)  # (E, B, F), into z's buffer
    g_gate.add_((hyper["l1"] / B)[:, None, None].to(dt))
    _keep(g_gate, h, 0.0, grad_input=g_gate)  # where the gate is open
    db_gate = g_gate.sum(dim=1, dtype=torch.float32)
    dz_EF = g.add_(g_gate).sum(dim=1)  # g: d loss / d z, both paths
    db_dec = err.sum(dim=1) - _per_member_mv(W_enc, dz_EF[:, None, :], 2, spare)
    dW_enc = torch.bmm(x_c.T.expand(E, D, B), g, out=spare)  # (E, D, F)
    dW_enc -= b_dec[:, :, None] * dz_EF[:, None, :]  # centring term: -b_dec (x) sum_B dz
    out = {
        "W_enc": dW_enc, "b_enc": db_gate, "W_dec": dW_dec, "b_dec": db_dec,
        "r_mag": dr_mag, "b_mag": db_mag,
    }  # fmt: skip
    return {k: v.float() for k, v in out.items()}, parts, codes


def _forward(
    params: Params,
    x_c: torch.Tensor,
    b_dec: torch.Tensor,
    W_enc: torch.Tensor,
    b_gate: torch.Tensor,
    buf: _Buffers,
    spare: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(E, B, F) ``z``, the gate's ReLU ``h`` and the codes."""
    E, D, F_ = W_enc.shape
    B, dt = x_c.shape[0], W_enc.dtype
    # (x - b_dec) @ W_enc  ==  x @ W_enc - b_dec @ W_enc
    shift_EF = _per_member_mv(W_enc, b_dec[:, :, None], 1, spare)  # (E, D) @ (E, D, F)
    z = torch.bmm(x_c.expand(E, B, D), W_enc, out=buf("z", E, B, F_))
    z.sub_(shift_EF[:, None, :])
    h = torch.add(z, b_gate[:, None, :], out=buf("h", E, B, F_)).relu_()
    s, b_mag = params["r_mag"].exp().to(dt), params["b_mag"].to(dt)
    codes = torch.mul(z, s[:, None, :], out=buf("codes", E, B, F_))
    codes.add_(b_mag[:, None, :]).relu_()
    return z, h, _keep(codes, h, 0.0, grad_input=codes)  # where the gate is open


def _decode(
    codes: torch.Tensor,
    W_dec: torch.Tensor,
    b_dec: torch.Tensor,
    x_c: torch.Tensor,
    out: torch.Tensor,
) -> torch.Tensor:
    """``codes @ W_dec + b_dec - x`` (E, B, D), into ``out``."""
    return torch.bmm(codes, W_dec, out=out).add_(b_dec[:, None, :]).sub_(x_c)


def _loss_parts(
    arch: Architecture,
    codes: torch.Tensor,
    h: torch.Tensor,
    err: torch.Tensor,
    err2: torch.Tensor,
    x_BD: torch.Tensor,
    hyper: Hyper,
    with_l0: bool,
    scratch: torch.Tensor,
) -> LossParts:
    """(E,) loss parts: the shared ones (MSE, FVU, L0, the codes' L1) plus the gate's L1 and
    its reconstruction's MSE in the loss; sums in float32, each member's as a lone one's."""
    B, D = x_BD.shape
    parts = _parts(arch, codes, err, x_BD, hyper, with_l0, None, scratch)
    gate_l1 = member_sums(h, torch.float32) / B
    aux = member_sums(torch.linalg.vector_norm(err2, dim=2, dtype=torch.float32).pow(2)) / (B * D)
    loss = parts.loss + hyper["l1"] * gate_l1 + aux  # (not parts._replace: torch 2.11's
    # compiler fails on it, AssertionError in dynamo's side_effects; 2.13's does not)
    return LossParts(loss, parts.mse, parts.sparsity, parts.l0, parts.fvu)
