"""The batch stream's device path (issue 9): whole chunks staged on the device, batches gathered
there, gives the same batches as the host path bit for bit, for every store dtype and resume
point; a short chunk file is one line."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sweep.activations.store import BatchStream, ChunkStore, Cursor
from sweep.activations.synthetic import ensure_synthetic_store
from sweep.errors import StoreError
from tests.conftest import tiny_data


@pytest.fixture(scope="module", params=["float32", "float16", "bfloat16"])
def store(request, tmp_path_factory) -> ChunkStore:
    path = tmp_path_factory.mktemp("stream") / request.param
    return ensure_synthetic_store(tiny_data(dtype=request.param, rows=10_000), path)


def stream(store: ChunkStore, on_device: bool) -> BatchStream:
    return BatchStream(store, 256, seed=7, epochs=2, eval_rows=1024, scale=1.7, on_device=on_device)


def test_device_path_gives_the_same_batches(store):
    host, device = stream(store, False), stream(store, True)
    assert device._staging is not None and host._staging is None
    want = list(host.batches(Cursor()))
    got = list(device.batches(Cursor()))
    assert [c for c, _ in got] == [c for c, _ in want]
    assert all(
        torch.equal(a, b) and a.dtype == torch.float32
        for (_, a), (_, b) in zip(got, want, strict=True)
    )
    for k in (1, 16, 30, len(want) - 1):  # resumed from the cursor after batch k
        rest = [x for _, x in device.batches(want[k - 1][0])]
        assert all(torch.equal(a, b) for a, (_, b) in zip(rest, want[k:], strict=True))


def test_read_into_reads_the_chunk_in_file_order(store):
    out = torch.empty(1000, store.width, dtype=store.read_rows(0, 0, 1).dtype)
    store.read_into(0, out)
    assert torch.equal(out, store.read_rows(0, 0, 1000))


def test_a_read_split_across_threads_equals_one_read(store, tmp_path, monkeypatch):
    """``read_exact`` in parts of odd sizes gives the same bytes; a file that ends early is
    reported short whichever part runs out."""
    from sweep import io

    f = tmp_path / "blob"
    data = np.random.default_rng(0).integers(0, 256, 100_003, dtype=np.uint8)
    f.write_bytes(b"hdr" + data.tobytes())
    monkeypatch.setattr(io, "READ_SLICE", 7_000)
    for threads in (1, 3, 4):
        monkeypatch.setattr(io, "READ_THREADS", threads)
        monkeypatch.setattr(io, "_readers", None)  # a pool of this many threads
        out = bytearray(len(data))
        assert io.read_exact(f, 3, memoryview(out)) == len(data)
        assert bytes(out) == data.tobytes()
        assert io.read_exact(f, 10, memoryview(bytearray(len(data)))) == len(data) - 7
        far = memoryview(bytearray(4 * len(data)))  # the file ends inside the first part
        assert io.read_exact(f, 3, far) == len(data)
        out = torch.empty(1000, store.width, dtype=store.read_rows(0, 0, 1).dtype)
        assert torch.equal(store.read_into(0, out), store.read_rows(0, 0, 1000))
        if io._readers is not None:
            io._readers.shutdown()


def test_short_chunk_file_is_one_line(store, tmp_path):
    import shutil

    copy = tmp_path / "store"
    shutil.copytree(store.path, copy)
    s = ChunkStore(copy)
    f = copy / s.chunks[0]["file"]
    data = np.load(f, mmap_mode="r")
    need = torch.empty(data.shape[0] + 1, s.width, dtype=s.read_rows(0, 0, 1).dtype)
    with pytest.raises(StoreError, match="truncated; delete .* and re-run the sweep"):
        s.read_into(0, need)
