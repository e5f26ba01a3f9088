"""StoreWriter: chunk files byte for byte as ``np.save`` writes them, stats against a float64
reference, background writes (same files as plain ones; failures raised on the caller's
thread), and synthetic stores that are byte-identical when generated twice."""

from __future__ import annotations

import errno
import io
import json

import numpy as np
import pytest
import torch

from sweep.activations import store as store_mod
from sweep.activations import synthetic
from sweep.activations.store import ChunkStore, StoreWriter, chunk_name
from sweep.activations.synthetic import ensure_synthetic_store
from sweep.errors import StoreError
from sweep.io import file_sha256
from tests.conftest import tiny_data


def files(folder) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(folder.iterdir())}


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("rows", [0, 1, 777])
def test_chunk_file_is_what_np_save_writes(tmp_path, dtype, rows):
    w = StoreWriter(tmp_path, 24, dtype, 1024)
    x = torch.randn(rows, 24) * 3
    w.write_chunk(0, x)
    buf = io.BytesIO()
    np.save(buf, store_mod._to_numpy(x, dtype), allow_pickle=False)
    f = tmp_path / chunk_name(0)
    assert f.read_bytes() == buf.getvalue()
    assert json.loads(f.with_suffix(".json").read_text())["sha256"] == file_sha256(f)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_stats_match_a_float64_reference_of_the_stored_values(tmp_path, dtype):
    x = torch.randn(10_000, 24) * 2 + torch.linspace(-5, 5, 24)  # (n, d) columns off zero
    StoreWriter(tmp_path, 24, dtype, 10_000).write_chunk(0, x)
    ref = x.to(getattr(torch, dtype)).double()  # (n, d) the stored values
    got = json.loads((tmp_path / chunk_name(0)).with_suffix(".json").read_text())
    assert got["rows"] == 10_000
    np.testing.assert_allclose(got["sum"], ref.sum(0).numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got["sum_sq"], (ref * ref).sum(0).numpy(), rtol=1e-6)
    assert got["sum_norm"] == pytest.approx(float(ref.norm(dim=1).sum()), rel=1e-6)


def write_store(folder, threads: int, chunks: list[torch.Tensor]) -> None:
    with StoreWriter(folder, 8, "float16", 100, threads=threads) as w:
        for i, x in enumerate(chunks):
            w.write_chunk(i, x)
        assert all(w.has_chunk(i) for i in range(len(chunks)))  # waits for pending writes
        w.finalize(len(chunks), {"source": "test"})


def test_background_writes_give_the_same_files(tmp_path):
    chunks = [torch.randn(100, 8) for _ in range(7)]
    write_store(tmp_path / "plain", 0, chunks)
    write_store(tmp_path / "threads", 2, chunks)
    assert files(tmp_path / "threads") == files(tmp_path / "plain")
    assert ChunkStore(tmp_path / "threads").total_rows == 700


def test_a_failed_background_write_is_raised_on_the_caller_thread(tmp_path, monkeypatch):
    def no_space(f, arr):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store_mod, "write_npy", no_space)
    w = StoreWriter(tmp_path, 8, "float16", 100, threads=1)
    w.write_chunk(0, torch.randn(100, 8))  # handed over: the failure comes later
    with pytest.raises(StoreError, match="cannot write chunk .*No space left") as err:
        w.close()
    assert "\n" not in str(err.value)
    assert str(err.value).endswith(
        "; free space and re-run the same command: the chunks written are kept"
    )
    assert not w.has_chunk(0) and not list(tmp_path.iterdir())  # no chunk, no temp file


def test_a_failed_background_write_stops_the_with_block(tmp_path, monkeypatch):
    def broken_disk(path, obj):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(store_mod, "atomic_write_json", broken_disk)  # the stats file fails
    with pytest.raises(
        StoreError, match="cannot write chunk .*Input/output error; check the disk, then re-run"
    ):
        with StoreWriter(tmp_path, 8, "float16", 100, threads=1) as w:
            for i in range(5):
                w.write_chunk(i, torch.randn(100, 8))  # raises here or on leaving the block
    assert not any(w.has_chunk(i) for i in range(5))  # a chunk without stats is incomplete


@pytest.mark.parametrize("threads", [0, 1])
def test_nan_rows_are_refused_before_anything_is_written(tmp_path, threads):
    with StoreWriter(tmp_path, 4, "float16", 10, threads=threads) as w:
        x = torch.zeros(10, 4)
        x[3, 2] = float("inf")
        with pytest.raises(StoreError, match="chunk 0 contains NaN or inf"):
            w.write_chunk(0, x)
        x[3, 2] = 1e5  # finite, beyond float16's range: named, not "NaN or inf"
        with pytest.raises(StoreError, match=r"holds values beyond float16's largest value 65504 "
                           r"\(up to 1e\+05\); write a float32 or bfloat16 store"):  # fmt: skip
            w.write_chunk(0, x)
    assert not list(tmp_path.iterdir())


def test_same_seed_gives_a_byte_identical_store(tmp_path, monkeypatch):
    """Written by the main thread alone and by three writer threads (chunks may then finish
    in any order): the same bytes, manifest included."""
    cfg = tiny_data(rows=9000, rows_per_chunk=2048, noise=0.1, dtype="float16")
    monkeypatch.setattr(synthetic, "writer_threads", lambda: 0)
    ensure_synthetic_store(cfg, tmp_path / "a")
    monkeypatch.setattr(synthetic, "writer_threads", lambda: 3)
    ensure_synthetic_store(cfg, tmp_path / "b")
    assert files(tmp_path / "a") == files(tmp_path / "b")
