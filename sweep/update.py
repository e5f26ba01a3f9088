"""What follows the gradients in an ensemble step, shared by the eager and compiled steps:
the per-member gradient clip, Adam over the stacked tensors in one pass per parameter, and
the bookkeeping of which latents fired."""

from __future__ import annotations

import torch

from sweep.archs import Architecture, Params
from sweep.optim import Adam
from sweep.sums import member_sums

SINCE_FIRED = "since_fired"


def clip_members(grads: Params, max_norm: float | None) -> torch.Tensor:
    """Scale each member's gradients in place so their global norm is at most ``max_norm``
    (``torch.nn.utils.clip_grad_norm_``'s rule, per member: factor max_norm / (norm + 1e-6);
    None: no clip); returns (E,) bool: the members that can step. One whose gradient's
    squares overflow (a finite loss at an absurd L1) would stop moving unseen, its norm's
    clip factor zero (or, unclipped, Adam's second moment inf): the step freezes it instead."""
    if max_norm is None:  # Adam squares each element: that square must be finite
        return torch.isfinite(_largest_squares(grads))
    # by name: a restored ensemble's dict order differs, and the sum must not
    sq = sum(member_sums(grads[k].pow(2)) for k in sorted(grads))  # (E,), as if alone
    factor = (max_norm / (sq.sqrt() + 1e-6)).clamp(max=1.0)  # type: ignore[union-attr]
    for g in grads.values():
        g.mul_(factor.view(-1, *[1] * (g.dim() - 1)))
    return torch.isfinite(sq)  # type: ignore[arg-type]


def _largest_squares(grads: Params) -> torch.Tensor:
    """(E,) each member's largest squared gradient element (NaN where one is NaN)."""
    inf = float("inf")
    per_param = [torch.linalg.vector_norm(g.flatten(1), inf, dim=1) for g in grads.values()]
    return torch.stack(per_param).amax(dim=0).pow(2)


def adam_stacked(
    p: torch.Tensor,
    g: torch.Tensor,
    m: torch.Tensor,
    v: torch.Tensor,
    step_E: torch.Tensor,
    active_E: torch.Tensor,
    lr: torch.Tensor,
    adam: Adam,
) -> None:
    """``torch.optim.Adam``'s update of every active member's slice of the stacked (E, ...)
    parameter ``p``, in place; an inactive member's parameter, moments and step stay. ``lr``:
    one learning rate (0-d) or each member's (E,)."""
    shape = (-1,) + (1,) * (p.dim() - 1)  # (E, 1, ...): per-member values against p
    lr = lr.view(shape) if lr.dim() == 1 else lr
    b1, b2 = adam.betas
    a = active_E.view(shape)  # (E, 1, ...) bool
    step_E.add_(active_E.to(step_E.dtype))  # (E,): an inactive member's count stays
    s = step_E.view(shape)  # (E, 1, ...)
    m_new = torch.lerp(m, g, 1 - b1)
    v_new = v * b2 + g * g * (1 - b2)
    denom = v_new.sqrt() / (1 - b2**s).sqrt() + adam.eps
    p_new = p - (lr / (1 - b1**s)) * m_new / denom
    p.copy_(torch.where(a, p_new, p))
    m.copy_(torch.where(a, m_new, m))
    v.copy_(torch.where(a, v_new, v))


def track(
    arch: Architecture,
    buffers: Params,
    codes_EBF: torch.Tensor,
    active_E: torch.Tensor,
    dead_tokens: int | None,
) -> None:
    """Fold a batch's codes into the members' buffers (thresholds; rows since each latent
    fired, capped at ``dead_tokens``: bounded; exact in fp32 below 2**24 rows, rounded but
    deterministic above)."""
    arch.update_buffers(buffers, codes_EBF, active_E)
    if SINCE_FIRED in buffers:
        since = buffers[SINCE_FIRED]  # (E, F)
        fired = codes_EBF.amax(dim=1) > 0  # (E, F); codes are >= 0 (4x faster than any() on CPU)
        cap = float(dead_tokens or 0)
        new = torch.where(fired, 0.0, (since + codes_EBF.shape[1]).clamp(max=cap))
        since.copy_(torch.where(active_E[:, None], new, since))
