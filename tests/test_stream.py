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


def test_short_chunk_file_is_one_line(store, tmp_path):
    import shutil

    copy = tmp_path / "store"
    shutil.copytree(store.path, copy)
    s = ChunkStore(copy)
    f = copy / s.chunks[0]["file"]
    data = np.load(f, mmap_mode="r")
    need = torch.empty(data.shape[0] + 1, s.width, dtype=s.read_rows(0, 0, 1).dtype)
    with pytest.raises(StoreError, match="truncated; regenerate the store"):
        s.read_into(0, need)
