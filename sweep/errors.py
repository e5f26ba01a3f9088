"""Errors a user can act on. The CLI prints their message on one line and exits non-zero."""

from __future__ import annotations

import errno


class SweepError(Exception):
    """A problem with the user's input or environment; the message names it and the fix."""


class StoreError(SweepError):
    """A chunk store is missing, incomplete, damaged or does not fit the config."""


class RunDirError(SweepError):
    """A sweep or run folder cannot be written, or holds something that conflicts."""


DISK_FULL_FIX = (
    "free space (or copy the sweep folder to a bigger disk) and re-run the same command; "
    "finished runs and checkpoints are intact"
)


def is_disk_full(err: BaseException | str) -> bool:
    """Whether an error (or a failed task's reason) means the disk or quota is full."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(err)
    return "No space left on device" in text or "Disk quota exceeded" in text


def os_error_message(err: OSError) -> str:
    """One line for an OSError a user can act on."""
    where = f" ({err.filename})" if err.filename else ""
    if is_disk_full(err):
        return f"no space left on the device{where}; {DISK_FULL_FIX}"
    return f"{err.strerror or err}{where}; check the path and its permissions, then re-run"


def task_error_reason(err: Exception) -> str:
    """The last line of what a failed Ray task raised (its cause), for a one-line message."""
    cause = getattr(err, "cause", None)
    text = str(cause) if cause is not None else str(err)
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else type(err).__name__


CPU_OUT_OF_MEMORY = "can't allocate memory"
"""What torch's CPU allocator says when an allocation fails (a RuntimeError, not an OOM type)."""


def is_out_of_memory(err: BaseException) -> bool:
    """Whether ``err`` — or what it wraps (torch.compile wraps an allocation that failed while
    it tuned kernels) — is an allocation that did not fit in device or host memory."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [err]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError":
            return True
        if isinstance(e, RuntimeError) and CPU_OUT_OF_MEMORY in str(e):
            return True
        todo += [e.__cause__, e.__context__, getattr(e, "inner_exception", None)]
    return False
