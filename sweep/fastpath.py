"""Hand-batched gradients of :func:`sweep.sae.loss_fn` for untied ReLU, TopK, BatchTopK,
Matryoshka and JumpReLU members, and for tied ones on their decoder (:mod:`sweep.fasttied`)
(the ensemble's fast path; the vmapped single-member math stays the reference and equality
with it is tested).

One formulation serves the four: pre-activations, an activation that keeps some of them
(ReLU, per-row top-k, per-member batch top-k, per-feature threshold), a dense decode.
Because every kept code is its (positive) pre-activation, the backward through any of these
activations is the upstream gradient masked to the kept codes (``codes > 0``). The L1
penalty of ReLU members adds ``l1 / B`` on kept codes; AuxK adds a second decode of the dead
latents' top-``k_aux``; JumpReLU's thresholds get their straight-through gradients from the
architecture (:meth:`~sweep.archs.Architecture.fast_grads`).

Five batched GEMMs (seven with AuxK), in-place elementwise passes into reusable buffers
``ws`` (the returned gradients live there too, valid until the next call). The gradient
w.r.t. the centred input is never formed: ``b_dec``'s effect on the encoder enters
through rank-one corrections.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sweep.archs import Architecture, Hyper, Params
from sweep.sae import LossParts
from sweep.sums import member_sums


@dataclass(frozen=True)
class AuxSpec:
    """AuxK for one step: on when ``alpha > 0`` and ``dead_EF`` is given."""

    alpha: float
    k_aux: int
    dead_EF: torch.Tensor


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


def _aux_k(aux: AuxSpec | None, device: torch.device) -> int:
    """AuxK's top-k size this step (0 = off). On CPU it is cut to the most dead latents of any
    member (one count, no device sync): the codes past it would all be zero."""
    if aux is None or aux.alpha <= 0 or aux.k_aux <= 0:
        return 0
    if device.type != "cpu" or torch.compiler.is_compiling():  # no host sync
        return aux.k_aux
    return min(aux.k_aux, int(aux.dead_EF.sum(dim=1).max()))


def _aux_codes(pre_EBF: torch.Tensor, aux: AuxSpec, k: int, out: torch.Tensor) -> torch.Tensor:
    """The dead latents' top-``k`` ReLU'd pre-activations, dense (E, B, F)."""
    masked = torch.where(aux.dead_EF[:, None, :], pre_EBF, -torch.inf)
    vals, idx = masked.topk(k, dim=-1, sorted=False)  # (E, B, k): the scatter needs no order
    return out.zero_().scatter_(-1, idx, F.relu(vals))


def grads(
    arch: Architecture,
    params: Params,
    x_BD: torch.Tensor,
    hyper: Hyper,
    kmax: int = 0,
    aux: AuxSpec | None = None,
    with_l0: bool = True,
    ws: dict[str, torch.Tensor] | None = None,
    compute_dtype: torch.dtype | None = None,
    cast: Params | None = None,
) -> tuple[Params, LossParts, torch.Tensor]:
    """Gradients, (E,) loss parts and the codes (E, B, F) of every member on ``x_BD``.

    ``compute_dtype`` (e.g. bfloat16) runs the GEMMs and buffers in that dtype; parameters,
    gradients and loss parts stay float32. ``cast`` holds parameters already in that dtype
    (the compiled step keeps the weights' copies, see :mod:`sweep.compiled`).
    """
    own = arch.batched_grads()
    if own is not None:  # (Gated's: sweep.fastgated; Tied's: sweep.fasttied)
        return own(
            arch,
            params,
            x_BD,
            hyper,
            with_l0=with_l0,
            ws=ws,
            compute_dtype=compute_dtype,
            cast=cast,
        )
    return shared_grads(arch, params, x_BD, hyper, kmax, aux, with_l0, ws, compute_dtype, cast)


def shared_grads(
    arch: Architecture,
    params: Params,
    x_BD: torch.Tensor,
    hyper: Hyper,
    kmax: int = 0,
    aux: AuxSpec | None = None,
    with_l0: bool = True,
    ws: dict[str, torch.Tensor] | None = None,
    compute_dtype: torch.dtype | None = None,
    cast: Params | None = None,
) -> tuple[Params, LossParts, torch.Tensor]:
    """:func:`grads` in the shared formulation (this module's docstring), whatever
    :meth:`~sweep.archs.Architecture.batched_grads` says (a tied SAE's step runs it on its
    decoder, :mod:`sweep.fasttied`)."""
    dt = compute_dtype or params["W_enc"].dtype
    W_enc, b_enc, W_dec = (
        (cast or {}).get(k, params[k]).to(dt) for k in ("W_enc", "b_enc", "W_dec")
    )
    x_in = x_BD
    x_BD, b_dec = _shifted(x_in, params["b_dec"], dt)
    E, D, F_ = W_enc.shape
    B = x_BD.shape[0]
    buf = _Buffers({} if ws is None else ws, x_BD.device, dt)
    # (x - b_dec) @ W_enc + b_enc  ==  x @ W_enc + (b_enc - b_dec @ W_enc)
    spare = buf("dW_enc", E, D, F_)  # free until dW_enc is written there
    shift_EF = b_enc - _per_member_mv(W_enc, b_dec[:, :, None], 1, spare)  # (E, D) @ (E, D, F)
    codes = torch.bmm(x_BD.expand(E, B, D), W_enc, out=buf("codes", E, B, F_))  # (E, B, F)
    codes.add_(shift_EF[:, None, :])
    k_aux = _aux_k(aux, x_BD.device)
    use_aux = k_aux > 0
    assert not (use_aux and arch.keeps_pre), "fast_grads may overwrite pre; AuxK reads it"
    pre = buf("pre", E, B, F_).copy_(codes) if use_aux or arch.keeps_pre else None
    scratch = buf("g", E, B, F_)  # free until the codes' gradient is written there
    arch.keep_batched(codes, hyper, kmax, params, scratch)  # pre-activations -> codes
    widths = arch.inner_widths(F_)  # Matryoshka's nested dictionaries (none: one level)
    levels = buf("levels", len(widths), E, B, D) if widths else None
    if levels is None:
        err = torch.bmm(codes, W_dec, out=buf("err", E, B, D))  # (E, B, F) @ (E, F, D)
        err.add_(b_dec[:, None, :]).sub_(x_BD)  # x_hat - x
    else:
        err = _level_errors(codes, W_dec, b_dec, x_BD, widths, levels, buf("err", E, B, D))
    norms_EF = params["W_dec"].norm(dim=-1) if arch.weighted_l1 else None  # (E, F) fp32
    nested_E = None if levels is None else _nested_mse(levels, err)
    parts = _parts(arch, codes, err, x_in, hyper, with_l0, norms_EF, scratch, nested_E)
    g_err = buf("g_err", E, B, D).copy_(err) if use_aux else err  # AuxK reads err later
    share = 2.0 / (B * D * (len(widths) + 1))  # d loss / d x_hat, each level's share of it
    g_err.mul_(share)
    if levels is None:
        dW_dec = torch.bmm(codes.transpose(1, 2), g_err, out=buf("dW_dec", E, F_, D))
        g = torch.bmm(g_err, W_dec.transpose(1, 2), out=buf("g", E, B, F_))  # (E, B, F)
    else:
        ups = _level_upstreams(levels, g_err, share)
        dW_dec, g = buf("dW_dec", E, F_, D), buf("g", E, B, F_)
        for (a, b), up in zip(_groups(widths, F_), ups, strict=True):  # (beta=0: into a
            dW_dec[:, a:b].baddbmm_(codes[:, :, a:b].transpose(1, 2), up, beta=0)  # strided
            g[:, :, a:b].baddbmm_(up, W_dec[:, a:b].transpose(1, 2), beta=0)  # view, compiled too)
    _add_l1_grads(arch, hyper, codes, norms_EF, W_dec, g, dW_dec)
    extra = arch.fast_grads(g, pre, params, hyper)  # e.g. thresholds (g: d loss / d codes)
    torch.ops.aten.threshold_backward.grad_input(g, codes, 0.0, grad_input=g)  # kept codes only
    if use_aux:
        loss_aux = _add_aux(pre, err, W_dec, aux, k_aux, g, dW_dec, buf)  # type: ignore[arg-type]
        parts = LossParts(parts.loss + aux.alpha * loss_aux, *parts[1:])  # type: ignore[union-attr]
    db_enc = g.sum(dim=1)  # (E, F)
    every_level = g_err if levels is None else levels[0]  # (b_dec is in every reconstruction)
    db_dec = every_level.sum(dim=1) - _per_member_mv(W_enc, db_enc[:, None, :], 2, spare)
    dW_enc = torch.bmm(x_BD.T.expand(E, D, B), g, out=spare)  # (E, D, F)
    dW_enc -= b_dec[:, :, None] * db_enc[:, None, :]  # centring term: -b_dec (x) sum_B g_pre
    out = {"W_enc": dW_enc, "b_enc": db_enc, "W_dec": dW_dec, "b_dec": db_dec, **extra}
    if dt != torch.float32:
        out = {k: v.float() for k, v in out.items()}
        parts = LossParts(*(None if v is None else v.float() for v in parts))
    return out, parts, codes


def _groups(widths: list[int], f: int) -> list[tuple[int, int]]:
    """Matryoshka's latent groups: ``[0, m_1), [m_1, m_2), ..., [m_n, f)``."""
    return list(itertools.pairwise([0, *widths, f]))


def _level_errors(
    codes: torch.Tensor,
    W_dec: torch.Tensor,
    b_dec: torch.Tensor,
    x_BD: torch.Tensor,
    widths: list[int],
    levels: torch.Tensor,
    err: torch.Tensor,
) -> torch.Tensor:
    """Each inner level's ``x_hat - x`` into ``levels`` (n, E, B, D), the whole dictionary's
    into ``err`` (returned): a group's decode added to the level before, so the GEMMs cost
    one decode together (the reference decodes each level whole: the same sums, rounded in
    another order)."""
    prev = None
    for (a, b), out in zip(_groups(widths, codes.shape[-1]), [*levels, err], strict=True):
        if prev is None:
            out.copy_(b_dec[:, None, :].expand_as(out)).sub_(x_BD)
        else:
            out.copy_(prev)
        prev = out.baddbmm_(codes[:, :, a:b], W_dec[:, a:b])
    return err


def _nested_mse(levels: torch.Tensor, err: torch.Tensor) -> torch.Tensor:
    """(E,) Matryoshka's reconstruction term: the mean of every level's MSE (float32 sums,
    each member's as a lone member's would be)."""
    _, E, B, D = levels.shape
    total = torch.zeros(E, device=err.device, dtype=torch.float32)
    for level in [*levels, err]:
        total += member_sums(torch.linalg.vector_norm(level, dim=2, dtype=torch.float32).pow(2))
    return total / (B * D * (levels.shape[0] + 1))


def _level_upstreams(levels: torch.Tensor, g_err: torch.Tensor, scale: float) -> list[torch.Tensor]:
    """d loss / d (each group's decode): a group's latents are in its level and every later
    one, so its upstream is ``scale`` times the sum of those levels' errors (``g_err``: the
    whole dictionary's, already scaled). Summed in place, last level first, into ``levels``."""
    after = g_err
    for i in range(levels.shape[0] - 1, -1, -1):  # (reversed() of a tensor would flip a copy)
        after = levels[i].mul_(scale).add_(after)
    return [*levels, g_err]


def _shifted(
    x_BD: torch.Tensor, b_dec_ED: torch.Tensor, dt: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` and ``b_dec`` in the compute dtype. Below float32 both are first shifted by the
    batch's mean (in float32, before the cast): the loss and its gradients are the same, but
    the shared GEMMs see centred rows, so a large data mean is not rounded into x @ W_enc and
    x^T g before b_dec takes it off again (bf16, mean 10x the spread: dW_enc off by 32%
    relative, 1.4% centred). From the data only: one member's b_dec cannot reach the
    others'. (float32 rounds 2**16 times finer.)"""
    if dt.itemsize < 4:
        centre_D = x_BD.mean(dim=0)  # (D,)
        x_BD, b_dec_ED = x_BD - centre_D, b_dec_ED - centre_D
    return x_BD.to(dt), b_dec_ED.to(dt)


def _add_l1_grads(
    arch: Architecture,
    hyper: Hyper,
    codes: torch.Tensor,
    norms_EF: torch.Tensor | None,
    W_dec: torch.Tensor,
    g: torch.Tensor,
    dW_dec: torch.Tensor,
) -> None:
    """Add the L1 penalty's gradients to ``g`` (d loss / d codes) and ``dW_dec``, in place."""
    B, dt = codes.shape[1], g.dtype
    if norms_EF is not None:  # + d (l1 * sum(codes * ||W_dec_f||)) / d codes and / d W_dec
        g += (hyper["l1"][:, None] / B * norms_EF)[:, None, :].to(dt)
        per_row = (hyper["l1"][:, None] / B) * codes.sum(dim=1, dtype=torch.float32)  # (E, F)
        dW_dec += (per_row / norms_EF.clamp_min(1e-12))[:, :, None].to(dt) * W_dec
    elif arch.l1_codes:
        g += (hyper["l1"] / B)[:, None, None].to(dt)  # + d (l1 * sparsity) / d codes


def _per_member_mv(
    W_EDF: torch.Tensor, v: torch.Tensor, dim: int, scratch: torch.Tensor
) -> torch.Tensor:
    """``(W_EDF * v).sum(dim)``: each member's matrix-vector product, as a product and a
    sum. A ``bmm`` of one member runs MKL's gemv, of several its batched gemm, which round
    differently: a run trained alone (a repaired one, a grid point of its own) would not
    equal the same run trained in an ensemble."""
    if W_EDF.device.type != "cpu":  # (on a GPU a one-member bmm is no worse: one pass)
        if dim == 2:  # v (E, 1, F): (E, D, F) @ (E, F, 1)
            return torch.bmm(W_EDF, v.transpose(1, 2)).squeeze(2)
        return torch.bmm(v.transpose(1, 2), W_EDF).squeeze(1)  # v (E, D, 1): (E, 1, D) @ W
    return torch.mul(W_EDF, v, out=scratch).sum(dim=dim)


def _parts(
    arch: Architecture,
    codes: torch.Tensor,
    err: torch.Tensor,
    x_BD: torch.Tensor,
    hyper: Hyper,
    with_l0: bool,
    norms_EF: torch.Tensor | None,
    scratch: torch.Tensor,
    nested_E: torch.Tensor | None = None,
) -> LossParts:
    """(E,) loss parts; ``nested_E``: Matryoshka's reconstruction term, in the loss in place
    of the MSE (which stays the whole dictionary's)."""
    B, D = x_BD.shape  # x_BD: the input as given (float32), not its compute-dtype copy
    l0_E = None
    if with_l0 or arch.l0_penalty:  # counted in floats (a bool tensor's sum converts it),
        kept_EF = torch.ne(codes, 0, out=scratch).sum(dim=1, dtype=torch.float32)  # exact: <= B
        l0_E = (kept_EF.sum(dim=1, dtype=torch.float64) / B).float()  # exact past 2**24 too
    # sums in float32 whatever the compute dtype: a bf16 result would round them to 2**-9
    # (E,): each row's norm (no float32 copy of err), then summed as a lone member's would be
    sq_E = member_sums(torch.linalg.vector_norm(err, dim=2, dtype=torch.float32).pow(2))
    sparsity_E = member_sums(codes, torch.float32) / B
    mse_E = sq_E / (B * D)
    var = member_sums((x_BD - x_BD.mean(dim=0)).pow(2)[None])[0].clamp_min(1e-12)  # any threads
    loss = mse_E if nested_E is None else nested_E
    if norms_EF is not None:
        weighted = (codes.sum(dim=1, dtype=torch.float32) * norms_EF).sum(dim=1) / B  # (E,)
        loss = loss + hyper["l1"] * weighted
    elif arch.l1_codes:
        loss = loss + hyper["l1"] * sparsity_E
    elif arch.l0_penalty:
        loss = loss + hyper["l1"] * l0_E
    return LossParts(
        loss=loss,
        mse=mse_E,
        sparsity=sparsity_E,
        l0=l0_E if with_l0 else None,
        fvu=sq_E / var,
    )


def _add_aux(
    pre: torch.Tensor,
    err: torch.Tensor,
    W_dec: torch.Tensor,
    aux: AuxSpec,
    k: int,
    g: torch.Tensor,
    dW_dec: torch.Tensor,
    buf: _Buffers,
) -> torch.Tensor:
    """Add AuxK's gradients into ``g`` (pre-activations) and ``dW_dec``; returns its (E,) value."""
    E, B, F_ = pre.shape
    D = err.shape[-1]
    c_aux = _aux_codes(pre, aux, k, buf("c_aux", E, B, F_))
    r = torch.bmm(c_aux, W_dec, out=buf("r_aux", E, B, D)).add_(err)  # e_hat - e, e = -err
    dead_E = aux.dead_EF.sum(dim=1, dtype=torch.float32)  # exact (bf16 would round past 256)
    scale_E = (dead_E / aux.k_aux).clamp(max=1.0)
    sq_E = member_sums(torch.linalg.vector_norm(r, dim=2, dtype=torch.float32).pow(2))
    value = scale_E * sq_E / (B * D)  # (each member's sum as a lone member's would be)
    r.mul_((2.0 * aux.alpha / (B * D)) * scale_E[:, None, None])  # d (alpha * aux) / d e_hat
    dW_dec.baddbmm_(c_aux.transpose(1, 2), r)
    g_aux = torch.bmm(r, W_dec.transpose(1, 2), out=buf("g_aux", E, B, F_))
    torch.ops.aten.threshold_backward.grad_input(g_aux, c_aux, 0.0, grad_input=g_aux)
    g += g_aux
    return value
