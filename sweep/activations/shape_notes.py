"""What a store's statistics say before any training, read from its manifest's ``stats`` (no
pass over the rows): rows that do not vary are refused (nothing to learn); these make
dictionaries worse, or their numbers misleading, without any error, and are warned of:

- **Offset.** ``data.normalize`` scales rows to a mean norm of sqrt(width) (SAELens's and
  Anthropic's convention): where a large constant offset makes up most of that norm, the
  spread around the mean — what the dictionary must explain — is scaled far below 1 per
  element, and an L1 (or JumpReLU L0) coefficient acts as if that many times larger.
- **Heavy tail.** A few rows with norms far above the rest (a BOS or delimiter token's
  massive activations) carry most of the variance: FVU, the scale and ``b_dec``'s start
  follow them, so FVU can read near 0 while typical rows are reconstructed badly.
- **Held-out rows unlike the rest** (:func:`held_out_unlike`, which reads them): the store's
  last ``data.eval_rows`` judge every run; padding there, or the end of an unshuffled store
  unlike its start, makes every metric misleading.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from sweep.errors import StoreError

OFFSET_SHARE = 0.1
"""Below this share of the rows' mean squared norm in their spread around the mean, a
normalised store is said to be offset (a centred Gaussian store: ~1)."""
HEAVY_TAIL = 4.0
"""Above this ratio E‖x‖² / (E‖x‖)², a store is said to be heavy-tailed (rows of one norm:
1; a BOS row 100x the norm in every 1024: ~9)."""


CONSTANT = 1e-12
"""Rows whose spread around their mean is below this share of their mean squared norm do not
vary (what is left is rounding), as :data:`sweep.metrics.VARIANCE_FLOOR` judges held-out rows."""


def refuse_constant(stats: dict, path: Path) -> None:
    """Refuse a store whose rows are all one vector (all zero, or constant)."""
    moment = float(stats.get("mean_sq_row_norm") or 0.0)
    if sum(s * s for s in stats.get("std") or []) <= CONSTANT * moment:
        what = "zero" if moment == 0 else "one vector"
        raise StoreError(
            f"every row of chunk store {path} is {what}: there is nothing for a dictionary to "
            "learn; check how the store was made (the model, hook or data it read)"
        )


def store_notes(stats: dict, normalize: bool, knob: str = "l1") -> list[str]:
    """The warnings a store's ``stats`` (its manifest's) call for, one line each, for a sweep
    of sparsity knob ``knob`` (``l1`` or ``k``)."""
    notes = []
    moment = float(stats.get("mean_sq_row_norm") or 0.0)
    norm = float(stats.get("mean_row_norm") or 0.0)
    spread = sum(s * s for s in stats.get("std") or [])
    if normalize and moment > 0 and spread < OFFSET_SHARE * moment:
        weaker = math.sqrt(moment / spread) if spread > 0 else math.inf
        effect = (
            "TopK-style dictionaries train worse there"
            if knob == "k"
            else "an l1 coefficient acts that many times stronger and dictionaries come out "
            f"sparser and worse; sweep grid.l1 about {weaker:.3g}x lower"
        )
        notes.append(
            f"the store's rows sit far from the origin: their spread around the mean is "
            f"{spread / moment:.2%} of their mean squared norm, and data.normalize scales by "
            f"the norm, so the spread the SAE sees is {weaker:.3g}x smaller than on a centred "
            f"store: {effect}"
        )
    if norm > 0 and moment / norm**2 > HEAVY_TAIL:
        notes.append(
            f"a few of the store's rows have norms far above the rest (E‖x‖² is "
            f"{moment / norm**2:.3g}x (E‖x‖)², e.g. a BOS token's massive activations): they "
            "carry most of the variance, so FVU can read near 0 while typical rows are "
            "reconstructed badly; leave such rows out of the store (a harvest drops BOS "
            "unless data.drop_bos=false)"
        )
    return notes


UNLIKE = 2.0
"""Held-out rows whose mean norm is over this factor off the store's are said to be unlike it."""
ZERO_SHARE = 0.1
"""Held-out rows more often zero than this are said to be unlike the store (padding)."""


def held_out_unlike(tail: torch.Tensor, stats: dict, eval_rows: int) -> str | None:
    """A warning when the held-out rows ``tail`` (the store's last ``eval_rows``) are unlike
    the store as a whole (``stats``: its manifest's)."""
    norms = tail.float().norm(dim=1)
    zero = float((norms == 0).float().mean()) if len(norms) else 0.0
    ratio = float(norms.mean()) / float(stats.get("mean_row_norm") or 1.0) if len(norms) else 1
    if zero <= ZERO_SHARE and 1 / UNLIKE <= ratio <= UNLIKE:
        return None
    return (
        f"the held-out rows (the store's last data.eval_rows={eval_rows}, on which every run is "
        f"judged) are unlike the rest: {zero:.0%} of them are zero and their mean norm is "
        f"{ratio:.3g}x the store's, so every metric measures them, not the store; write the "
        "store's rows shuffled, or without padding"
    )
