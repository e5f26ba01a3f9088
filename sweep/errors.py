"""Errors a user can act on. The CLI prints their message on one line and exits non-zero."""

from __future__ import annotations

import errno
import select
import sys


class SweepError(Exception):
    """A problem with the user's input or environment; the message names it and the fix."""


class NotARunFolder(SweepError, FileNotFoundError):
    """``sweep.load_run`` was given a folder that holds no run (a FileNotFoundError too, as
    it was before it named the fix)."""


class StoreError(SweepError):
    """A chunk store is missing, incomplete, damaged or does not fit the config."""


class RunDirError(SweepError):
    """A sweep or run folder cannot be written, or holds something that conflicts."""


class OutOfMemory(SweepError):
    """An ensemble's allocation did not fit (``where``: ``"host"`` or ``"device"``;
    ``evaluating``: while its members were evaluated, not trained); its checkpoints are kept.
    The driver reads them to continue it smaller."""

    def __init__(self, message: str, where: str, evaluating: bool = False) -> None:
        super().__init__(message)
        self.where, self.evaluating = where, evaluating

    def __reduce__(self) -> tuple:  # (raised in a Ray task, read in the driver)
        return type(self), (str(self), self.where), self.__dict__


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


WRITTEN_FIX = "free space and re-run the same command; what it wrote before is intact"
"""A full disk's fix for a command that trains nothing (report, export, harvest)."""
OS_ERROR_FIXES = {
    errno.EIO: "the disk or its file system failed (see dmesg); repair it, then re-run the "
    "same command (what was written before is verified as it is read)",
    errno.EROFS: "the file system is mounted read-only; use a writable folder, then re-run",
}
"""What to do about an OSError, by errno (else: check the path and its permissions)."""


MEND = "mend the cause (permissions, the disk) and re-run"
"""The fix for a file the OS failed to read: proof of nothing about it, so never repaired."""


def could_not_read(path: object, err: OSError) -> str:
    """One line for a file the OS failed to read (``PATH could not be read (Error: ...)``) and
    :data:`MEND`."""
    return f"{path} could not be read ({type(err).__name__}: {err}); {MEND}"


def os_error_message(err: OSError, trains: bool = True) -> str:
    """One line for an OSError a user can act on (``trains``: raised by a command that
    trains, whose sweep folder holds checkpoints)."""
    where = f" ({err.filename})" if err.filename else ""
    if is_disk_full(err):
        return f"no space left on the device{where}; {DISK_FULL_FIX if trains else WRITTEN_FIX}"
    fix = OS_ERROR_FIXES.get(err.errno or 0, "check the path and its permissions, then re-run")
    return f"{err.strerror or err}{where}; {fix}"


def stdout_gone() -> bool:
    """Whether stdout is a pipe whose reader went away (``sweep status DIR | head``): a
    BrokenPipeError then is no problem of the user's paths or permissions."""
    try:
        poll = select.poll()
        poll.register(sys.stdout.fileno(), select.POLLERR)  # a pipe with no reader: POLLERR
        return bool(poll.poll(0))
    except (OSError, ValueError, AttributeError):  # no file behind stdout (captured, closed)
        return False


def first_line(err: BaseException) -> str:
    """The first line of ``err``'s message ("" when it has none), for one-line messages."""
    return (str(err).strip().splitlines() or [""])[0]


def task_error_reason(err: Exception) -> str:
    """What a failed Ray task raised, in one line: the first line of its cause (a
    :class:`SweepError`'s message as it is; another error's after its type, ``KeyError:
    'x'``), else the last line of Ray's own message (where its error's type and text are)."""
    cause = getattr(err, "cause", None)
    if cause is None:
        lines = [ln for ln in str(err).strip().splitlines() if ln.strip()]
        return lines[-1] if lines else type(err).__name__
    first = first_line(cause)
    if isinstance(cause, SweepError):
        return first or type(cause).__name__
    return f"{type(cause).__name__}: {first}" if first else type(cause).__name__


HOST_OUT_OF_MEMORY = ("can't allocate memory",)
"""What torch's CPU allocator says when an allocation fails (a RuntimeError, not an OOM type)."""
DEVICE_OUT_OF_MEMORY = ("out of memory", "CUBLAS_STATUS_ALLOC_FAILED")
"""What CUDA, cuBLAS and Triton say when device memory runs out outside torch's allocator
(a handle, a graph, a kernel's load): RuntimeErrors of other types."""


def out_of_memory(err: BaseException) -> str | None:
    """``"host"`` or ``"device"`` when ``err`` — or what it wraps (torch.compile wraps an
    allocation that failed while it tuned kernels) — is memory that ran out; else None."""
    seen: set[int] = set()
    todo: list[object] = [err]
    while todo:
        e = todo.pop()
        if not isinstance(e, BaseException) or isinstance(e, SweepError) or id(e) in seen:
            continue  # (a SweepError already names its problem and fix)
        seen.add(id(e))
        text = str(e)
        if isinstance(e, MemoryError) or any(m in text for m in HOST_OUT_OF_MEMORY):
            return "host"
        if type(e).__name__ == "OutOfMemoryError" or any(m in text for m in DEVICE_OUT_OF_MEMORY):
            return "device"
        todo += [e.__cause__, getattr(e, "inner_exception", None)]
        if not e.__suppress_context__:
            todo.append(e.__context__)
    return None
