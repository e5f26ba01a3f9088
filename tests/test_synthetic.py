"""Synthetic data generation: the distribution (firing frequencies, copula co-firing,
magnitudes, exact decode), determinism per (seed, chunk), resume, and which stores are reused,
resumed or regenerated (generator version / device in the marker and the manifest)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from sweep.activations import synthetic
from sweep.activations.store import MANIFEST, chunk_name
from sweep.activations.synthetic import (
    PARAMS_FILE,
    SyntheticSource,
    bernoulli_successes,
    ensure_synthetic_store,
)
from sweep.errors import StoreError
from tests.conftest import refused, tiny_data

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def active(codes: synthetic.Codes, rows: int, n_features: int) -> torch.Tensor:
    """(rows, F) bool: which features fire in which row."""
    out = torch.zeros(rows, n_features, dtype=torch.bool, device=codes.row.device)
    out[codes.row, codes.feature] = True
    return out


def assert_frequencies_match(fired: torch.Tensor, p: torch.Tensor, sigmas: float = 5.0) -> None:
    """Each feature's empirical firing frequency within ``sigmas`` binomial std of p_i."""
    n = fired.shape[0]
    freq = fired.double().mean(0).cpu()  # (F,)
    se = (p * (1 - p) / n).sqrt().clamp(min=1 / n)  # (F,)
    worst = float(((freq - p).abs() / se).max())
    assert worst < sigmas, f"a feature's frequency is {worst:.1f} std from its p_i"


def copula_reference(src: SyntheticSource, rows: int, seed: int) -> torch.Tensor:
    """(rows, F) firings drawn straight from the definition: z = sqrt(1-c) eps + sqrt(c) L g."""
    c = src.cfg.correlation
    g = torch.Generator().manual_seed(seed)
    eps = torch.randn(rows, src.cfg.n_features, generator=g)  # (n, F)
    shared = torch.randn(rows, src.loadings.shape[1], generator=g) @ src.loadings.T  # (n, F)
    return math.sqrt(1 - c) * eps + math.sqrt(c) * shared > src.threshold


def test_bernoulli_successes_handle_certain_impossible_and_rare_features():
    p = torch.tensor([1.0, 0.0, 0.5, 1e-3, 1e-12], dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    row, feat = bernoulli_successes(p, 100_000, g)
    assert torch.equal(row[feat == 0].sort().values, torch.arange(100_000))  # p = 1: every row
    assert not bool((feat == 1).any()) and not bool((feat == 4).any())
    assert int((feat == 2).sum()) == pytest.approx(50_000, abs=5 * 158)
    assert int((feat == 3).sum()) == pytest.approx(100, abs=5 * 10)
    key = row * 5 + feat
    assert key.unique().numel() == key.numel() and bool(((row >= 0) & (row < 100_000)).all())


def test_bernoulli_successes_top_up_features_whose_gaps_fall_short():
    p = torch.full((2000,), 0.01, dtype=torch.float64)  # 10 expected; 17 gaps drawn at first
    row, feat = bernoulli_successes(p, 1000, torch.Generator().manual_seed(1))
    counts = torch.bincount(feat, minlength=2000)
    assert int(counts.max()) > 17  # only reachable through the later rounds
    assert float(counts.double().mean()) == pytest.approx(10.0, abs=5 * (9.9 / 2000) ** 0.5)
    assert float(counts.double().var()) == pytest.approx(9.9, rel=0.15)  # binomial variance
    key = row * 2000 + feat
    assert key.unique().numel() == key.numel() and bool(((row >= 0) & (row < 1000)).all())


def test_chunks_depend_only_on_seed_and_chunk():
    cfg = tiny_data(noise=0.1, correlation=0.3)
    src = SyntheticSource(cfg)
    rows = 20_000  # several blocks
    third = src.sample(rows, 3)
    src.sample(100, 0), src.sample(9000, 5)  # whatever was generated before
    assert torch.equal(src.sample(rows, 3), third)
    assert torch.equal(SyntheticSource(cfg).sample(rows, 3, device=torch.device("cpu")), third)
    assert not torch.equal(src.sample(rows, 2), third)
    assert not torch.equal(
        SyntheticSource(tiny_data(noise=0.1, correlation=0.3, seed=1)).sample(rows, 3), third
    )


@pytest.mark.parametrize(
    "correlation, slice_rows", [(0.0, None), (0.5, None), (0.5, 37)]
)  # 37: the dense pass in many slices of 37 rows (candidates split among them)
def test_firing_frequencies_match_p(correlation, slice_rows, monkeypatch):
    cfg = tiny_data(n_features=32, mean_active=3.0, decay=0.85, correlation=correlation)
    src = SyntheticSource(cfg)
    rows = 200_000
    if slice_rows:
        monkeypatch.setitem(synthetic._DENSE, "cpu", slice_rows * cfg.n_features)
    fired = active(src.codes(rows, 0), rows, cfg.n_features)
    assert float(src.p.min()) < 1e-2 < 0.3 < float(src.p.max())  # rare and common features
    assert_frequencies_match(fired, src.p)
    assert float(fired.sum(1).double().mean()) == pytest.approx(3.0, abs=0.02)


def test_certain_features_fire_in_every_row_with_correlation():
    cfg = tiny_data(n_features=8, width=8, mean_active=6.0, decay=0.9, correlation=0.5)
    src = SyntheticSource(cfg)
    assert float(src.p[0]) == 1.0
    fired = active(src.codes(50_000, 1), 50_000, 8)
    assert bool(fired[:, src.p == 1].all())
    assert_frequencies_match(fired, src.p)


def test_correlated_cofiring_matches_the_copula_definition():
    cfg = tiny_data(n_features=16, width=8, mean_active=3.0, decay=0.85, correlation=0.6)
    src = SyntheticSource(cfg)
    rows = 200_000
    fired = active(src.codes(rows, 0), rows, 16).float()
    ref = copula_reference(src, rows, seed=7).float()
    both, both_ref = fired.T @ fired / rows, ref.T @ ref / rows  # (F, F) co-firing rates
    se = (2 * both_ref * (1 - both_ref) / rows).sqrt() + 1e-4
    assert float(((both - both_ref).abs() / se).max()) < 5
    independent = src.p_float[:, None] * src.p_float[None]  # what no correlation would give
    assert float((both - independent).triu(1).max()) > 0.02  # the correlation is there


def test_magnitudes_and_exact_decode():
    cfg = tiny_data(n_features=64, decay=0.97, correlation=0.2)
    src = SyntheticSource(cfg)
    rows = 10_000
    codes = src.codes(rows, 2)
    assert float(codes.value.min()) > 0 and float(codes.value.max()) <= 1
    key = codes.row * cfg.n_features + codes.feature
    assert bool((key[1:] > key[:-1]).all())  # sorted row-major, no pair twice
    dense = torch.zeros(rows, cfg.n_features)  # (n, F)
    dense[codes.row, codes.feature] = codes.value
    x = src.sample(rows, 2)
    torch.testing.assert_close(x, dense @ src.features, rtol=1e-5, atol=1e-6)
    noisy = SyntheticSource(tiny_data(n_features=64, decay=0.97, correlation=0.2, noise=0.5))
    assert float((noisy.sample(rows, 2) - x).std()) == pytest.approx(0.5, rel=0.03)


def test_manifest_and_marker_record_the_generator(tmp_path):
    store = ensure_synthetic_store(tiny_data(rows=5000), tmp_path / "s", device="cpu")
    gen = store.provenance["generator"]
    assert gen["version"] == synthetic.GENERATOR_VERSION and gen["device"] == "cpu"
    assert gen["algorithm"] == synthetic.ALGORITHM
    marker = json.loads((tmp_path / "s" / PARAMS_FILE).read_text())["generator"]
    assert marker == {**gen, "cpu": torch.backends.cpu.get_cpu_capability()}  # (marker only)
    assert "generator" not in store.provenance["params"]


def _interrupt(path, drop: int) -> None:
    """Make ``path`` look like a generation killed before chunk ``drop`` was written."""
    (path / MANIFEST).unlink()
    (path / chunk_name(drop)).unlink()
    (path / chunk_name(drop)).with_suffix(".json").unlink()


def test_interrupted_generation_resumes_with_the_same_bits(tmp_path):
    cfg = tiny_data(correlation=0.3, noise=0.1)
    full = ensure_synthetic_store(cfg, tmp_path / "a")
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    _interrupt(tmp_path / "b", drop=1)
    kept = (tmp_path / "b" / chunk_name(0)).stat().st_mtime_ns
    resumed = ensure_synthetic_store(cfg, tmp_path / "b")
    assert (tmp_path / "b" / chunk_name(0)).stat().st_mtime_ns == kept  # not regenerated
    for i in range(len(full.chunks)):
        assert torch.equal(resumed.read_rows(i), full.read_rows(i))


def test_a_stop_while_the_parameters_were_written_is_not_a_foreign_folder(tmp_path):
    """Killed inside the first atomic write, a store folder holds only that write's temp
    file: the re-run generates the store (it used to refuse it as not a sweep store)."""
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / ".synthetic-params.json.k3j2.tmp").write_text("{")
    store = ensure_synthetic_store(tiny_data(rows=5000), tmp_path / "s", owned=True)
    assert store.total_rows == 5000
    assert not list((tmp_path / "s").glob(".*.tmp"))


@pytest.mark.parametrize(
    "generator",
    [
        None,
        {"version": 1, "device": "cpu"},
        {"version": synthetic.GENERATOR_VERSION, "device": "cuda"},
        {"cpu": "ANOTHER-CPU"},  # randn's bits depend on the instruction set
    ],
)
def test_incomplete_store_of_another_generator_is_regenerated(tmp_path, generator):
    cfg = tiny_data()
    full = ensure_synthetic_store(cfg, tmp_path / "a")
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    _interrupt(tmp_path / "b", drop=2)
    marker = synthetic.generator_params(cfg)  # None: the old generator's marker (params only)
    if generator is not None:
        marker["generator"] = {**synthetic.generator_info("cpu"), **generator}
    (tmp_path / "b" / PARAMS_FILE).write_text(json.dumps(marker))
    foreign = np.full((4096, 16), 7.0, dtype=np.float32)  # its chunks must not be mixed in
    np.save(tmp_path / "b" / chunk_name(0), foreign)
    if generator is not None:  # another sweep's, perhaps, still generating: refused
        with pytest.raises(StoreError, match="finish it where it was begun"):
            ensure_synthetic_store(cfg, tmp_path / "b")
    again = ensure_synthetic_store(cfg, tmp_path / "b", owned=True)  # the sweep's own
    for i in range(len(full.chunks)):
        assert torch.equal(again.read_rows(i), full.read_rows(i))
    assert again.provenance["generator"] == synthetic.generator_info("cpu")


def _begun_with_other_rows(tmp_path):
    """An incomplete store begun with data.rows=9000: what another sweep may be writing."""
    path = tmp_path / "other"
    ensure_synthetic_store(tiny_data(rows=9000), path)
    _interrupt(path, drop=1)
    return path, {f.name: f.read_bytes() for f in path.iterdir()}


def test_an_incomplete_store_with_other_parameters_is_refused_untouched(tmp_path):
    """Another folder's incomplete store may be another sweep's, still generating: a sweep
    pointed at it with other data parameters is refused, and nothing there is touched."""
    path, before = _begun_with_other_rows(tmp_path)
    with pytest.raises(StoreError, match=r"incomplete synthetic store made with other data "
                       r"parameters \(rows 9000 -> 5000\); pass its values to finish it"):  # fmt: skip
        ensure_synthetic_store(tiny_data(rows=5000), path)
    assert {f.name: f.read_bytes() for f in path.iterdir()} == before
    (path / PARAMS_FILE).write_text("{")
    with pytest.raises(StoreError, match="whose synthetic-params.json is damaged; use another"):
        ensure_synthetic_store(tiny_data(rows=5000), path)


def test_the_sweeps_own_incomplete_store_with_other_parameters_is_made_anew(tmp_path):
    path, _ = _begun_with_other_rows(tmp_path)
    store = ensure_synthetic_store(tiny_data(rows=5000), path, owned=True)
    assert store.total_rows == 5000 and store.provenance["params"]["rows"] == 5000


def test_an_incomplete_store_whose_parameters_could_not_be_read_is_kept(tmp_path, monkeypatch):
    """Its parameters file unreadable (a permission, a disk error) was taken for other
    parameters: the sweep's own incomplete store was cleared and generated again."""
    cfg = tiny_data()
    ensure_synthetic_store(cfg, tmp_path / "s")
    _interrupt(tmp_path / "s", drop=1)
    before = {f.name: f.read_bytes() for f in (tmp_path / "s").iterdir()}
    monkeypatch.setattr(Path, "read_text", refused(Path.read_text, tmp_path / "s" / PARAMS_FILE))
    with pytest.raises(PermissionError):
        ensure_synthetic_store(cfg, tmp_path / "s", owned=True)
    assert {f.name: f.read_bytes() for f in (tmp_path / "s").iterdir()} == before


def test_complete_store_of_the_old_generator_is_reused_untouched(tmp_path):
    cfg = tiny_data(rows=5000)
    path = tmp_path / "old"
    ensure_synthetic_store(cfg, path)
    manifest = json.loads((path / MANIFEST).read_text())
    del manifest["provenance"]["generator"]  # as the first generator wrote it
    (path / MANIFEST).write_text(json.dumps(manifest))
    (path / PARAMS_FILE).write_text(json.dumps(synthetic.generator_params(cfg)))
    before = {f.name: (f.stat().st_mtime_ns, f.read_bytes()) for f in path.iterdir()}
    store = ensure_synthetic_store(cfg, path, device="cpu")
    assert {f.name: (f.stat().st_mtime_ns, f.read_bytes()) for f in path.iterdir()} == before
    assert "generator" not in store.provenance and store.total_rows == 5000


def test_reusing_a_store_never_resolves_a_device(tmp_path, monkeypatch):
    """``auto`` is resolved only to generate: a sweep on a reused store starts no CUDA context
    in the driver (it would hold GPU memory for the whole sweep)."""
    cfg = tiny_data(rows=5000)
    ensure_synthetic_store(cfg, tmp_path / "s", device="auto")

    def refuse(*_: object) -> None:
        raise AssertionError("resolve_device called for a complete store")

    monkeypatch.setattr(synthetic, "resolve_device", refuse)
    assert ensure_synthetic_store(cfg, tmp_path / "s", device="auto").total_rows == 5000


@pytest.mark.gpu
@CUDA
def test_cuda_generation_is_deterministic_and_keeps_the_distribution(tmp_path):
    for correlation in (0.0, 0.5):
        cfg = tiny_data(n_features=32, mean_active=3.0, decay=0.85, correlation=correlation)
        src = SyntheticSource(cfg)
        x = src.sample(300_000, 1, device="cuda")
        assert x.device.type == "cuda" and torch.equal(
            SyntheticSource(cfg).sample(300_000, 1, "cuda"), x
        )
        fired = active(src.codes(300_000, 1, "cuda"), 300_000, cfg.n_features)
        assert_frequencies_match(fired, src.p)
    store = ensure_synthetic_store(tiny_data(rows=5000, noise=0.1), tmp_path / "s", device="cuda")
    assert store.provenance["generator"]["device"] == "cuda"
    assert store.provenance["generator"]["gpu"] == torch.cuda.get_device_name()
    assert store.read_rows(0).device.type == "cpu"


def test_dense_pass_slicing_does_not_change_the_draws(monkeypatch):
    """The dense pass runs in slices of rows; each candidate must meet its own row's s."""
    cfg = tiny_data(n_features=32, mean_active=3.0, decay=0.85, correlation=0.5)
    whole = SyntheticSource(cfg).codes(20_000, 4)
    monkeypatch.setitem(synthetic._DENSE, "cpu", 37 * cfg.n_features)  # slices of 37 rows
    sliced = SyntheticSource(cfg).codes(20_000, 4)
    keys = [set((c.row * 32 + c.feature).tolist()) for c in (whole, sliced)]
    assert len(keys[0] ^ keys[1]) <= 1e-4 * len(keys[0])  # a last-bit matmul difference at most


def test_a_chunk_too_large_for_memory_is_one_line_naming_rows_per_chunk(tmp_path, monkeypatch):
    """An allocation that fails while generating (here the chunk's; for real, e.g. 400M rows
    per chunk) is one line naming data.rows_per_chunk, not a traceback."""
    from sweep.activations import synthetic
    from sweep.config import SyntheticDataConfig
    from sweep.errors import StoreError

    def fail(*args, **kw):
        raise RuntimeError(
            "[enforce fail at alloc_cpu.cpp:121] DefaultCPUAllocator: can't allocate memory"
        )

    monkeypatch.setattr(synthetic, "_generate", fail)
    cfg = SyntheticDataConfig(rows=4096, eval_rows=1024, rows_per_chunk=4096)
    with pytest.raises(StoreError, match="ran out of host memory .* lower data.rows_per_chunk"):
        synthetic.ensure_synthetic_store(cfg, tmp_path / "store", "cpu")


GENERATE = """
import logging, sys
from sweep.activations.synthetic import ensure_synthetic_store
from tests.conftest import tiny_data
logging.basicConfig(level=logging.INFO, format="%(message)s")
try:
    store = ensure_synthetic_store(tiny_data(rows=9000, seed=int(sys.argv[2])), sys.argv[1])
    print("made with seed", store.provenance["params"]["seed"], flush=True)
except Exception as err:
    print("refused:", err, flush=True)
"""


@pytest.mark.parametrize("seed", [0, 1])
def test_a_second_process_waits_for_the_generation_then_reuses_or_refuses(tmp_path, seed):
    """Two sweeps on one new ``data.path`` at once: the second waits for the first's store,
    then reuses it (same parameters) or refuses it in one line — never both writing one
    folder (seen: chunks of two seeds in one store that verified)."""
    import subprocess
    import sys
    from pathlib import Path

    path = tmp_path / "store"
    repo = Path(__file__).resolve().parents[1]
    with synthetic._generating(path):  # this process generates meanwhile
        other = subprocess.Popen(
            [sys.executable, "-c", GENERATE, str(path), str(seed)], cwd=repo, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )  # fmt: skip
        first = other.stdout.readline()
        assert f"another process is generating the synthetic store {path}" in first, first
        synthetic._make(tiny_data(rows=9000, seed=0), path, "cpu", False, False)
    said = other.communicate(timeout=120)[0]
    if seed == 0:
        assert "reusing synthetic store" in said and "made with seed 0" in said, said
    else:
        assert "refused: store" in said and "different data parameters (seed)" in said, said
    synthetic.ChunkStore(path).verify()


def test_a_generation_begun_before_the_cpu_was_recorded_is_finished_not_cleared(tmp_path):
    """A marker of an earlier version (no CPU capability) is this CPU's: its chunks stay."""
    cfg = tiny_data()
    ensure_synthetic_store(cfg, tmp_path / "a")
    _interrupt(tmp_path / "a", drop=1)
    marker = {**synthetic.generator_params(cfg), "generator": synthetic.generator_info("cpu")}
    (tmp_path / "a" / PARAMS_FILE).write_text(json.dumps(marker))
    kept = (tmp_path / "a" / chunk_name(0)).stat().st_mtime_ns
    store = ensure_synthetic_store(cfg, tmp_path / "a")
    assert (tmp_path / "a" / chunk_name(0)).stat().st_mtime_ns == kept
    assert store.provenance["generator"] == synthetic.generator_info("cpu")  # (no CPU in it)
    assert json.loads((tmp_path / "a" / PARAMS_FILE).read_text())["generator"]["cpu"]


def test_a_synthetic_store_made_again_with_other_bits_says_why(tmp_path):
    """Made again on another kind of CPU or GPU, a synthetic store of the same parameters
    can hold other bits: the refusal says so rather than only 'different contents'."""
    from sweep import planning
    from sweep.activations.store import ChunkStore
    from sweep.errors import SweepError
    from sweep.sweepdir import SweepFolder

    store = ensure_synthetic_store(tiny_data(noise=0.1), tmp_path / "s")
    (tmp_path / "sw").mkdir()
    SweepFolder(tmp_path / "sw").write_manifest([], {}, store)
    manifest = json.loads((tmp_path / "s" / MANIFEST).read_text())
    manifest["chunks"][0]["sha256"] = "0" * 64  # (its rows made with other bits)
    (tmp_path / "s" / MANIFEST).write_text(json.dumps(manifest))
    said = (
        r"same settings, different contents: synthetic data made again on another kind of CPU "
        r"or GPU can differ bit-wise\); use a new sweep_dir for this store, or put the store "
        r"they were trained on back at "
    )
    with pytest.raises(SweepError, match=said):
        planning.check_store(SweepFolder(tmp_path / "sw"), ChunkStore(tmp_path / "s"))
