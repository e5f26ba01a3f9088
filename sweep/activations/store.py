"""Chunk store: a folder of fixed-size ``.npy`` chunk files plus ``manifest.json``.

Layout::

    store/
      manifest.json          # width, dtype, rows_per_chunk, total_rows, chunks, stats, provenance
      chunk_00000.npy        # (rows, width) in the store dtype (bfloat16 is stored as uint16)
      chunk_00000.json       # that chunk's rows and running sums (for stats, merging, resume)
      ground_truth.safetensors   # synthetic stores only: the true feature directions

The manifest is written last, atomically: a folder without it is not a store. Chunks are
plain ``.npy`` so they can be memory-mapped by anything (numpy, torch, other tools).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import math
import weakref
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

from sweep.activations.layout import (
    FORMAT,
    FORMAT_VERSION,
    GROUND_TRUTH,
    MANIFEST,
    SYNTHETIC_PARAMS,
    VERIFIED,
    hook_stores,
)
from sweep.devices import BYTES, TENSOR_DTYPES, numpy_dtype, torch_dtype
from sweep.errors import StoreError, could_not_read, is_disk_full
from sweep.hostmem import HostBlock
from sweep.io import (
    NPY_DAMAGED,
    atomic_write,
    atomic_write_json,
    cpu_count,
    file_stamp,
    json_number,
    read_exact,
    unreadable,
)

log = logging.getLogger(__name__)


def chunk_name(index: int) -> str:
    return f"chunk_{index:05d}.npy"


def _to_numpy(x: torch.Tensor, dtype: str) -> np.ndarray:
    x = x.to(torch_dtype(dtype)).contiguous().cpu()
    return x.view(torch.uint16).numpy() if dtype == "bfloat16" else x.numpy()


def _from_numpy(a: np.ndarray, dtype: str) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(a))
    return t.view(torch.bfloat16) if dtype == "bfloat16" else t


_STATS_ELEMENTS = {"cpu": 1 << 21}  # elements per stats block; other devices: 1 << 26
_IO_BYTES = 1 << 22  # bytes hashed then written at a time (still in cache for the write)


def writer_threads() -> int:
    """Background write threads for a whole-store writer: one per four CPU cores, 1 to 4 (each
    hashes and writes roughly 1 GB/s of chunks; the other cores make the rows)."""
    return max(1, min(4, cpu_count() // 4))


def verify_threads() -> int:
    """Chunks verified at once: hashing (about 2 GB/s a core) bounds it, and numpy and hashlib
    release the GIL."""
    return max(2, min(8, cpu_count() // 2))


def chunk_stats(x: torch.Tensor) -> dict | None:
    """Stats of the stored rows ``x`` (n, d) (on any device): rows, per-column sum and sum of
    squares, sum of row norms; None if ``x`` holds NaN or inf. One pass in blocks: float16
    values squared in float32 (exact, and 65504 squared fits), float32 and bfloat16 ones in
    float64 (their squares can overflow float32); accumulated in float64."""
    n, d = x.shape
    total = torch.zeros(2, d, dtype=torch.float64, device=x.device)  # (2, d): sum, sum_sq
    norms = torch.zeros((), dtype=torch.float64, device=x.device)
    step = max(1, _STATS_ELEMENTS.get(x.device.type, 1 << 26) // max(d, 1))  # rows per block
    for block in x.split(step):
        b = block.float() if x.dtype == torch.float16 else block.double()  # (B, d)
        sq = b * b  # (B, d)
        total[0] += b.sum(0)
        total[1] += sq.sum(0)
        norms += sq.sum(1).sqrt_().sum(dtype=torch.float64)
    if not bool(total[1].isfinite().all()):  # x * x is inf or NaN wherever x is
        return None
    sums, sum_sq = total.tolist()
    return {"rows": n, "sum": sums, "sum_sq": sum_sq, "sum_norm": float(norms)}


def write_npy(f: BinaryIO, arr: np.ndarray) -> str:
    """Write ``arr`` to ``f`` byte for byte as ``np.save`` does (a version 1.0 header, then
    the data in C order), hashing each block before writing it; returns the sha256."""
    header = io.BytesIO()
    fmt = np.lib.format
    fmt.write_array_header_1_0(header, fmt.header_data_from_array_1_0(arr))
    digest = hashlib.sha256()
    for part in (header.getbuffer(), memoryview(arr.reshape(-1).view(np.uint8))):
        for at in range(0, len(part), _IO_BYTES):
            block = part[at : at + _IO_BYTES]
            digest.update(block)
            f.write(block)
    return digest.hexdigest()


class StoreWriter:
    """Writes chunks (each atomically: its ``.npy``, then its stats file), then the manifest.

    A chunk whose ``.npy`` and stats file are both on disk is complete: writers that resume
    skip it via :meth:`has_chunk`. Stats and the NaN/inf check run in :meth:`write_chunk`, on
    the rows' device. With ``threads > 0`` the hashing and writing run on that many background
    threads (at most ``threads + 1`` chunks waiting), so the caller makes the next chunk
    meanwhile; the rows handed over must then not be modified. A failed write is raised as a
    :class:`StoreError` by a later call; use the writer in a ``with`` block, which waits for
    every write and stops the threads.
    """

    def __init__(
        self, path: str | Path, width: int, dtype: str, rows_per_chunk: int, threads: int = 0
    ) -> None:
        if dtype not in TENSOR_DTYPES:
            raise StoreError(f"unknown store dtype {dtype!r}: use float32, float16 or bfloat16")
        self.path = Path(path)
        self.width, self.dtype, self.rows_per_chunk = width, dtype, rows_per_chunk
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise StoreError(f"cannot create store folder {self.path}: {err.strerror}") from err
        self.threads = threads
        self._pool = ThreadPoolExecutor(threads, "store-write") if threads > 0 else None
        self._pending: dict[int, Future] = {}  # chunk index -> its write, oldest first

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        if exc_type is None:
            self.close()
        elif self._pool is not None:  # an error is on its way: drop queued writes
            self._pool.shutdown(cancel_futures=True)
            self._pending.clear()

    def has_chunk(self, index: int) -> bool:
        """Whether chunk ``index`` and its stats are on disk (after its pending write, if any)."""
        if index in self._pending:
            self.wait()
        return (self.path / chunk_name(index)).exists() and (
            self.path / chunk_name(index)
        ).with_suffix(".json").exists()

    def write_chunk(self, index: int, rows: torch.Tensor) -> None:
        """Write chunk ``index`` (rows: (n, width), on any device); stats are taken from the
        stored values. NaN or inf rows are refused before anything is written."""
        if rows.ndim != 2 or rows.shape[1] != self.width:
            raise StoreError(
                f"chunk {index} has shape {tuple(rows.shape)}, expected (n, {self.width})"
            )
        stored = rows.to(torch_dtype(self.dtype)).contiguous()  # (n, d) on rows' device
        stats = chunk_stats(stored)
        if stats is None:
            raise StoreError(_not_finite(index, rows, self.dtype))
        arr = _to_numpy(stored, self.dtype)
        if self._pool is None:
            self._save(index, arr, stats)
            return
        self._collect(keep=self.threads)
        self._pending[index] = self._pool.submit(self._save, index, arr, stats)

    def wait(self) -> None:
        """Block until every write handed over is on disk; raise the first that failed."""
        self._collect(keep=0)

    def close(self) -> None:
        """Wait for every write (raising the first failure), then stop the threads."""
        try:
            self.wait()
        finally:
            if self._pool is not None:
                self._pool.shutdown(cancel_futures=True)

    def _collect(self, keep: int) -> None:
        """Retire finished writes, oldest first, waiting until at most ``keep`` are pending;
        if one failed, cancel or wait out the rest and raise its error."""
        while self._pending:
            index = next(iter(self._pending))
            if len(self._pending) <= keep and not self._pending[index].done():
                return
            error = self._pending.pop(index).exception()
            if error is not None:
                futures_wait([f for f in self._pending.values() if not f.cancel()])
                self._pending.clear()
                raise error

    def _save(self, index: int, arr: np.ndarray, stats: dict) -> None:
        """Write the chunk file, then its stats with the file's sha256 (each atomically)."""
        target = self.path / chunk_name(index)
        digest: list[str] = []
        try:
            atomic_write(target, lambda f: digest.append(write_npy(f, arr)))
            atomic_write_json(target.with_suffix(".json"), {**stats, "sha256": digest[0]})
        except OSError as err:
            fix = (
                "free space and re-run the same command: the chunks written are kept"
                if is_disk_full(err)
                else "check the disk, then re-run the same command"
            )
            raise StoreError(f"cannot write chunk {target}: {err.strerror or err}; {fix}") from err

    def finalize(self, n_chunks: int, provenance: dict) -> dict:
        """Wait for the pending writes, merge the chunks' stats into the manifest and write it
        (the store is then complete)."""
        self.wait()
        stats = [
            json.loads((self.path / chunk_name(i)).with_suffix(".json").read_text())
            for i in range(n_chunks)
        ]
        total = sum(s["rows"] for s in stats)
        mean = np.sum([s["sum"] for s in stats], axis=0) / total
        mean_sq = np.sum([s["sum_sq"] for s in stats], axis=0) / total
        manifest = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "width": self.width,
            "dtype": self.dtype,
            "rows_per_chunk": self.rows_per_chunk,
            "total_rows": int(total),
            "chunks": [_chunk_entry(i, s) for i, s in enumerate(stats)],
            "stats": {
                "mean": mean.tolist(),
                "std": np.sqrt(np.maximum(mean_sq - mean**2, 0.0)).tolist(),
                "mean_row_norm": sum(s["sum_norm"] for s in stats) / total,
                "mean_sq_row_norm": float(mean_sq.sum()),
            },
            "provenance": provenance,
        }
        atomic_write_json(self.path / MANIFEST, manifest)
        return manifest


def _chunk_entry(index: int, stats: dict) -> dict:
    entry = {"file": chunk_name(index), "rows": stats["rows"]}
    if "sha256" in stats:  # stores written before chunk checksums have none
        entry["sha256"] = stats["sha256"]
    return entry


EXPONENT_BITS = {
    "float16": (np.uint16, 0x7C00),
    "bfloat16": (np.uint16, 0x7F80),
    "float32": (np.uint32, 0x7F800000),
}
"""Per store dtype, the bits of a value and its exponent mask: all ones = inf or NaN."""
VERIFY_BLOCK = 1 << 25  # bytes read, hashed and scanned at a time (a multiple of 4)


def reject_nonfinite(x: torch.Tensor, path: Path) -> None:
    """Raise a one-line :class:`StoreError` if ``x`` (rows read from ``path``) holds NaN/inf.
    Its extremes say so (NaN propagates into both, an infinity is one): one pass, no (rows, d)
    bool temporary, 17x faster than ``isfinite(x).all()`` on the CPU."""
    if x.numel() == 0:
        return
    lo, hi = torch.aminmax(x)
    if not bool(torch.isfinite(lo) & torch.isfinite(hi)):
        raise nonfinite_error(path)


def nonfinite_error(path: Path) -> StoreError:
    return StoreError(f"chunk {path} contains NaN or inf values; regenerate or repair the store")


def manifest_problem(m: dict) -> str | None:
    """What makes a parsed manifest unusable (fields missing or of the wrong kind, rows that
    do not add up), or None."""
    least = {"width": 1, "total_rows": 0}
    bad = [k for k, low in least.items() if not _whole(m.get(k)) or m[k] < low]
    if bad:
        return f"{bad[0]} is {m.get(bad[0])!r}, not a count"
    if m.get("dtype") not in TENSOR_DTYPES:
        return f"dtype is {m.get('dtype')!r}, not one of {', '.join(TENSOR_DTYPES)}"
    chunks = m.get("chunks")
    if not isinstance(chunks, list) or not all(_chunk_entry_ok(c) for c in chunks):
        return "its chunk list is not a list of {file, rows} entries"
    if sum(c["rows"] for c in chunks) != m["total_rows"]:
        return f"total_rows {m['total_rows']} is not the sum of its chunks' rows"
    stats, provenance = m.get("stats"), m.get("provenance", {})
    if not isinstance(stats, dict) or not json_number(stats.get("mean_row_norm")):
        return "its stats have no mean_row_norm"
    mean = stats.get("mean")
    if not isinstance(mean, list) or len(mean) != m["width"] or not all(map(json_number, mean)):
        return f"its stats' mean is not {m['width']} numbers"
    return None if isinstance(provenance, dict) else "its provenance is not a mapping"


def _whole(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _chunk_entry_ok(c: object) -> bool:
    return (
        isinstance(c, dict)
        and isinstance(c.get("file"), str)
        and _whole(c.get("rows"))
        and c["rows"] >= 0
    )


def _no_manifest(path: Path) -> str:
    """Why a folder without a manifest is no store, and what to point at instead."""
    stores = list(hook_stores(path).values())
    if stores:  # (the folder of a harvest of several hooks: one store per hook inside)
        some = ", ".join(str(p) for p in stores[:3]) + (", ..." if len(stores) > 3 else "")
        return (
            f"no chunk store at {path}: it holds a harvest of {len(stores)} hooks, one store "
            f"each; point data.path at one of them ({some})"
        )
    return (
        f"no chunk store at {path}: {MANIFEST} is missing (incomplete or not a store); "
        "regenerate it or point data.path at a complete store"
    )


class ChunkStore:
    """A complete chunk store on disk, validated on open (``check_files=False``: its manifest
    only, for :meth:`damaged_chunks`)."""

    def __init__(self, path: str | Path, check_files: bool = True) -> None:
        self.path = Path(path)
        manifest_path = self.path / MANIFEST
        if not self.path.is_dir():
            what = "it is a file" if self.path.exists() else "folder does not exist"
            raise StoreError(
                f"no chunk store at {self.path}: {what}; "
                "check data.path or generate one with data=synthetic / sweep harvest"
            )
        if not manifest_path.is_file():
            raise StoreError(_no_manifest(self.path))
        try:
            self.manifest = json.loads(manifest_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise StoreError(
                f"chunk store manifest {manifest_path} is corrupt ({err}); regenerate the store"
            ) from err
        if not isinstance(self.manifest, dict) or self.manifest.get("format") != FORMAT:
            sweep = isinstance(self.manifest, dict) and "runs" in self.manifest  # a sweep's
            raise StoreError(
                f"{self.path} is a sweep folder, not a chunk store; point data.path at its "
                "store (its store/ folder, or the data.path its config.yaml names)"
                if sweep
                else f"{manifest_path} is not a sweep chunk store manifest; point data.path at "
                "a chunk store (made by data=synthetic or sweep harvest)"
            )
        problem = manifest_problem(self.manifest)
        if problem:
            raise StoreError(
                f"chunk store manifest {manifest_path} is damaged or was edited ({problem}); "
                "regenerate the store"
            )
        self._held: dict[str, list[int]] | None = None
        """Each chunk file's :meth:`_stat` once :meth:`hold` verified them."""
        self.width: int = int(self.manifest["width"])
        self.dtype: str = self.manifest["dtype"]
        self.chunks: list[dict] = self.manifest["chunks"]
        self.total_rows: int = int(self.manifest["total_rows"])
        if self.total_rows == 0 or not self.chunks:
            raise StoreError(
                f"chunk store {self.path} is empty (0 rows); regenerate it with rows > 0"
            )
        stats = self.manifest["stats"]
        if not all(math.isfinite(v) for v in [stats["mean_row_norm"], *stats["mean"]]):
            raise StoreError(
                f"chunk store {self.path} has non-finite statistics (NaN in its data); regenerate it"
            )
        for i in range(len(self.chunks)) if check_files else ():
            self._check_file(i)

    def damaged_chunks(self) -> dict[int, str]:
        """Chunks missing, truncated or of the wrong shape (not hashed): index -> the problem.
        A chunk that cannot be read (EIO, ENOMEM, permissions) is not known to be damaged:
        that error is raised."""
        out = {}
        for i in range(len(self.chunks)):
            try:
                self._check_file(i)
            except StoreError as err:
                if isinstance(err.__cause__, OSError):
                    raise
                out[i] = str(err)
        return out

    @property
    def provenance(self) -> dict:
        return self.manifest.get("provenance", {})

    @property
    def identity(self) -> str:
        """A content hash of the manifest (which lists every chunk's sha256) but the ground
        truth's checksum: the same store, wherever it lies, has the same identity; another
        store (another layer, seed, size) not."""
        return manifest_hash(_without(self.manifest, SIDE_CHECKSUMS[:1]))

    @property
    def identities(self) -> set[str]:
        """:attr:`identity`, and what a version before the LM-eval tokens' checksum recorded
        of this store (a harvest made again since has it)."""
        return {self.identity, manifest_hash(_without(self.manifest, SIDE_CHECKSUMS))}

    def facts(self) -> dict:
        """What a sweep records about the store it trains on (and names when it differs)."""
        return {
            "path": str(self.path),
            "id": self.identity,
            "width": self.width,
            "dtype": self.dtype,
            "total_rows": self.total_rows,
            "source": self.provenance.get("source_info") or self.provenance.get("params", {}),
        }

    def _check_file(self, index: int) -> None:
        info = self.chunks[index]
        f = self.path / info["file"]
        if not f.is_file():
            raise StoreError(f"chunk store {self.path}: {info['file']} is missing; {self._repair}")
        try:
            arr = np.load(f, mmap_mode="r", allow_pickle=False)
        except (*NPY_DAMAGED, OSError) as err:
            raise self._unread(f, err, "chunk {f} is truncated or corrupt") from err
        if arr.shape != (info["rows"], self.width) or arr.dtype != numpy_dtype(self.dtype):
            raise StoreError(
                f"chunk {f} has shape {arr.shape} {arr.dtype}, manifest says "
                f"({info['rows']}, {self.width}) {self.dtype}; the store is damaged, {self._repair}"
            )
        if not arr.flags.c_contiguous:  # read_into copies raw bytes as rows
            raise StoreError(
                f"chunk {f} is stored column-major (Fortran order); save it row-major "
                "(np.save(path, np.ascontiguousarray(a))) or regenerate the store"
            )

    @property
    def _repair(self) -> str:
        """How a lost chunk comes back: a harvest re-run writes just the lost ones again."""
        if self.provenance.get("source") == "harvest":
            return "re-run the 'sweep harvest' command that made it (it harvests lost chunks again)"
        if self.provenance.get("source") == "synthetic":
            return (  # (true also of a sweep that reads it with data=chunks: it makes nothing)
                f"delete {self.path} and re-run the sweep that made it (data=synthetic with the "
                f"settings in its {SYNTHETIC_PARAMS}): it is made again from its seed"
            )
        return "regenerate the store"

    def _unread(self, f: Path, err: Exception, damaged: str) -> StoreError:
        """A store file that failed to load: ``damaged`` (its words, ``{f}`` the file) and the
        repair, unless an I/O error kept it from being read, which proves nothing about it."""
        if unreadable(err):
            return StoreError(f"{could_not_read(f, err)} (were it lost: {self._repair})")
        return StoreError(f"{damaged.format(f=f)} ({err}); {self._repair}")

    @property
    def _changed_repair(self) -> str:
        """How a chunk changed since it was written comes back (a harvest writes a lost chunk
        again: this one, once deleted)."""
        harvested = self.provenance.get("source") == "harvest"
        return f"delete it and {self._repair}" if harvested else self._repair

    def scale(self, normalize: bool) -> float:
        """The constant that makes the mean row norm sqrt(width) (1.0 when not normalising)."""
        if not normalize:
            return 1.0
        norm = float(self.manifest["stats"]["mean_row_norm"])
        if norm <= 0:
            raise StoreError(
                f"chunk store {self.path} has mean row norm 0; cannot normalise (data.normalize=false)"
            )
        return math.sqrt(self.width) / norm

    def read_rows(
        self,
        index: int,
        start: int = 0,
        stop: int | None = None,
        order: np.ndarray | None = None,
        check: bool = True,
    ) -> torch.Tensor:
        """Rows ``[start, stop)`` of chunk ``index`` as a new tensor in the store dtype, taken in
        ``order`` (indices into that range) when given; ``check`` rejects NaN/inf."""
        f = self.path / self.chunks[index]["file"]
        try:
            arr = np.load(f, mmap_mode="r", allow_pickle=False)[start:stop]
            x = _from_numpy(arr[order] if order is not None else np.array(arr), self.dtype)
        except (*NPY_DAMAGED, OSError) as err:
            raise self._unread(f, err, "chunk {f} is truncated or corrupt") from err
        self._still_held(index)
        if check:
            reject_nonfinite(x, f)
        return x

    def staged_bytes(self) -> int:
        """Device memory of the batch stream on a GPU: two chunks (the one training and the
        next, copied ahead) and their row orders (int64)."""
        return staged_bytes(max(int(c["rows"]) for c in self.chunks), self.width, self.dtype)

    def read_into(self, index: int, out: torch.Tensor) -> torch.Tensor:
        """The first ``len(out)`` rows of chunk ``index``, read from the file straight into
        ``out`` (a contiguous CPU tensor of the store dtype, e.g. a pinned staging buffer):
        one copy, no intermediate array, split across threads (:func:`sweep.io.read_exact`:
        12M rows/s at width 512 fp16 from the page cache on 2 cores, against 6M for one
        reader). Returns ``out``."""
        f = self.path / self.chunks[index]["file"]
        try:
            offset = np.load(f, mmap_mode="r", allow_pickle=False).offset
            view = out.view(torch.uint16) if self.dtype == "bfloat16" else out
            buf = memoryview(view.numpy()).cast("B")
            got = read_exact(f, offset, buf)  # split across threads when large
        except (*NPY_DAMAGED, OSError) as err:
            raise self._unread(f, err, "chunk {f} is truncated or corrupt") from err
        if got != len(buf):
            raise StoreError(f"chunk {f} is truncated; {self._repair}")
        self._still_held(index)
        return out

    def hold(self, elsewhere: Path | None = None) -> None:
        """:meth:`verify` (remembered: nothing read again; one changed since is hashed and
        refused), then check every read of a chunk whose file changed from before it (size,
        times or inode): hashed again, it is refused unless its bytes are the same (a store
        rewritten or replaced while a sweep trains on it; a ``touch`` or ``chmod`` is not)."""
        held = {c["file"]: self._stat(c["file"]) for c in self.chunks}  # (before: no gap)
        self.verify(elsewhere)
        self._held = held

    def _still_held(self, index: int) -> None:
        """After a read of chunk ``index``: its file is as :meth:`hold` found it, or its
        bytes are still those the manifest hashed."""
        name = self.chunks[index]["file"]
        if self._held is None:
            return
        with contextlib.suppress(OSError):  # (gone: the hash below says so)
            if self._stat(name) == self._held[name]:
                return
        try:
            stat = self._stat(name)
            self._verify_chunk(index)
        except StoreError as err:  # (its runs go on from the checkpoints made before)
            if unreadable(err.__cause__):  # (not read: nothing is known to have changed)
                raise
            raise StoreError(f"{err} (it changed while this sweep trained on it)") from err
        except OSError as err:
            raise self._unread(self.path / name, err, "chunk {f} is lost") from err
        log.info("chunk %s: its file changed, its bytes did not; reading on", self.path / name)
        self._held[name] = stat

    def _signature(self) -> dict:
        """What a verification is remembered by: the manifest (which records every chunk's
        sha256) and each chunk file's :meth:`_stat`. (A ``verified.json`` of an earlier form
        reads as unverified: such a store is verified once again.)"""
        chunks = [[c["file"], *self._stat(c["file"])] for c in self.chunks]
        return {"manifest": self.identity, "chunks": chunks}

    def is_verified(self, elsewhere: Path | None = None) -> bool:
        """Whether :meth:`verify` passed on this manifest and these exact chunk files
        (:meth:`_stat` unchanged), as remembered in the store or in ``elsewhere``."""
        markers = (self.path / VERIFIED, elsewhere)
        recorded = [_read_marker(m) for m in markers if m is not None]
        if all(r is None for r in recorded):
            return False
        try:
            return self._signature() in recorded
        except OSError:  # (a chunk gone since the store was opened: verify says which)
            return False

    def verify(self, elsewhere: Path | None = None) -> None:
        """Read every chunk once, check its sha256 and reject non-finite values (before any
        training); a synthetic store's ground truth must be there and unchanged too.

        A successful check is remembered in ``verified.json`` (keyed by the manifest and each
        chunk file's size, mtime, ctime and inode), so a store is scanned once, not on every
        run (a copy of it, once more); in the file ``elsewhere`` (a sweep's own) where the
        store cannot be written (a read-only shared store).
        """
        self.check_ground_truth()  # (small: checked on every run, never remembered)
        if self.is_verified(elsewhere):
            return
        signature = self._signature()
        with ThreadPoolExecutor(verify_threads(), thread_name_prefix="verify") as pool:
            for _ in pool.map(self._verify_chunk, range(len(self.chunks))):
                pass  # the first failing chunk (in store order) raises here
        for marker in (self.path / VERIFIED, elsewhere):
            if marker is not None and _remembered(marker, signature):
                return
        log.debug("store %s is read-only; verification not remembered", self.path)

    def _verify_chunk(self, index: int) -> None:
        """One read of chunk ``index``'s file: its sha256 checked, then NaN/inf rejected. The
        scan tests exponent bits (all ones: inf or NaN), 5 GB/s on raw fp16 where
        ``isfinite`` ran at 0.7; hashing and numpy release the GIL, so chunks go in parallel."""
        info = self.chunks[index]
        f = self.path / info["file"]
        bits, mask = EXPONENT_BITS[self.dtype]
        digest, nonfinite = hashlib.sha256(), False
        try:
            with open(f, "rb") as fh:
                digest.update(fh.read(np.load(f, mmap_mode="r", allow_pickle=False).offset))
                while block := fh.read(VERIFY_BLOCK):
                    digest.update(block)
                    if not nonfinite and len(block) % np.dtype(bits).itemsize == 0:
                        nonfinite = int((np.frombuffer(block, bits) & mask).max()) == mask
        except (*NPY_DAMAGED, OSError) as err:
            raise self._unread(f, err, "chunk {f} is truncated or corrupt") from err
        # the checksum first: a NaN in a chunk changed since it was written is that change
        if "sha256" in info and digest.hexdigest() != info["sha256"]:
            raise StoreError(
                f"chunk {f} fails its checksum (it changed after the store was written); "
                f"{self._changed_repair}"
            )
        if nonfinite:
            raise nonfinite_error(f)

    def _stat(self, name: str) -> list[int]:
        """What tells a chunk file's bytes may have changed (:func:`sweep.io.file_stamp`)."""
        return file_stamp(self.path / name)

    def chunk_offsets(self) -> list[int]:
        offsets, at = [], 0
        for c in self.chunks:
            offsets.append(at)
            at += int(c["rows"])
        return offsets

    def tail_rows(self, n: int) -> torch.Tensor:
        """The last ``n`` rows of the store (the held-out evaluation window)."""
        n = min(n, self.total_rows)
        parts, need = [], n
        for index in reversed(range(len(self.chunks))):
            rows = int(self.chunks[index]["rows"])
            take = min(need, rows)
            parts.append(self.read_rows(index, rows - take, rows))
            need -= take
            if need == 0:
                break
        return torch.cat(parts[::-1])

    def check_ground_truth(self) -> None:
        """A synthetic store's ground truth is there and unchanged (:class:`StoreError`
        naming the repair if not)."""
        self._ground_truth_bytes()

    def ground_truth(self) -> torch.Tensor | None:
        """(n_features, width) true feature directions of a synthetic store, else None; a
        synthetic store's that is missing or fails its checksum is a :class:`StoreError`."""
        from safetensors.torch import load

        data = self._ground_truth_bytes()
        return None if data is None else load(data)["features"]

    def _ground_truth_bytes(self) -> bytes | None:
        """The ground truth file's bytes (None: there is none, and this is no synthetic
        store); a synthetic store's missing, or changed from the sha256 its manifest records,
        is a :class:`StoreError` naming the repair."""
        f, synthetic = self.path / GROUND_TRUTH, self.provenance.get("source") == "synthetic"
        if not f.is_file():
            if synthetic:
                raise StoreError(f"{f} is missing; {self._repair}")
            return None
        try:
            data = f.read_bytes()
        except OSError as err:
            raise self._unread(f, err, "{f} is lost") from err
        want = self.provenance.get("ground_truth_sha256")
        if synthetic and want is not None and hashlib.sha256(data).hexdigest() != want:
            raise StoreError(
                f"{f} fails its checksum (it changed after the store was written); {self._repair}"
            )
        return data


SIDE_CHECKSUMS = (("provenance", "ground_truth_sha256"), ("provenance", "lm_eval", "sha256"))
"""Where a manifest records the sha256 of a side file (the ground truth, the LM-eval tokens),
which versions before them did not: a store made again by one that does is the store a sweep
recorded before (the ground truth's is never part of the identity; the LM-eval tokens' is,
as it was since it was recorded, and an identity without it is accepted too)."""


def _without(manifest: dict, keys: tuple[tuple[str, ...], ...]) -> dict:
    """``manifest`` without the nested ``keys``."""
    out = json.loads(json.dumps(manifest))  # (a deep copy)
    for *parents, key in keys:
        holder = out
        for name in parents:
            holder = holder.get(name) if isinstance(holder, dict) else None
        if isinstance(holder, dict):
            holder.pop(key, None)
    return out


def manifest_hash(manifest: dict) -> str:
    text = json.dumps(manifest, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:32]


@dataclass(frozen=True)
class Cursor:
    """Where the data stream is: the next batch to train is ``batch`` of the ``chunk``-th
    chunk (in this epoch's order) of ``epoch``."""

    epoch: int = 0
    chunk: int = 0
    batch: int = 0

    def as_dict(self) -> dict:
        return {"epoch": self.epoch, "chunk": self.chunk, "batch": self.batch}


def _not_finite(index: int, rows: torch.Tensor, dtype: str) -> str:
    """Why chunk ``index`` cannot be stored: NaN or inf in ``rows``, or finite values beyond
    the store dtype's range (they would be stored as inf)."""
    if not bool(torch.isfinite(rows).all()):
        return f"chunk {index} contains NaN or inf values; refusing to write it"
    top = torch.finfo(torch_dtype(dtype)).max
    fix = "write a float32 or bfloat16 store instead" if dtype == "float16" else "scale them down"
    return (
        f"chunk {index} holds values beyond {dtype}'s largest value {top:g} (up to "
        f"{float(rows.abs().amax()):.4g}); {fix}"
    )


def train_rows(store: ChunkStore, eval_rows: int) -> list[int]:
    """Rows of each chunk that may be trained on (the last ``eval_rows`` of the store are not)."""
    return rows_to_train([int(c["rows"]) for c in store.chunks], eval_rows)


def rows_to_train(chunk_rows: list[int], eval_rows: int) -> list[int]:
    """:func:`train_rows` of chunks of ``chunk_rows`` rows (a store not made yet, too)."""
    limit, out, off = sum(chunk_rows) - eval_rows, [], 0
    for rows in chunk_rows:
        out.append(max(0, min(rows, limit - off)))
        off += rows
    return out


def batches_per_chunk(store: ChunkStore, batch_size: int, eval_rows: int) -> list[int]:
    """Full training batches in each chunk (raises StoreError when nothing is left to train on)."""
    if store.total_rows - eval_rows < batch_size:
        raise StoreError(
            f"chunk store {store.path} has {store.total_rows} rows; after holding out "
            f"data.eval_rows={eval_rows} fewer than one batch (train.batch_size={batch_size}) is "
            "left; lower data.eval_rows or train.batch_size, or use a store with more rows"
        )
    per_chunk = [r // batch_size for r in train_rows(store, eval_rows)]
    if sum(per_chunk) == 0:
        raise StoreError(
            f"no chunk of {store.path} holds a full batch of {batch_size} rows; "
            "lower train.batch_size or regenerate the store with more rows per chunk"
        )
    return per_chunk


def staged_bytes(chunk_rows: int, width: int, dtype: str) -> int:
    """Device memory of a batch stream on a GPU: two chunks (the one training and the next,
    copied ahead) and their row orders (int64)."""
    return 2 * chunk_rows * (width * BYTES[dtype] + 8)


def total_steps(store: ChunkStore, batch_size: int, epochs: int, eval_rows: int) -> int:
    """Steps of a whole training run on ``store`` (what :class:`BatchStream` will yield)."""
    return sum(batches_per_chunk(store, batch_size, eval_rows)) * epochs


def planned_steps(chunk_rows: list[int], batch_size: int, epochs: int, eval_rows: int) -> int:
    """:func:`total_steps` of a store of chunks of ``chunk_rows`` rows, not made yet (0 where
    no batch is left: the run refuses it)."""
    return sum(r // batch_size for r in rows_to_train(chunk_rows, eval_rows)) * epochs


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence(list(parts)).generate_state(1, dtype=np.uint64)[0] >> 1)


def _read_marker(marker: Path) -> object:
    """A remembered verification's signature (None: none can be read)."""
    try:
        return json.loads(marker.read_text())
    except (OSError, ValueError):
        return None


def _remembered(marker: Path, signature: dict) -> bool:
    """Write a passed verification's signature to ``marker``; False where it cannot be."""
    try:
        atomic_write_json(marker, signature)
    except OSError:
        return False
    return True


class BatchStream:
    """Shuffled batches from a store, identical for every run and resume with the same seed.

    Chunk order per epoch and row order within each chunk come from numpy generators seeded
    by ``(seed, epoch)`` and ``(seed, epoch, chunk)``. Batches never cross a chunk boundary;
    the remainder of a chunk smaller than one batch is skipped. The last ``eval_rows`` rows of
    the store are never trained on. The next chunk is read in a background thread while the
    current one trains.

    On CPU that thread also applies the row order (a gather from the memory-mapped file). On
    a GPU (``on_device``) it reads the chunk in file order into a reused pinned buffer, makes
    ONE host-to-device copy of it (and of its row order) on a side stream, and every batch is
    gathered and scaled on the device: no per-batch host work. Both give the same batches,
    bit for bit.
    """

    def __init__(
        self,
        store: ChunkStore,
        batch_size: int,
        seed: int,
        epochs: int,
        eval_rows: int,
        scale: float = 1.0,
        device: torch.device | str = "cpu",
        on_device: bool | None = None,
        verified_at: Path | None = None,
    ) -> None:
        self.store, self.batch_size, self.seed, self.epochs = store, batch_size, seed, epochs
        self.scale, self.device = scale, torch.device(device)
        self.on_device = self.device.type != "cpu" if on_device is None else on_device
        """Stage whole chunks on the device and gather batches there (default: off the CPU)."""
        self._staging = _Staging(store, self.device) if self.on_device else None
        self._orders: dict[int, list[int]] = {}
        self.check_finite = not store.is_verified(verified_at)
        """Scan each chunk read for NaN/inf (a verified store was scanned already; a read-only
        one's verification is remembered at ``verified_at``, the sweep's)."""
        self.batches_per_chunk = batches_per_chunk(store, batch_size, eval_rows)
        self.train_rows = train_rows(store, eval_rows)

    @property
    def steps_per_epoch(self) -> int:
        return sum(self.batches_per_chunk)

    def release(self) -> None:
        """Free the staged chunks' device buffers (after training; a new pass makes them again)."""
        if self._staging is not None:
            self._staging.release()

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.epochs

    def order(self, epoch: int) -> list[int]:
        """Chunk indices in this epoch's order (chunks without a full batch dropped)."""
        if epoch not in self._orders:
            perm = (
                np.random.default_rng(_seed(self.seed, 0, epoch))
                .permutation(len(self.store.chunks))
                .tolist()
            )
            self._orders[epoch] = [i for i in perm if self.batches_per_chunk[i] > 0]
        return self._orders[epoch]

    def _row_order(self, epoch: int, index: int) -> np.ndarray:
        # numpy, not torch.randperm: a torch op here would start a second OpenMP team in this
        # thread whose spinning workers steal the training threads' cores (scripts/bench.py)
        rows = self.train_rows[index]
        return np.random.default_rng(_seed(self.seed, 1, epoch, index)).permutation(rows)

    def _load(
        self, epoch: int, index: int, released: object = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Chunk ``index`` for ``epoch`` (runs in the prefetch thread): its rows shuffled, or,
        on the device, its rows in file order and the order to take them in (``released``:
        a CUDA event after which the buffer it is copied into is free)."""
        order = self._row_order(epoch, index)
        if self._staging is not None:
            return self._staging.load(index, order, self.check_finite, released)
        x = self.store.read_rows(index, 0, len(order), order=order, check=self.check_finite)
        if self.device.type == "cuda":
            x = x.pin_memory()
        return x, None  # (rows, d) shuffled

    def batches(self, start: Cursor) -> Iterator[tuple[Cursor, torch.Tensor]]:
        """Yield ``(cursor_after, x)`` from ``start`` to the end; ``x``: (B, d) float32 on device."""
        plan = [
            (e, pos, i)
            for e in range(start.epoch, self.epochs)
            for pos, i in enumerate(self.order(e))
        ]
        plan = [p for p in plan if (p[0], p[1]) >= (start.epoch, start.chunk)]
        # the training stream, taken on this (the consuming) thread: the prefetch thread does
        # not see a stream the caller made current
        consumer = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
        if self._staging is not None:
            self._staging.restart()
        try:
            yield from self._pass(plan, start, consumer)
        finally:
            if self._staging is not None:
                self._staging.active = False

    def _pass(
        self, plan: list[tuple[int, int, int]], start: Cursor, consumer: object
    ) -> Iterator[tuple[Cursor, torch.Tensor]]:
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="chunk-prefetch") as pool:
            loads = [(epoch, index) for epoch, _, index in plan]  # what each chunk load needs
            pending = pool.submit(self._load, *loads[0], _mark(consumer)) if plan else None
            for k, (epoch, pos, index) in enumerate(plan):
                chunk, order = pending.result()  # type: ignore[union-attr]
                if k + 1 < len(plan):  # into the buffer of chunk k-1, all of whose batches
                    # are queued: the copy waits for them on the device (the mark)
                    pending = pool.submit(self._load, *loads[k + 1], _mark(consumer))
                first = start.batch if (epoch, pos) == (start.epoch, start.chunk) else 0
                for b in range(first, self.batches_per_chunk[index]):
                    yield self._next(Cursor(epoch, pos, b)), self._batch(chunk, order, b)

    def _batch(self, chunk: torch.Tensor, order: torch.Tensor | None, b: int) -> torch.Tensor:
        """Batch ``b`` of a loaded chunk: (B, d) float32 on the device, scaled."""
        at = slice(b * self.batch_size, (b + 1) * self.batch_size)
        if order is None:
            x = chunk[at].to(self.device, non_blocking=True)  # (B, d), already shuffled
        else:
            x = chunk.index_select(0, order[at])  # (B, d) gathered on the device
        return x.float() * self.scale

    def _next(self, at: Cursor) -> Cursor:
        """The cursor after the batch at ``at``."""
        index = self.order(at.epoch)[at.chunk]
        if at.batch + 1 < self.batches_per_chunk[index]:
            return Cursor(at.epoch, at.chunk, at.batch + 1)
        if at.chunk + 1 < sum(1 for n in self.batches_per_chunk if n > 0):
            return Cursor(at.epoch, at.chunk + 1, 0)
        return Cursor(at.epoch + 1, 0, 0)


def _mark(stream: object) -> object:
    """A CUDA event recorded now on ``stream`` (None off CUDA)."""
    if stream is None:
        return None
    event = torch.cuda.Event()
    event.record(stream)  # type: ignore[arg-type]
    return event


class _Staging:
    """Whole chunks to the device, into two device buffers used in turn (sized for the
    largest chunk; exactly the two chunks :meth:`ChunkStore.staged_bytes` counts): one read
    from the file into a reused page-locked host buffer, one host-to-device copy on a side
    stream that first waits until the training stream is done with the buffer's previous
    chunk, waited for in the prefetch thread (so the host buffer is free again and the chunk
    complete on return)."""

    def __init__(self, store: ChunkStore, device: torch.device) -> None:
        self.store, self.device = store, device
        self.cuda = device.type == "cuda"
        self.rows = max(int(c["rows"]) for c in store.chunks)
        self._host: HostBlock | None = None
        self._slots: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._next, self.active = 0, False
        self._stream = torch.cuda.Stream(device) if self.cuda else None
        self.dtype = torch_dtype(store.dtype)

    def restart(self) -> None:
        """A new pass over the store: it loads into the first buffer first. Runs on the
        consuming thread, so the device buffers (made on first use) come from the training
        stream's memory before the first load's mark: a block that stream freed with kernels
        still queued is only written once they ran."""
        if self.active:
            raise RuntimeError("a BatchStream on a device serves one pass at a time")
        self._next, self.active = 0, True
        while len(self._slots) < 2:
            self._slots.append(
                (
                    torch.empty(self.rows, self.store.width, dtype=self.dtype, device=self.device),
                    torch.empty(self.rows, dtype=torch.int64, device=self.device),
                )
            )

    def release(self) -> None:
        self._slots.clear()

    def _host_rows(self, rows: int) -> torch.Tensor:
        n = self.rows * self.store.width * self.dtype.itemsize
        if self._host is None:
            self._host = HostBlock(n, self.cuda, "staging chunks")
            weakref.finalize(self, self._host.release)  # unlocked before it is freed
        return self._host.data[:n].view(self.dtype).view(self.rows, self.store.width)[:rows]

    def _slot(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next device buffer in turn: (rows, d) in the store dtype and (rows,) int64."""
        slot = self._slots[self._next]
        self._next = 1 - self._next
        return slot

    def load(
        self, index: int, order: np.ndarray, check: bool, released: object = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Chunk ``index``'s first ``len(order)`` rows (file order) and ``order``, on the device
        (``released``: a CUDA event after which the buffer is no longer read)."""
        n = len(order)
        host = self.store.read_into(index, self._host_rows(n))  # (rows, d)
        dev_rows, dev_idx = self._slot()
        rows, idx = dev_rows[:n], dev_idx[:n]
        if not self.cuda:
            rows.copy_(host)
            idx.copy_(torch.from_numpy(order))
            return self._checked(rows, index, check), idx
        with torch.cuda.stream(self._stream):
            if released is not None:
                self._stream.wait_event(released)  # type: ignore[union-attr, arg-type]
            rows.copy_(host, non_blocking=True)
            idx.copy_(torch.from_numpy(order), non_blocking=True)
            self._checked(rows, index, check)  # on the side stream (a sync: this thread)
            done = torch.cuda.Event()
            done.record(self._stream)
        done.synchronize()
        return rows, idx

    def _checked(self, rows: torch.Tensor, index: int, check: bool) -> torch.Tensor:
        if check:
            reject_nonfinite(rows, self.store.path / self.store.chunks[index]["file"])
        return rows
