"""Per-member sums whose bits depend neither on the member count nor on the thread count.

On the CPU torch reduces a tensor to ONE number by splitting it between threads (and rounds
as they split), while it reduces each of several outputs on one thread. A lone member's
``x.sum()`` would then differ from the same member's slice of an ensemble's
``x.flatten(1).sum(dim=1)``; here every member's values are summed in rows (many outputs,
each on one thread), then its row sums (fewer than a split's threshold).
"""

from __future__ import annotations

import math

import torch

MAX_ROWS = 2**14
"""Row sums per member at most: torch splits a reduction of 32768 values or more."""


def member_sums(x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """(E,) sums of ``x`` (E, ...) over all but its first dimension, in ``dtype`` if given."""
    flat = x.reshape(x.shape[0], -1)
    n = flat.shape[1]
    rows = math.gcd(n, MAX_ROWS)  # the most rows (a power of two) n values divide into
    if rows > 1 or n < 2 * MAX_ROWS:  # (a view: no copy)
        return flat.reshape(x.shape[0], rows, n // rows).sum(dim=2, dtype=dtype).sum(dim=1)
    row = -(-n // MAX_ROWS)  # an odd n: whole rows, then the rest
    full = n - n % row
    whole = flat[:, :full].reshape(x.shape[0], -1, row).sum(dim=2, dtype=dtype).sum(dim=1)
    return whole + flat[:, full:].sum(dim=1, dtype=dtype)
