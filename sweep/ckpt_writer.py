"""Checkpoints written in the background while training goes on.

:meth:`CheckpointWriter.save` copies every member's state into host buffers that are reused
from one checkpoint to the next (page-locked on CUDA, so the copy is one asynchronous DMA)
and hands the write to one background thread; training continues at once. At most one write
is in flight: a new checkpoint first waits for the previous one. Each member's file is still
written atomically with its checksum (:func:`sweep.checkpoints.save_checkpoint`), so a kill
during a write leaves the previous checkpoint in place, and resume stays exact: the snapshot
is the state after exactly ``step`` steps.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from sweep.activations.store import Cursor
from sweep.checkpoints import Checkpoint
from sweep.ensemble import Ensemble
from sweep.hostmem import HostBlock
from sweep.restore import checkpoint_meta, member_tensors
from sweep.rundir import RunFolder

log = logging.getLogger(__name__)


class CheckpointWriter:
    """One ensemble's checkpoints: snapshot on the training thread, write in the background."""

    def __init__(self, folders: list[RunFolder]) -> None:
        self.folders = folders
        self._buffers: list[dict[str, torch.Tensor]] | None = None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-write")
        self._pending: Future | None = None
        self._blocks: list[HostBlock] = []
        self.write_seconds = 0.0

    def _host_buffers(self, ens: Ensemble) -> list[dict[str, torch.Tensor]]:
        if self._buffers is None:
            members = [member_tensors(ens, e) for e in range(len(self.folders))]
            self._buffers = self._carve(members, _on_cuda(ens))
        return self._buffers

    def _carve(
        self, like: list[dict[str, torch.Tensor]], pin: bool
    ) -> list[dict[str, torch.Tensor]]:
        """Host tensors shaped as each member's ``like``: disjoint views into one block of
        exactly their size, page-locked on CUDA (:class:`sweep.hostmem.HostBlock`)."""
        offsets, total = [], 0
        for member in like:
            offsets.append({})
            for k, v in member.items():
                offsets[-1][k] = total
                total += -(-v.numel() * v.element_size() // ALIGN) * ALIGN
        block = HostBlock(total, pin, "checkpoint snapshots")
        self._blocks.append(block)
        return [
            {
                k: block.data[at[k] : at[k] + v.numel() * v.element_size()]
                .view(v.dtype)
                .view(v.shape)
                for k, v in member.items()
            }
            for member, at in zip(like, offsets, strict=True)
        ]

    def save(self, ens: Ensemble, cursor: Cursor, step: int, diverged_at: torch.Tensor) -> None:
        """Snapshot every member at ``step`` and write them in the background."""
        self.wait()  # at most one write in flight; its buffers are about to be reused
        metas = checkpoint_meta(ens, cursor, diverged_at)  # its host reads before the copies
        buffers = self._host_buffers(ens)
        for e, buf in enumerate(buffers):
            for k, v in member_tensors(ens, e).items():
                buf[k].copy_(v, non_blocking=True)  # (...) device -> (...) host
        done = torch.cuda.Event() if _on_cuda(ens) else None
        if done is not None:
            done.record()
        self._pending = self._pool.submit(self._write, step, metas, done)

    def _write(self, step: int, metas: list[dict], done: torch.cuda.Event | None) -> None:
        t0 = time.perf_counter()
        if done is not None:
            done.synchronize()  # the device-to-host copies have landed
        assert self._buffers is not None
        for folder, buf, meta in zip(self.folders, self._buffers, metas, strict=True):
            folder.save_checkpoint(Checkpoint(step, buf, meta))
        self.write_seconds += time.perf_counter() - t0

    def wait(self) -> None:
        """Block until the write in flight (if any) is on disk; re-raise its error."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    def raise_failed(self) -> None:
        """Re-raise the error of a write that has already failed (a full disk), without
        waiting for one still in flight: training stops at once, not a checkpoint later."""
        if self._pending is not None and self._pending.done():
            self.wait()

    def close(self, quiet: bool = False) -> None:
        """Wait for the write in flight and free the buffers. ``quiet`` (closing after another
        error): a failed write is logged, not raised, so the first error stays the one
        reported."""
        try:
            self.wait()
        except Exception as err:
            if not quiet:
                raise
            log.warning("a checkpoint write failed while stopping on an error: %s", err)
        finally:
            self._pool.shutdown(wait=True)
            for block in self._blocks:
                block.release()
            self._blocks.clear()


ALIGN = 64
"""Byte alignment of each tensor in the host block."""


def _on_cuda(ens: Ensemble) -> bool:
    return next(iter(ens.params.values())).device.type == "cuda"
