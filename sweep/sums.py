"""Per-member sums whose bits depend neither on the member count nor on the thread count.

On the CPU torch reduces a tensor to ONE number by splitting it between threads (and rounds
as they split), while it reduces each of several outputs on one thread. A lone member's
``x.sum()`` would then differ from the same member's slice of an ensemble's
``x.flatten(1).sum(dim=1)``; here every member's values are summed in rows of :data:`ROW`
(many outputs, each on one thread), then its row sums (fewer than a split's threshold).
"""

from __future__ import annotations

import torch

ROW = 1024
MAX_ROWS = 16384
"""Row sums per member at most: torch splits a reduction of 32768 values or more."""


def member_sums(x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """(E,) sums of ``x`` (E, ...) over all but its first dimension, in ``dtype`` if given."""
    flat = x.reshape(x.shape[0], -1)
    n = flat.shape[1]
    row = max(ROW, -(-n // MAX_ROWS))
    full = n - n % row
    rows = flat[:, :full].reshape(x.shape[0], -1, row).sum(dim=2, dtype=dtype).sum(dim=1)
    return rows + flat[:, full:].sum(dim=1, dtype=dtype) if full < n else rows
