"""What a store's rows say before a new sweep trains on them, from its manifest's ``stats``
and its held-out rows (the last ``data.eval_rows``, which every run is judged on). Rows that
do not vary are refused (nothing to learn); these make dictionaries worse, or their numbers
misleading, without any error, and are warned of:

- **Offset.** ``data.normalize`` scales rows to a mean norm of sqrt(width) (SAELens's and
  Anthropic's convention): where a large constant offset makes up most of that norm, the
  spread around the mean — what the dictionary must explain — is scaled by ``1/r`` (r > 3),
  and an L1 coefficient acts r times stronger (a JumpReLU L0 coefficient r² times: its
  penalty does not scale with the rows). On SmolLM2-135M's residual stream the spread is
  48–75% of the mean squared norm (r < 1.5): no warning.
- **Heavy tail.** A few rows with norms far above the rest (a BOS or delimiter token's
  massive activations) carry most of the variance: FVU, the scale and ``b_dec``'s start
  follow them, so FVU can read near 0 while typical rows are reconstructed badly. Judged on
  the held-out rows' non-zero ones (a sparse store's many zero rows are no tail).
- **Raw scale.** With ``data.normalize=false``, JumpReLU's thresholds (their start and the
  bandwidth of their gradient) are in the rows' own units, set for rows of norm sqrt(width):
  on rows of another scale its L0 penalty acts otherwise, and the schedule check is off.
  Rows far smaller than that kill any architecture's latents: Adam moves every weight by
  about ``train.lr`` a step, whatever the rows' scale.
- **Held-out rows unlike the rest**: padding at the store's end, or the end of an
  unshuffled store unlike its start, makes every metric measure them, not the store.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from sweep.errors import StoreError

OFFSET_SHARE = 0.1
"""Below this share of the rows' mean squared norm in their spread around the mean, a
normalised store is said to be offset (a centred Gaussian store: ~1; SmolLM2: 0.48-0.94)."""
HEAVY_TAIL = 4.0
"""Above this ratio E‖x‖² / (E‖x‖)² over the non-zero held-out rows, a store is said to be
heavy-tailed (rows of one norm: 1; SmolLM2's residual stream: 1.03-2.1, BOS kept or not; a
row 100x the norm in every 1024: ~9)."""
RAW_SCALE = 4.0
"""With ``data.normalize=false``, JumpReLU's rows are said to be off the scale its thresholds
are set for beyond this factor off sqrt(width) (a threshold's start and bandwidth then sit
that factor off the codes' scale)."""
SMALL_FOR_LR = 3.0
"""With ``data.normalize=false``, rows are said to be too small for the learning rate below
a mean norm of this times ``train.lr`` x sqrt(width) (synthetic, width 16, lr 3e-3, l1=0:
9% of latents dead at 0.027x sqrt(width), 48% at 0.008x, 82% at 0.0027x)."""
UNLIKE = 2.0
"""Held-out rows whose mean norm is over this factor off the store's are said to be unlike it."""
CONSTANT = 1e-12
"""Rows whose spread around their mean is below this share of their mean squared norm do not
vary (what is left is rounding), as :data:`sweep.metrics.VARIANCE_FLOOR` judges held-out rows."""
BLOCK = 4096
"""Held-out rows are measured this many at a time (no float32 copy of them all)."""


def refuse_constant(stats: dict, path: Path) -> None:
    """Refuse a store whose rows are all one vector (all zero, or constant); a manifest
    without the statistics to say (one not written by sweep) is let be."""
    if "std" not in stats or "mean_sq_row_norm" not in stats:
        return
    moment = float(stats["mean_sq_row_norm"])
    if sum(s * s for s in stats["std"]) <= CONSTANT * moment:
        what = "zero" if moment == 0 else "one vector"
        raise StoreError(
            f"every row of chunk store {path} is {what}: there is nothing for a dictionary to "
            "learn; check how the store was made (the model, hook or data it read)"
        )


def store_notes(
    stats: dict,
    tail: torch.Tensor,
    eval_rows: int,
    normalize: bool,
    arch: object,
    lr: float | None = None,
) -> list[str]:
    """The warnings a store calls for, one line each: ``stats`` its manifest's, ``tail`` its
    held-out rows, ``arch`` the sweep's architecture (:class:`sweep.archs.Architecture`),
    ``lr`` its peak learning rate (the largest of ``grid.lr``'s)."""
    if "std" not in stats or "mean_sq_row_norm" not in stats:
        return []  # (a manifest not written by sweep)
    notes = [_offset(stats, arch)] if normalize else [_raw_scale(stats, arch, lr)]
    norms = torch.cat(
        [tail[at : at + BLOCK].float().norm(dim=1) for at in range(0, len(tail), BLOCK)]
    )
    notes += [_heavy_tail(norms), _unlike(norms, stats, eval_rows)]
    return [n for n in notes if n]


def _offset(stats: dict, arch: object) -> str | None:
    moment = float(stats["mean_sq_row_norm"])
    spread = sum(s * s for s in stats["std"])
    if not 0 < spread < OFFSET_SHARE * moment:
        return None
    r = math.sqrt(moment / spread)
    if getattr(arch, "knob", "l1") == "k":
        effect = "TopK-style dictionaries train worse there"
    else:  # (MSE shrinks by r², an L1 penalty by r, an L0 penalty not at all)
        l0 = getattr(arch, "l0_penalty", False)
        what, lower = ("JumpReLU's L0 coefficient", r * r) if l0 else ("an l1 coefficient", r)
        effect = (
            f"{what} acts {lower:.3g}x stronger and dictionaries come out sparser and worse; "
            f"sweep grid.l1 about {lower:.3g}x lower"
        )
    return (
        f"the store's rows sit far from the origin: their spread around the mean is "
        f"{spread / moment:.2%} of their mean squared norm, and data.normalize scales by "
        f"the norm, so the spread the SAE sees is r = {r:.3g}x smaller than on a centred store: "
        f"{effect}"
    )


def _raw_scale(stats: dict, arch: object, lr: float | None) -> str | None:
    norm = float(stats.get("mean_row_norm") or 0.0)
    if norm == 0:
        return None
    ratio = norm / math.sqrt(len(stats["std"]))
    form = getattr(arch, "form", None)
    if getattr(arch, "l0_penalty", False) and form and not 1 / RAW_SCALE <= ratio <= RAW_SCALE:
        what = (
            f"JumpReLU's thresholds (start {form.init:g}, bandwidth {form.bandwidth:g}) are set "
            "for rows of norm sqrt(width): its L0 penalty acts otherwise than on a normalised "
            "store, and may leave L0 where it starts"
        )
    elif lr and ratio < SMALL_FOR_LR * lr:
        what = (
            f"Adam moves each weight ~its learning rate ({lr:g}) a step, much against codes of rows this "
            "small: latents die, whatever the grid's sparsity"
        )
    else:
        return None
    return (
        f"data.normalize=false: the store's rows have a mean norm {ratio:.3g}x sqrt(width), "
        f"while {what}; set data.normalize=true (the scale is folded into the saved weights)"
    )


def _heavy_tail(norms: torch.Tensor) -> str | None:
    live = norms[norms > 0].double()
    if len(live) == 0:
        return None
    ratio = float(live.pow(2).mean() / live.mean().pow(2))
    if ratio <= HEAVY_TAIL:
        return None
    return (
        f"a few of the store's rows have norms far above the rest (E‖x‖² is {ratio:.3g}x "
        "(E‖x‖)² over its held-out non-zero rows, e.g. a BOS token's massive activations): "
        "they carry most of the variance, so FVU can read near 0 while typical rows are "
        "reconstructed badly; leave such rows out of the store (a harvest drops BOS unless "
        "data.drop_bos=false)"
    )


def _unlike(norms: torch.Tensor, stats: dict, eval_rows: int) -> str | None:
    if len(norms) == 0:
        return None
    ratio = float(norms.double().mean()) / float(stats.get("mean_row_norm") or 1.0)
    if 1 / UNLIKE <= ratio <= UNLIKE:
        return None
    zero = float((norms == 0).double().mean())
    return (
        f"the held-out rows (the store's last data.eval_rows={eval_rows}, on which every run is "
        f"judged) are unlike the rest: their mean norm is {ratio:.3g}x the store's ({zero:.0%} "
        "of them zero), so every metric measures them, not the store; write the store's rows "
        "shuffled, or without padding"
    )
