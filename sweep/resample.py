"""Dead-latent resampling for ReLU-L1 and gated SAEs (Bricken et al. 2023, "Towards Monosemanticity").

Every ``train.resample_dead`` steps (until ``train.resample_stop`` of training), each
member's dead latents (silent for ``train.dead_tokens`` rows) are re-initialised from rows of
the batch just trained on, drawn with probability proportional to the square of their
reconstruction loss:

- decoder row  = the drawn row, centred by ``b_dec`` and scaled to unit norm (with
  ``sae.recipe=weighted``, whose decoder rows are free and weight the L1, to the mean norm of
  the alive rows: a unit row among rows near 0.1 would pay ~10x their L1);
- encoder column = that direction times 0.2 x the mean norm of the alive encoder columns;
- encoder bias = 0 (a gated SAE's magnitude parameters too: its two paths start equal), and
  the Adam moments of every re-initialised entry = 0.

The draw uses a generator seeded from the train seed, the run's seed and the step, so a
resumed sweep resamples exactly as an uninterrupted one (the batch is fixed by the cursor).
"""

from __future__ import annotations

import torch

from sweep.archs import Architecture, Params, unit_rows
from sweep.ensemble import Ensemble
from sweep.update import SINCE_FIRED

ENCODER_SCALE = 0.2


def generator(train_seed: int, run_seed: int, step: int) -> torch.Generator:
    """Seeded from the train seed, the run's seed and the step; modulo 2**64, which torch
    takes (a date as train.seed overflowed it; smaller seeds keep their draws)."""
    seed = (train_seed * 1_000_003 + run_seed) * 1_000_033 + step
    return torch.Generator().manual_seed(seed % 2**64)


@torch.no_grad()
def resample_member(
    arch: Architecture,
    params: Params,
    moments: list[Params],
    x_BD: torch.Tensor,
    dead_F: torch.Tensor,
    g: torch.Generator,
) -> int:
    """Re-initialise one member's dead latents in place (``params`` and each of ``moments``,
    e.g. Adam's exp_avg and exp_avg_sq, hold that member's tensors); returns how many."""
    ids = dead_F.nonzero().squeeze(1)  # (n,)
    if ids.numel() == 0:
        return 0
    pre = arch.pre(params, x_BD)
    codes = arch.activate(pre, {}, params, 0)
    loss_B = (codes @ arch.decoder(params) + params["b_dec"] - x_BD).pow(2).sum(dim=1)
    weights = loss_B.double().pow(2).cpu()
    if not bool(weights.sum() > 0):
        weights = torch.ones_like(weights)
    rows = torch.multinomial(weights, ids.numel(), replacement=True, generator=g)  # (n,)
    dirs = unit_rows(x_BD[rows.to(x_BD.device)] - params["b_dec"])  # (n, D)
    alive = ~dead_F
    norm = params["W_enc"][:, alive].norm(dim=0).mean() if bool(alive.any()) else 1.0
    params["W_enc"][:, ids] = dirs.T * (ENCODER_SCALE * norm)
    if "W_dec" in params:
        params["W_dec"][ids] = dirs * _decoder_norm(arch, params["W_dec"], alive)
    for name in ("b_enc", *arch.feature_params):  # (a gate's magnitude path: as at the start)
        for t in (params, *moments):
            t[name][ids] = 0.0
    for m in moments:
        m["W_enc"][:, ids] = 0.0
        if "W_dec" in m:
            m["W_dec"][ids] = 0.0
    return int(ids.numel())


def _decoder_norm(arch: Architecture, W_dec: torch.Tensor, alive_F: torch.Tensor) -> float:
    """The norm of a resampled decoder row: 1, or the alive rows' mean (weighted L1)."""
    if not arch.weighted_l1 or not bool(alive_F.any()):
        return 1.0
    return float(W_dec[alive_F].norm(dim=1).mean())


def resample(
    ens: Ensemble, x_BD: torch.Tensor, step: int, train_seed: int, run_seeds: list[int]
) -> list[int]:
    """Resample every active member's dead latents; returns the count per member."""
    dead = ens.dead_mask()  # (E, F) or None
    if dead is None:
        return [0] * ens.n
    counts = []
    for e, active in enumerate(ens.active.tolist()):
        if not active:
            counts.append(0)
            continue
        member = {k: v[e] for k, v in ens.params.items()}
        moments = [
            {k: v[e] for k, v in ens.state.exp_avg.items()},
            {k: v[e] for k, v in ens.state.exp_avg_sq.items()},
        ]
        g = generator(train_seed, run_seeds[e], step)
        counts.append(resample_member(ens.arch, member, moments, x_BD, dead[e], g))
        ens.buffers[SINCE_FIRED][e][dead[e]] = 0.0
    return counts
