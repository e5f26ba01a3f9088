"""Atomic file writes and small JSON helpers, used by every layer that writes to disk.

A write goes to a temp file in the same folder, is fsynced, then renamed onto its path, so a
reader sees the old file or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from pathlib import Path
from tokenize import TokenError
from typing import BinaryIO, TypeVar

from sweep.errors import RunDirError, StoreError

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_read_umask()  # what open() would give; mkstemp alone gives 0600


def atomic_write(path: str | Path, write: Callable[[BinaryIO], object]) -> None:
    """Call ``write(file)`` on a temp file in the same folder, fsync, then rename onto ``path``
    and fsync the folder, so the rename is on disk before anything written or removed after
    it (a checkpoint's pruned predecessor, a finished run's checkpoints) after a power loss."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with _naming(path):
            with os.fdopen(fd, "wb") as f:  # (it owns fd: closed on any error below)
                os.fchmod(fd, _FILE_MODE)
                write(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_folder(path.parent)


def append_text(path: Path, text: str) -> None:
    """Append ``text`` to ``path``; a write that fails without a file name (a full disk's)
    names it, as :func:`atomic_write` does."""
    with _naming(path), open(path, "a") as f:
        f.write(text)


@contextlib.contextmanager
def _naming(path: Path) -> Iterator[None]:
    """An OSError without a file name raised inside names ``path`` (a full disk's write or
    fsync names no file: which disk is full, then?)."""
    try:
        yield
    except OSError as err:
        if err.filename is None and err.errno is not None:
            raise OSError(err.errno, err.strerror, str(path)) from err
        raise


def fsync_file(path: Path) -> None:
    """Make what was written to ``path`` durable (a file's appended lines, a folder's
    entries); nothing to do when it does not exist."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_folder(folder: Path) -> None:
    """Make the folder's entries (renames, new files) durable; a file system that cannot
    fsync a folder (some network ones) is left to its own ordering."""
    with contextlib.suppress(OSError):
        fsync_file(folder)


@contextlib.contextmanager
def flock_held(
    path: Path, busy: Callable[[], None] | None = None, create: bool = False
) -> Iterator[None]:
    """An exclusive ``fcntl.flock`` of ``path`` (a folder; a file, made if needed, with
    ``create``) for the block, released by the kernel if the process dies. Where another
    process holds it, ``busy()`` is called first (it may raise, to refuse; or say that this
    waits), then this waits. Opened read-only (flock needs no more: a file another user
    made in a shared folder still locks). A path that cannot be opened, or a file system
    without flock (some Lustre mounts), holds nothing. On NFS a folder's flock is each
    host's own."""
    import fcntl

    try:
        fd = os.open(path, os.O_RDONLY | (os.O_CREAT if create else 0), 0o644)
    except OSError as err:
        log.debug("%s cannot be opened to lock (%s); not locked", path, err)
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if busy is not None:
                busy()
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            pass  # (no flock here)
        yield
    finally:
        os.close(fd)  # (and the lock with it)


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes, read in 4 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def file_stamp(path: str | Path) -> list[int]:
    """What tells a file's bytes may have changed since a check read them: size, mtime, and
    the ctime and inode no copying tool sets (``touch -r``, ``cp -p`` and ``rsync -a`` restore
    an mtime; a file written again, in place or by a rename, has a new ctime)."""
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


GONE = (FileNotFoundError, NotADirectoryError)
"""What reading a file that is not there raises (NotADirectoryError: a folder on its path is
a file); any other OSError says nothing of the file, which may be whole."""


def unreadable(err: BaseException) -> bool:
    """Whether ``err`` is the OS failing to read a file that is there (a permission, an I/O
    error): proof of nothing about its bytes. (OmegaConf raises errno-less OSErrors for
    content it rejects: those are damage.)"""
    return isinstance(err, OSError) and err.errno is not None and not isinstance(err, GONE)


NPY_DAMAGED: tuple[type[Exception], ...] = (ValueError, EOFError, SyntaxError, TokenError)
"""What ``np.load`` raises for a damaged ``.npy`` file (its header is parsed as a Python
literal: a damaged one can fail to tokenize)."""


def read_error(path: Path, err: OSError) -> OSError | None:
    """What keeps ``path`` from being read, when reading it raised ``err`` (safetensors
    reports any failure to open a file, a permission's or too many open files', as
    ``FileNotFoundError``): None when the file is gone, else the error opening it gives
    (``err`` when it opens now)."""
    try:
        with open(path, "rb"):
            pass
    except GONE:
        return None
    except OSError as real:
        return real
    return err


def lift_file_size_limit() -> int | None:
    """Raise this process's file-size limit (``ulimit -f``; its children's too) to its hard
    limit: Ray's object store maps a file as large as its memory, a store's chunk or a
    checkpoint can be GBs (past the limit the raylet is killed by SIGXFSZ, Python's writes
    fail). Returns the limit left (a hard one), else None."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))
    return None if hard == resource.RLIM_INFINITY else hard


def cpu_count() -> int:
    """CPU cores this process may run on (its affinity: a Ray or SLURM task may get fewer
    than the machine has)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def hashing_map(fn: Callable[[T], R], items: Iterable[T]) -> list[R]:
    """``fn`` of each of ``items``, in order, on up to 8 threads: for work that hashes files
    (hashlib frees the GIL); the first error, in order, is raised."""
    with ThreadPoolExecutor(max(1, min(8, cpu_count())), thread_name_prefix="hash") as pool:
        return list(pool.map(fn, items))


READ_THREADS = max(2, min(4, cpu_count() // 4))
"""Threads one large read is split across: a single reader copies from the page cache at
~6 GB/s; two doubled it on a 2-core machine (``scripts/bench.py --sections 3``)."""
READ_SLICE = 1 << 23  # bytes: a read is not split below 8 MiB per thread
_readers: ThreadPoolExecutor | None = None
_readers_lock = threading.Lock()


def _forget_readers() -> None:
    global _readers
    _readers = None  # a forked child has the pool object but not its threads


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_readers)


def _reader_pool() -> ThreadPoolExecutor:
    global _readers
    with _readers_lock:
        if _readers is None:
            _readers = ThreadPoolExecutor(READ_THREADS, thread_name_prefix="read")
        return _readers


def read_exact(path: str | Path, offset: int, buf: memoryview) -> int:
    """Read ``path`` from ``offset`` into ``buf`` (bytes), large reads split across
    :data:`READ_THREADS` threads (positional reads release the GIL); returns the bytes read,
    fewer than ``len(buf)`` when the file ends before it fills. Every part has finished
    before the file is closed, whether or not one failed."""
    n = len(buf)
    parts = max(1, min(READ_THREADS, n // READ_SLICE)) if hasattr(os, "preadv") else 1
    step = -(-n // parts)
    fd = os.open(path, os.O_RDONLY)
    jobs: list[Future] = []
    try:
        if parts == 1:
            return _pread_full(fd, buf, offset)
        pool = _reader_pool()
        for at in range(0, n, step):
            jobs.append(pool.submit(_pread_full, fd, buf[at : at + step], offset + at))
        return sum(j.result() for j in jobs)  # == len(buf) only if every part was full
    finally:
        wait(jobs)  # no part may still read from ``fd`` (or into ``buf``) once it is closed
        os.close(fd)


def _pread_full(fd: int, buf: memoryview, offset: int) -> int:
    """``buf`` filled from ``fd`` at ``offset``, short reads continued; returns bytes read."""
    done = 0
    while done < len(buf):
        got = (
            os.preadv(fd, [buf[done:]], offset + done)
            if hasattr(os, "preadv")
            else os.pread(fd, len(buf) - done, offset + done)
        )
        if isinstance(got, bytes):  # os.pread (no preadv on this platform)
            buf[done : done + len(got)] = got
            got = len(got)
        if got == 0:
            break
        done += got
    return done


STALE_TEMP_SECONDS = 600.0
"""A temp file younger than this in a folder written without the lock (the sweep folder, a
report folder) may be a live write of ``sweep report``."""


def not_leftover(path: Path) -> bool:
    """Not the leftover of a write (or a write probe) killed midway."""
    leftover = path.name.endswith(".tmp") or path.name.startswith(".write-probe.")
    return not (path.name.startswith(".") and leftover)


def begun(folder: Path) -> bool:
    """``folder`` is a folder holding more than the leftovers of writes killed midway."""
    return folder.is_dir() and any(map(not_leftover, folder.iterdir()))


def remove_stale_temps(folder: str | Path, older_than: float = 0.0) -> int:
    """Delete the temp files of writes that were killed midway (only where no other process
    writes under the caller's lock: a run folder, a store); returns how many. ``older_than``
    (seconds) spares younger ones: in the sweep folder and a report folder ``sweep report`` may
    be writing without the lock (:data:`STALE_TEMP_SECONDS`)."""
    n, now = 0, time.time()
    for tmp in Path(folder).glob(".*.tmp"):
        with contextlib.suppress(FileNotFoundError):
            if older_than and now - tmp.stat().st_mtime < older_than:
                continue
            tmp.unlink()
            n += 1
    return n


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def json_number(v: object) -> bool:
    """Whether a value read from JSON is a number (a bool is not, though Python's is an int)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def json_bytes(obj: object) -> bytes:
    """``obj`` as the JSON every file here is written in."""
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()


def atomic_write_json(path: str | Path, obj: object) -> None:
    atomic_write_bytes(path, json_bytes(obj))


def read_json(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())


def json_dict(path: str | Path, strict: bool = False) -> dict:
    """``path``'s JSON object; {} when missing, damaged or not an object, or unreadable unless
    ``strict`` (then the error reading it is raised: one a caller must not take for damage)."""
    try:
        value = read_json(path)
    except GONE:
        return {}
    except OSError:
        if strict:
            raise
        return {}
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def ensure_writable(folder: str | Path, what: str, fix: str = "choose another folder") -> Path:
    """Create ``folder`` if needed and prove we can write into it (else: ``fix``)."""
    folder = Path(folder)
    if folder.is_file():
        raise RunDirError(f"{what} {folder} is a file, not a folder; choose another path")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".write-probe.")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise RunDirError(f"{what} {folder} is not writable ({err.strerror}); {fix}") from err
    return folder


def check_disk_space(writes: dict[Path, int], fix: str) -> None:
    """Refuse (one line naming ``fix``) writing ``writes[folder]`` bytes into each folder
    (what a folder's files hold already counts as written: a store continued) where their
    disk (the first folder's) has less free."""
    need = sum(max(0, nbytes - _held(Path(folder))) for folder, nbytes in writes.items())
    first = Path(next(iter(writes)))
    existing = next(p for p in (first, *first.parents) if p.exists())
    free = shutil.disk_usage(existing).free
    if need > free:
        raise StoreError(
            f"{first if len(writes) == 1 else first.parent} needs about {memory_text(need)} "
            f"more disk space, but its disk has {memory_text(free)} free; {fix}"
        )


def memory_text(n_bytes: float) -> str:
    """``1.25 GiB`` (or TiB, PiB above), ``40.0 MiB`` below one GiB, down to bytes."""
    units = ("bytes", "KiB", "MiB", "GiB", "TiB", "PiB")
    power = 0
    while power + 1 < len(units) and abs(n_bytes) >= 1024 ** (power + 1):
        power += 1
    digits = 2 if power >= 3 else 1
    return f"{n_bytes / 1024**power:.{digits}f} {units[power]}" if power else f"{n_bytes:.0f} bytes"


def _held(folder: Path) -> int:
    """Bytes in the files directly in ``folder`` (0 if there is none; a file renamed or
    removed meanwhile, by a writer there, counts 0)."""
    total = 0
    for f in folder.iterdir() if folder.is_dir() else ():
        with contextlib.suppress(OSError):
            total += f.stat().st_size if f.is_file() else 0
    return total
