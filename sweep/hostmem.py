"""Page-locked host memory for asynchronous copies to and from a GPU, sized exactly.

torch's pinned allocator rounds every allocation up to a power of two (a 604 MB chunk locks
1 GiB); here one block of exactly the size asked for is allocated in pageable memory and
locked with ``cudaHostRegister`` over whole pages inside its own allocation (CUDA refuses a
range that touches a page already locked, and small heap blocks can share pages). A block
larger than :data:`MAX_LOCKED_SHARE` of the host's memory stays pageable: its copies are
synchronous, but a GPU-filling ensemble's snapshot (12 bytes per parameter) cannot lock
most of the host's memory away.
"""

from __future__ import annotations

import logging
import mmap

import torch

from sweep.devices import host_memory_bytes
from sweep.errors import SweepError

log = logging.getLogger(__name__)

PAGE = mmap.PAGESIZE
"""What ``cudaHostRegister`` locks: whole pages."""
PORTABLE = 1
"""``cudaHostRegisterPortable``."""
MAX_LOCKED_SHARE = 0.125
"""The largest block locked, as a share of the host memory this process may use (a cgroup
limit, e.g. a SLURM job's, counts: :func:`sweep.devices.host_memory_bytes`)."""


class HostBlock:
    """``nbytes`` of host memory (uint8 ``data``), page-locked when ``lock`` (on CUDA) and
    small enough; :meth:`release` unlocks it (before the memory can be freed)."""

    def __init__(self, nbytes: int, lock: bool, what: str) -> None:
        total = -(-max(nbytes, 1) // PAGE) * PAGE
        raw = torch.empty(total + PAGE, dtype=torch.uint8)
        start = -raw.data_ptr() % PAGE
        self.data = raw[start : start + total]
        self.what = what
        self.locked = lock and _lockable(total, what)
        if self.locked:
            _register(self.data, what)

    def release(self) -> None:
        if self.locked:
            self.locked = False
            err = int(torch.cuda.cudart().cudaHostUnregister(self.data.data_ptr()))
            if err != 0:
                log.warning("could not unlock %s's host memory (cudaError %d)", self.what, err)


def _lockable(nbytes: int, what: str) -> bool:
    if nbytes <= MAX_LOCKED_SHARE * host_memory_bytes():
        return True
    log.info(
        "%s: %.1f GiB stays pageable (over %.0f%% of the host's memory); its copies are "
        "synchronous",
        what,
        nbytes / 2**30,
        100 * MAX_LOCKED_SHARE,
    )
    return False


def _register(block: torch.Tensor, what: str) -> None:
    """Page-lock ``block`` for asynchronous copies."""
    # portable: locked for every device's context, not only the current one's
    err = int(torch.cuda.cudart().cudaHostRegister(block.data_ptr(), block.numel(), PORTABLE))
    if err != 0:
        raise SweepError(
            f"could not page-lock {block.numel() / 2**30:.1f} GiB of host memory for {what} "
            f"(cudaError {err}); lower grid.max_members"
        )
