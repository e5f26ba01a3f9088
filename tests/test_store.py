"""Chunk store format, streaming order, and rejection of damaged stores."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from sweep.activations import store as store_module
from sweep.activations.store import MANIFEST, BatchStream, ChunkStore, Cursor, StoreWriter
from sweep.activations.synthetic import SyntheticSource, ensure_synthetic_store
from sweep.devices import torch_dtype
from sweep.errors import StoreError
from tests.conftest import refused, rehash_chunk, tiny_data


def test_store_layout_and_manifest(tiny_store):
    m = tiny_store.manifest
    assert m["width"] == 16 and m["dtype"] == "float32" and m["rows_per_chunk"] == 4096
    assert m["total_rows"] == 12_000 and [c["rows"] for c in m["chunks"]] == [4096, 4096, 3808]
    assert (
        m["provenance"]["source"] == "synthetic" and m["provenance"]["params"]["n_features"] == 32
    )
    assert len(m["stats"]["mean"]) == 16 and m["stats"]["mean_row_norm"] > 0
    arr = np.load(tiny_store.path / "chunk_00000.npy", mmap_mode="r")  # plain memory-mappable .npy
    assert arr.shape == (4096, 16)
    gt = tiny_store.ground_truth()
    assert gt.shape == (32, 16)
    torch.testing.assert_close(gt.norm(dim=1), torch.ones(32))


def test_a_synthetic_stores_ground_truth_is_checked_and_not_its_identity(tiny_store, tmp_path):
    """Its sha256 is in the manifest: a changed or lost ground truth is refused by the
    verification (the gt_* metrics changed or vanished silently), in one line naming the
    repair; the checksum is not part of the store's identity (a store made again by this
    version is the one a sweep recorded before it); a harvest's identity without its LM-eval
    tokens' checksum (what sweeps recorded before it) is known too."""
    store = ChunkStore(shutil.copytree(tiny_store.path, tmp_path / "s"))
    truth = store.path / "ground_truth.safetensors"
    prov = store.manifest["provenance"]
    assert prov["ground_truth_sha256"] == hashlib.sha256(truth.read_bytes()).hexdigest()
    old = json.loads(json.dumps(store.manifest))
    del old["provenance"]["ground_truth_sha256"]
    assert store.identity == store_module.manifest_hash(old)  # (as recorded before)
    harvested = ChunkStore(store.path)  # (a harvest's LM-eval tokens' checksum, since 40)
    harvested.manifest = json.loads(json.dumps(old))
    harvested.manifest["provenance"]["lm_eval"] = {"file": "t.npy", "sha256": "ab"}
    assert harvested.identity == store_module.manifest_hash(harvested.manifest)
    old["provenance"]["lm_eval"] = {"file": "t.npy"}  # (as before it)
    assert harvested.identities == {harvested.identity, store_module.manifest_hash(old)}
    store.verify()
    data = bytearray(truth.read_bytes())
    data[-1] ^= 1
    truth.write_bytes(bytes(data))
    for problem in ("fails its checksum (it changed after the store was written)", "is missing"):
        with pytest.raises(StoreError, match="delete .* and re-run the sweep that made it") as err:
            store.verify()
        assert f"{truth} {problem}" in str(err.value)
        with pytest.raises(StoreError, match=problem.replace("(", r"\(").replace(")", r"\)")):
            store.ground_truth()
        truth.unlink(missing_ok=True)


def test_stats_match_data(tiny_store):
    x = torch.cat([tiny_store.read_rows(i) for i in range(len(tiny_store.chunks))]).double()
    stats = tiny_store.manifest["stats"]
    np.testing.assert_allclose(stats["mean"], x.mean(0).numpy(), rtol=1e-6, atol=1e-9)
    assert stats["mean_row_norm"] == pytest.approx(float(x.norm(dim=1).mean()), rel=1e-6)
    assert tiny_store.scale(True) == pytest.approx(4.0 / stats["mean_row_norm"])
    assert tiny_store.scale(False) == 1.0


def test_synthetic_is_deterministic_and_reused(tmp_path):
    cfg = tiny_data(rows=5000)
    a = ensure_synthetic_store(cfg, tmp_path / "a")
    b = ensure_synthetic_store(cfg, tmp_path / "b")
    for i in range(len(a.chunks)):
        assert torch.equal(a.read_rows(i), b.read_rows(i))
    mtime = (tmp_path / "a" / "chunk_00000.npy").stat().st_mtime_ns
    again = ensure_synthetic_store(cfg, tmp_path / "a")  # same params: reused, not regenerated
    assert (tmp_path / "a" / "chunk_00000.npy").stat().st_mtime_ns == mtime
    assert again.total_rows == 5000
    with pytest.raises(StoreError, match="different data parameters.*rows"):
        ensure_synthetic_store(tiny_data(rows=6000), tmp_path / "a")


def test_synthetic_statistics():
    cfg = tiny_data(n_features=64, mean_active=4.0, decay=0.97, noise=0.0)
    src = SyntheticSource(cfg)
    assert float(src.p.sum()) == pytest.approx(4.0, rel=1e-6)
    assert bool((src.p[1:] <= src.p[:-1]).all())  # geometric decay
    x = src.sample(20000, 0)
    assert x.shape == (20000, 16)
    nonzero = (x.norm(dim=1) > 0).float().mean()  # P(no feature fires) = prod(1 - p) ~ e^-4
    assert float(nonzero) == pytest.approx(1 - float(torch.prod(1 - src.p)), abs=0.01)
    noisy = SyntheticSource(
        tiny_data(n_features=64, mean_active=4.0, decay=0.97, noise=0.5)
    ).sample(20000, 0)
    assert float((noisy[:8192] - x[:8192]).std()) == pytest.approx(
        0.5, rel=0.05
    )  # first block: same draws + noise


def test_correlated_features_keep_marginals():
    cfg = tiny_data(n_features=8, width=8, mean_active=2.0, decay=0.9, correlation=0.6)
    src = SyntheticSource(cfg)
    g = torch.Generator().manual_seed(0)
    eps = torch.randn(200000, 8, generator=g)
    shared = torch.randn(200000, 16, generator=g) @ src.loadings.T
    z = 0.6**0.5 * shared + 0.4**0.5 * eps
    freq = (z > src.threshold).float().mean(0)
    torch.testing.assert_close(freq, src.p.float(), atol=0.01, rtol=0.05)
    assert src.sample(1000, 0).shape == (1000, 8)


def test_stream_is_seeded_and_resumable(tiny_store):
    s = BatchStream(tiny_store, batch_size=256, seed=3, epochs=2, eval_rows=2048)
    full = list(s.batches(Cursor()))
    assert len(full) == s.total_steps == 2 * (16 + 16 + 6)  # 9952 train rows -> 4096, 4096, 1760
    again = list(
        BatchStream(tiny_store, batch_size=256, seed=3, epochs=2, eval_rows=2048).batches(Cursor())
    )
    assert all(torch.equal(a[1], b[1]) for a, b in zip(full, again, strict=True))
    for k in (1, 15, 16, 37, 50):  # resume from the cursor after batch k
        rest = list(s.batches(full[k - 1][0]))
        assert len(rest) == len(full) - k
        assert all(torch.equal(a[1], b[1]) for a, b in zip(rest, full[k:], strict=True))
    other = list(
        BatchStream(tiny_store, batch_size=256, seed=4, epochs=1, eval_rows=2048).batches(Cursor())
    )
    assert not torch.equal(other[0][1], full[0][1])
    assert full[-1][0] == Cursor(2, 0, 0)


def test_stream_never_yields_eval_rows(tiny_store):
    s = BatchStream(tiny_store, batch_size=256, seed=0, epochs=1, eval_rows=2048)
    seen = torch.cat([x for _, x in s.batches(Cursor())])
    held = tiny_store.tail_rows(2048)
    rows = {
        tuple(r.tolist()) for r in held if r.abs().sum() > 0
    }  # all-zero rows (no feature active) repeat
    assert rows and not any(tuple(r.tolist()) in rows for r in seen)


def test_stream_applies_scale(tiny_store):
    a = next(BatchStream(tiny_store, 256, 0, 1, 2048, scale=1.0).batches(Cursor()))[1]
    b = next(BatchStream(tiny_store, 256, 0, 1, 2048, scale=2.5).batches(Cursor()))[1]
    torch.testing.assert_close(b, a * 2.5)


@pytest.fixture
def store_copy(tiny_store, tmp_path):
    dst = tmp_path / "store"
    shutil.copytree(tiny_store.path, dst, ignore=shutil.ignore_patterns("verified.json"))
    return dst  # (as made: never verified)


def test_missing_store(tmp_path):
    with pytest.raises(StoreError, match="does not exist"):
        ChunkStore(tmp_path / "nope")


def test_missing_manifest(store_copy):
    (store_copy / MANIFEST).unlink()
    with pytest.raises(StoreError, match="manifest.json is missing"):
        ChunkStore(store_copy)


def test_truncated_chunk(store_copy):
    f = store_copy / "chunk_00001.npy"
    f.write_bytes(f.read_bytes()[:5000])
    with pytest.raises(StoreError, match="chunk_00001.npy.*(truncated|damaged)"):
        ChunkStore(store_copy)


def test_a_column_major_chunk_is_refused_in_one_line(store_copy):
    """A chunk saved in Fortran order (e.g. by a user's own pipeline) would be read as raw
    row-major bytes by the GPU staging path: refused with the fix."""
    f = store_copy / "chunk_00001.npy"
    np.save(f, np.asfortranarray(np.load(f)))
    with pytest.raises(StoreError, match=r"chunk_00001.npy is stored column-major.*row-major"):
        ChunkStore(store_copy)


def test_missing_chunk(store_copy):
    (store_copy / "chunk_00002.npy").unlink()
    with pytest.raises(StoreError, match="chunk_00002.npy is missing"):
        ChunkStore(store_copy)


def test_nan_chunk_is_found_by_verify(store_copy):
    arr = np.load(store_copy / "chunk_00001.npy")
    arr[10, 3] = np.nan
    np.save(store_copy / "chunk_00001.npy", arr)
    with pytest.raises(StoreError, match="chunk_00001.npy fails its checksum"):
        ChunkStore(store_copy).verify()  # (changed since: what changed is said first)
    rehash_chunk(store_copy, "chunk_00001.npy")  # written so
    store = ChunkStore(store_copy)
    with pytest.raises(StoreError, match="chunk_00001.npy contains NaN"):
        store.verify()


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_verify_finds_every_nonfinite_value_in_every_dtype(tmp_path, dtype, bad):
    """The one-pass scan tests exponent bits: NaN, +inf and -inf in each store dtype, in the
    last chunk (verified in parallel with the others); large finite values pass (fp16's
    largest; the writer's float32 statistics cap the others near 1.8e19)."""
    data = tiny_data(dtype=dtype)  # 3 chunks
    clean = ensure_synthetic_store(data, tmp_path / "ok")
    big = torch.finfo(torch.float16).max if dtype == "float16" else 1e19
    writer = StoreWriter(tmp_path / "s", data.width, dtype, data.rows_per_chunk)
    for i in range(3):
        rows = clean.read_rows(i).float()
        rows[0, 0] = big if i < 2 else rows[0, 0]
        writer.write_chunk(i, rows)
    writer.finalize(3, {})
    ChunkStore(tmp_path / "s").verify()  # finite extremes are not flagged
    f = tmp_path / "s" / "chunk_00002.npy"
    arr = np.load(f)
    if dtype == "float32":
        arr[7, 1] = bad
    else:  # 16-bit stores: set the bits (bfloat16 is stored as uint16)
        bits = torch.tensor([bad], dtype=torch_dtype(dtype)).view(torch.uint16).item()
        arr.view(np.uint16)[7, 1] = bits
    np.save(f, arr)
    rehash_chunk(tmp_path / "s", f.name)  # (written so)
    with pytest.raises(StoreError, match="chunk_00002.npy contains NaN or inf"):
        ChunkStore(tmp_path / "s").verify()


def test_a_chunk_damaged_after_opening_fails_verify_in_one_line(store_copy):
    store = ChunkStore(store_copy)
    (store_copy / "chunk_00001.npy").write_bytes(b"not a numpy file")
    with pytest.raises(
        StoreError,
        match="chunk_00001.npy is truncated or corrupt .*; delete .* and re-run the sweep that "
        "made it \\(data=synthetic with the settings in its synthetic-params.json\\): it is made",
    ):
        store.verify()


def test_a_chunk_whose_header_fails_to_parse_is_one_line(store_copy):
    """A damaged .npy header can fail to tokenize (np.load parses it as a Python literal):
    a TokenError, no ValueError, was a traceback."""
    f = store_copy / "chunk_00001.npy"
    data = f.read_bytes()
    f.write_bytes(data.replace(b"}", b"(", 1))
    with pytest.raises(StoreError, match="chunk_00001.npy is truncated or corrupt"):
        ChunkStore(store_copy)


def test_a_chunk_that_could_not_be_read_is_not_called_damaged(store_copy, monkeypatch):
    """An I/O error reading a chunk (permissions, the disk) proves nothing about it: the error
    says to mend the cause before any repair that deletes or makes the store again."""
    import sweep.activations.store as store_module

    monkeypatch.setattr(store_module, "open", refused(open, "chunk_00001.npy"), raising=False)
    with pytest.raises(
        StoreError,
        match="chunk_00001.npy could not be read \\(PermissionError: .*\\); mend the cause "
        "\\(permissions, the disk\\) and re-run \\(were it lost: delete ",
    ):
        ChunkStore(store_copy).verify()
    store = ChunkStore(store_copy)
    monkeypatch.setattr(np, "load", refused(np.load, "chunk_00001.npy"))  # (as training reads)
    for read in (lambda: store.read_rows(1), lambda: store.read_into(1, torch.empty(4, 16))):
        with pytest.raises(StoreError, match="chunk_00001.npy could not be read .*mend the cause"):
            read()
    monkeypatch.undo()
    held = ChunkStore(store_copy)
    held.hold()
    os.utime(store_copy / "chunk_00001.npy", ns=(1, 1))  # (changed since: hashed again)
    monkeypatch.setattr(store_module, "open", refused(open, "chunk_00001.npy"), raising=False)
    with pytest.raises(StoreError, match="could not be read") as caught:
        held.read_rows(1)
    assert "changed while this sweep trained" not in str(caught.value)  # (nothing is known)


EDITS = {
    "dtype float64": (lambda m: m.update(dtype="float64"), "dtype is 'float64', not one of"),
    "no stats": (lambda m: m.pop("stats"), "its stats have no mean_row_norm"),
    "width a word": (lambda m: m.update(width="sixteen"), "width is 'sixteen', not a count"),
    "chunk without rows": (lambda m: m["chunks"][1].pop("rows"), r"not a list of \{file, rows\}"),
    "more total_rows": (
        lambda m: m.update(total_rows=m["total_rows"] + 8000),
        "total_rows .* is not the sum of its chunks' rows",
    ),
    "fewer total_rows": (
        lambda m: m.update(total_rows=m["total_rows"] - 100),
        "is not the sum of its chunks' rows",
    ),
    "short mean": (lambda m: m["stats"]["mean"].pop(), "its stats' mean is not 16 numbers"),
}


@pytest.mark.parametrize("edit", EDITS)
def test_a_manifest_damaged_or_edited_is_refused_in_one_line(store_copy, edit):
    """Fields missing or of the wrong kind, and a total that is not the chunks' rows (which
    would train on the held-out rows, or drop rows, without a word), name the manifest."""
    change, says = EDITS[edit]
    m = json.loads((store_copy / MANIFEST).read_text())
    change(m)
    (store_copy / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(StoreError, match=f"manifest .* is damaged or was edited \\(.*{says}"):
        ChunkStore(store_copy)


def test_a_manifest_that_is_not_a_mapping_is_not_a_store(store_copy):
    (store_copy / MANIFEST).write_text("[]")
    with pytest.raises(StoreError, match="is not a sweep chunk store manifest"):
        ChunkStore(store_copy)


def test_a_verification_is_remembered_for_its_manifest_only(store_copy):
    """A chunk checksum edited in the manifest after verification is caught, not taken as
    verified because the chunk files did not change."""
    ChunkStore(store_copy).verify()
    assert ChunkStore(store_copy).is_verified()
    m = json.loads((store_copy / MANIFEST).read_text())
    m["chunks"][1]["sha256"] = "0" * 64
    (store_copy / MANIFEST).write_text(json.dumps(m))
    store = ChunkStore(store_copy)
    assert not store.is_verified()
    with pytest.raises(StoreError, match="chunk_00001.npy fails its checksum"):
        store.verify()


def test_a_chunk_rewritten_with_its_old_mtime_is_verified_again(store_copy):
    """``touch -r``, ``cp -p`` or ``rsync -a`` from another copy can restore a chunk's size
    and mtime over different bytes; its ctime (which no tool sets) and inode tell."""
    import os

    ChunkStore(store_copy).verify()
    chunk = store_copy / "chunk_00001.npy"
    st = chunk.stat()
    raw = bytearray(chunk.read_bytes())
    raw[-3] ^= 0x01
    chunk.unlink()
    chunk.write_bytes(bytes(raw))
    os.utime(chunk, ns=(st.st_atime_ns, st.st_mtime_ns))
    store = ChunkStore(store_copy)
    assert not store.is_verified()
    with pytest.raises(StoreError, match="chunk_00001.npy fails its checksum"):
        store.verify()


def read_only(store_path, monkeypatch):
    """The store's folder refuses writes, as a read-only mount does (root, which runs these
    tests, writes through file modes)."""
    from sweep.activations import store as store_module

    real = store_module.atomic_write_json

    def refused(path, obj):
        if Path(path).parent == store_path:
            raise OSError(30, "Read-only file system")
        real(path, obj)

    monkeypatch.setattr(store_module, "atomic_write_json", refused)


def test_a_read_only_store_is_verified_once_remembered_elsewhere(store_copy, tmp_path, monkeypatch):
    read_only(store_copy, monkeypatch)
    remembered = tmp_path / "sweep" / ".store-verified.json"
    remembered.parent.mkdir()
    ChunkStore(store_copy).verify()
    assert not ChunkStore(store_copy).is_verified()  # nowhere to remember it
    ChunkStore(store_copy).verify(elsewhere=remembered)
    assert not (store_copy / "verified.json").exists() and remembered.is_file()
    store = ChunkStore(store_copy)
    assert store.is_verified(elsewhere=remembered) and not store.is_verified()
    monkeypatch.setattr(ChunkStore, "_verify_chunk", lambda *a: pytest.fail("hashed again"))
    store.verify(elsewhere=remembered)


def test_a_sweep_on_a_read_only_store_verifies_it_once(
    ray_cluster, store_copy, tmp_path, monkeypatch
):
    from sweep.cli import main

    read_only(store_copy, monkeypatch)
    args = ["run", f"sweep_dir={tmp_path / 'sw'}", "data=chunks", f"data.path={store_copy}",
            "data.eval_rows=512", "grid.l1=[1e-3]", "grid.dict_ratio=[1]",
            "train.batch_size=256", "progress=false"]  # fmt: skip
    assert main(args) == 0
    monkeypatch.setattr(ChunkStore, "_verify_chunk", lambda *a: pytest.fail("hashed again"))
    assert main(args) == 0


def test_the_steps_planned_from_chunk_sizes_are_those_of_the_store(tiny_store):
    """A synthetic store not made yet is planned from its config's chunk sizes (``--plan``)."""
    from sweep.activations.store import planned_steps, total_steps

    sizes = [int(c["rows"]) for c in tiny_store.chunks]
    for batch, epochs, held in ((256, 1, 2048), (100, 3, 5000), (1000, 2, 0)):
        assert planned_steps(sizes, batch, epochs, held) == total_steps(
            tiny_store, batch, epochs, held
        )


def test_empty_store(tmp_path):
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / MANIFEST).write_text(
        json.dumps(
            {
                "format": "sweep-chunk-store",
                "version": 1,
                "width": 4,
                "dtype": "float32",
                "rows_per_chunk": 10,
                "total_rows": 0,
                "chunks": [],
                "stats": {"mean": [0] * 4, "mean_row_norm": 0},
                "provenance": {},
            }
        )
    )
    with pytest.raises(StoreError, match="empty"):
        ChunkStore(tmp_path / "s")


def test_writer_refuses_nan_and_wrong_width(tmp_path):
    w = StoreWriter(tmp_path / "s", 4, "float16", 10)
    with pytest.raises(StoreError, match="shape"):
        w.write_chunk(0, torch.zeros(10, 5))
    with pytest.raises(StoreError, match="NaN"):
        w.write_chunk(0, torch.full((10, 4), float("nan")))
    assert not w.has_chunk(0)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_low_precision_stores_round_trip(tmp_path, dtype):
    w = StoreWriter(tmp_path / "s", 4, dtype, 8)
    x = torch.randn(8, 4)
    w.write_chunk(0, x)
    w.finalize(1, {"source": "test"})
    store = ChunkStore(tmp_path / "s")
    got = store.read_rows(0)
    assert got.dtype == getattr(torch, dtype)
    torch.testing.assert_close(got.float(), x.to(getattr(torch, dtype)).float())


def write_rows(path, x: torch.Tensor) -> ChunkStore:
    with StoreWriter(path, x.shape[1], "float32", 4000) as w:
        for i, at in enumerate(range(0, len(x), 4000)):
            w.write_chunk(i, x[at : at + 4000])
        w.finalize(i + 1, {"source": "test"})
    return ChunkStore(path)


def test_a_sweep_warns_of_an_offset_or_a_heavy_tailed_store(tmp_path, capsys):
    """Statistics that make dictionaries worse or their FVU misleading without any error
    (:mod:`sweep.activations.shape_notes`): said by ``--plan`` and the run."""
    from sweep.cli import main

    g = torch.Generator().manual_seed(0)
    x = torch.randn(12000, 16, generator=g)
    offset, heavy = x.clone(), x.clone()
    offset[:, :2] += 30 * 4.0  # a constant 30x the rows' norm in two dimensions
    heavy[::128] *= 300  # a BOS-like row every 128
    said = {}
    for name, rows in (("clean", x), ("offset", offset), ("heavy", heavy)):
        store = write_rows(tmp_path / name, rows)
        for sae in ("untied", "topk"):
            args = [f"sweep_dir={tmp_path / 'sw'}", "data=chunks", f"data.path={store.path}"]
            knob = "grid.k=[4]" if sae == "topk" else "grid.l1=[1e-2]"
            opts = [f"sae={sae}", knob, "train.batch_size=512", "data.eval_rows=2000"]
            assert main(["run", "--plan", *args, *opts]) == 0
            said[name, sae] = " ".join(capsys.readouterr().err.split())
    far, heavy_tail = "rows sit far from the origin", "rows have norms far above the rest"
    assert not any(w in said["clean", a] for w in (far, heavy_tail) for a in ("untied", "topk"))
    note = said["offset", "untied"]
    assert "the store's rows sit far from the origin: their spread around the mean is" in note
    assert "sweep grid.l1 about" in note and heavy_tail not in note
    assert "TopK-style dictionaries train worse there" in said["offset", "topk"]
    assert main(["run", "--plan", *args[:2], f"data.path={tmp_path / 'offset'}",
                 "data.normalize=false", "data.eval_rows=2000"]) == 0  # fmt: skip
    assert far not in capsys.readouterr().err  # (b_dec starts at the mean: no harm)
    assert "a few of the store's rows have norms far above the rest" in said["heavy", "untied"]
    assert far not in said["heavy", "untied"]


def test_a_store_whose_rows_do_not_vary_is_refused_before_any_work(tmp_path, capsys):
    from sweep.cli import main

    for name, value in (("zero", 0.0), ("constant", 3.0)):
        store = write_rows(tmp_path / name, torch.full((6000, 8), value))
        args = [f"sweep_dir={tmp_path / name}-sw", "data=chunks", f"data.path={store.path}"]
        for plan in (["--plan"], []):
            assert main(["run", *plan, *args, "data.eval_rows=1000"]) == 2
            err = " ".join(capsys.readouterr().err.split())
            what = "zero" if value == 0 else "one vector"
            assert f"every row of chunk store {store.path} is {what}: there is nothing" in err
        assert not (tmp_path / f"{name}-sw" / "runs").exists()


def test_a_sweep_warns_when_whole_batches_leave_much_of_each_chunk_out(tmp_path, capsys):
    from sweep.cli import main

    store = write_rows(tmp_path / "s", torch.randn(12000, 8))  # chunks of 4000 rows
    args = [f"sweep_dir={tmp_path / 'sw'}", "data=chunks", f"data.path={store.path}"]
    for batch, warned in ((1000, False), (1500, True)):  # 1500: 1000 of each 4000 left out
        opts = [f"train.batch_size={batch}", "data.eval_rows=4000"]
        assert main(["run", "--plan", *args, *opts]) == 0
        err = " ".join(capsys.readouterr().err.split())
        said = "2000 of the store's 8000 training rows (25%) are never trained on"
        assert (said in err) is warned, err


def test_a_run_warns_when_the_held_out_rows_are_unlike_the_store(tmp_path, caplog):
    """Padding at the store's end: every metric would measure it (the run reads those rows)."""
    from sweep import driver
    from sweep.cli import compose
    from sweep.config import to_sweep_config
    from sweep.sweepdir import SweepFolder

    x = torch.randn(12000, 8, generator=torch.Generator().manual_seed(0))
    padded = x.clone()
    padded[-1500:] = 0  # the last 1500 of the 2000 held-out rows
    for name, rows in (("plain", x), ("padded", padded)):
        store = write_rows(tmp_path / name, rows)
        over = [f"sweep_dir={tmp_path / 'sw'}", "data=chunks", f"data.path={store.path}"]
        cfg = to_sweep_config(compose([*over, "data.eval_rows=2000", "train.batch_size=500"]))
        caplog.clear()
        with caplog.at_level("WARNING", logger="sweep.driver"):
            driver.check_store_fits(cfg, SweepFolder(cfg.sweep_dir), store)
        unlike = [r.getMessage() for r in caplog.records if "unlike the rest" in r.getMessage()]
        assert len(unlike) == (name == "padded"), unlike
    assert unlike[0].startswith("the held-out rows (the store's last data.eval_rows=2000, on")
    assert "their mean norm is 0.2" in unlike[0] and "(75% of them zero)" in unlike[0], unlike
    (tmp_path / "sw").mkdir()
    (tmp_path / "sw" / "config.yaml").write_text("{}")  # a sweep that began on it: said once
    caplog.clear()
    with caplog.at_level("WARNING", logger="sweep.driver"):
        driver.check_store_fits(cfg, SweepFolder(cfg.sweep_dir), store)
    assert "unlike the rest" not in caplog.text


def test_store_notes_scale_their_advice_and_ignore_a_sparse_stores_zero_rows():
    from sweep import archs
    from sweep.activations.shape_notes import store_notes

    x = torch.randn(4000, 16, generator=torch.Generator().manual_seed(1))
    x[torch.rand(4000, generator=torch.Generator().manual_seed(2)) < 0.7] = 0  # sparse rows
    norms = x.norm(dim=1)
    stats = {"mean_row_norm": float(norms.mean()), "mean_sq_row_norm": float(norms.pow(2).mean()),
             "std": x.std(dim=0).tolist()}  # fmt: skip
    for name in ("untied", "topk", "jumprelu"):
        assert store_notes(stats, x, 4000, True, archs.get(name)) == [], name
    offset = {**stats, "mean_sq_row_norm": stats["mean_sq_row_norm"] * 100}  # spread 1%: r = 10
    (l1,) = store_notes(offset, x, 4000, True, archs.get("untied"))
    (l0,) = store_notes(offset, x, 4000, True, archs.get("jumprelu"))
    assert l1.endswith("sweep grid.l1 about 10x lower") and "an l1 coefficient acts 10x" in l1
    assert l0.endswith("sweep grid.l1 about 100x lower"), l0  # (an L0 penalty does not scale)
    assert store_notes({"mean_row_norm": 1.0, "mean": [0.0]}, x, 4000, True, None) == []


def test_jumprelu_on_rows_of_another_scale_without_normalize_is_warned_of():
    """(Its thresholds' start and bandwidth are set for rows of norm sqrt(width).)"""
    from sweep import archs
    from sweep.activations.shape_notes import store_notes

    x = 100 * torch.randn(4000, 16, generator=torch.Generator().manual_seed(1))  # norm ~100x
    norms = x.norm(dim=1)
    stats = {"mean_row_norm": float(norms.mean()), "mean_sq_row_norm": float(norms.pow(2).mean()),
             "std": x.std(dim=0).tolist()}  # fmt: skip
    (note,) = store_notes(stats, x, 4000, False, archs.get("jumprelu"))
    assert note.startswith("data.normalize=false: the store's rows have a mean norm 98.8x sqrt")
    assert note.endswith("set data.normalize=true (the scale is folded into the saved weights)")
    assert store_notes(stats, x, 4000, True, archs.get("jumprelu")) == []
    for name in ("untied", "topk"):
        assert store_notes(stats, x, 4000, False, archs.get(name)) == [], name
    unit = {**stats, "mean_row_norm": stats["mean_row_norm"] / 100}
    assert store_notes(unit, x / 100, 4000, False, archs.get("jumprelu")) == []
    # rows far smaller than the learning rate moves weights: any architecture's latents die
    tiny = {**stats, "mean_row_norm": stats["mean_row_norm"] * 1e-5}  # ~1e-3 x sqrt(width)
    for name in ("untied", "topk"):
        (note,) = store_notes(tiny, x * 1e-5, 4000, False, archs.get(name), lr=3e-3)
        assert "while Adam moves each weight ~its learning rate (0.003) a step" in note, note
        assert store_notes(tiny, x * 1e-5, 4000, False, archs.get(name), lr=1e-4) == []
        assert store_notes(tiny, x * 1e-5, 4000, True, archs.get(name), lr=3e-3) == []
