"""Synthetic activations with known ground-truth features (Sharkey et al. 2022 style).

Each row is a sparse non-negative combination of ``n_features`` random unit-norm directions
in ``width`` dimensions: feature ``i`` fires with probability ``p_i`` proportional to
``decay**i`` (scaled so ``sum(p) = mean_active``), with a magnitude uniform in (0, 1].
Firing can be correlated through a Gaussian copula (``correlation`` in [0, 1)): feature
``i`` fires when ``z_i > ndtri(1 - p_i)`` with ``z = sqrt(1-c) * eps + sqrt(c) * F g`` for
a few shared latent factors ``g``, which keeps every feature's marginal frequency ``p_i``.
Optional Gaussian noise of std ``noise`` is added to every element.

Every chunk is generated from a generator seeded by ``(seed, chunk)``, so the store is the
same bit for bit whatever was generated before, and an interrupted generation resumes.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import save

from sweep.activations.store import GROUND_TRUTH, MANIFEST, ChunkStore, StoreWriter
from sweep.config import SyntheticDataConfig
from sweep.errors import StoreError
from sweep.io import atomic_write_bytes, atomic_write_json, remove_stale_temps

log = logging.getLogger(__name__)

PARAMS_FILE = "synthetic-params.json"
_N_FACTORS = 16
_BLOCK = 8192  # rows generated at a time (keeps temporaries in cache)
# Fields that define the generated data (path / normalize / eval_rows don't).
_DEFINING = (
    "width",
    "n_features",
    "mean_active",
    "decay",
    "noise",
    "correlation",
    "rows",
    "seed",
    "rows_per_chunk",
    "dtype",
)


def generator_params(cfg: SyntheticDataConfig) -> dict:
    d = asdict(cfg)
    return {k: d[k] for k in _DEFINING}


def firing_probabilities(n_features: int, mean_active: float, decay: float) -> torch.Tensor:
    """p_i = min(1, c * decay**i) with c chosen (bisection) so that sum(p) = mean_active."""
    base = torch.tensor([decay**i for i in range(n_features)], dtype=torch.float64)
    lo, hi = 0.0, mean_active / float(base.min()) + 1.0
    for _ in range(200):
        mid = (lo + hi) / 2
        if float(torch.clamp(base * mid, max=1.0).sum()) < mean_active:
            lo = mid
        else:
            hi = mid
    return torch.clamp(base * hi, max=1.0)


class SyntheticSource:
    """The fixed parts of a synthetic distribution: features, probabilities, factor loadings."""

    def __init__(self, cfg: SyntheticDataConfig) -> None:
        self.cfg = cfg
        g = torch.Generator().manual_seed(cfg.seed)
        feats = torch.randn(cfg.n_features, cfg.width, generator=g, dtype=torch.float64)
        self.features = (feats / feats.norm(dim=1, keepdim=True)).float()  # (F, d) unit rows
        self.p = firing_probabilities(cfg.n_features, cfg.mean_active, cfg.decay)  # (F,)
        self.p_float = self.p.float()
        self.threshold = torch.special.ndtri(1 - self.p).float()  # (F,) z > t  <=>  fires
        load = torch.randn(cfg.n_features, _N_FACTORS, generator=g)
        self.loadings = load / load.norm(dim=1, keepdim=True)  # (F, k) unit rows

    def sample(self, rows: int, chunk: int) -> torch.Tensor:
        """(rows, d) activations for chunk ``chunk``; depends only on (seed, chunk)."""
        g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + chunk + 1)
        blocks = [self._block(min(_BLOCK, rows - at), g) for at in range(0, rows, _BLOCK)]
        return torch.cat(blocks)

    def _block(self, n: int, g: torch.Generator) -> torch.Tensor:
        cfg = self.cfg
        if cfg.correlation > 0:
            eps = torch.randn(n, cfg.n_features, generator=g)  # (n, F)
            shared = torch.randn(n, _N_FACTORS, generator=g) @ self.loadings.T  # (n, k) -> (n, F)
            z = math.sqrt(1 - cfg.correlation) * eps + math.sqrt(cfg.correlation) * shared
            active = z > self.threshold  # (n, F)
        else:
            active = torch.rand(n, cfg.n_features, generator=g) < self.p_float  # (n, F)
        codes = torch.zeros(n, cfg.n_features)  # (n, F)
        codes[active] = 1.0 - torch.rand(int(active.sum()), generator=g)  # magnitudes in (0, 1]
        x = codes @ self.features  # (n, F) @ (F, d) -> (n, d)
        if cfg.noise > 0:
            x += cfg.noise * torch.randn(n, cfg.width, generator=g)
        return x


def ensure_synthetic_store(cfg: SyntheticDataConfig, path: str | Path) -> ChunkStore:
    """Open the store at ``path`` if it was generated with these parameters, else generate it.

    A complete store made with other parameters is never overwritten (error); an incomplete
    one made with other parameters is cleared; an incomplete one with the same parameters is
    resumed at its first missing chunk.
    """
    path = Path(path)
    params = generator_params(cfg)
    if (path / MANIFEST).exists():
        store = ChunkStore(path)
        old = store.provenance.get("params", {})
        if store.provenance.get("source") != "synthetic" or old != params:
            diff = sorted(k for k in params if old.get(k) != params[k])
            raise StoreError(
                f"store {path} exists but was made with different data parameters "
                f"({', '.join(diff) or 'not synthetic'}); use another data.path or delete it"
            )
        log.info("reusing synthetic store %s", path)
        return store
    if path.exists() and any(path.iterdir()):
        marker = path / PARAMS_FILE
        if not marker.exists() or json.loads(marker.read_text()) != params:
            if not marker.exists():
                raise StoreError(
                    f"data.path {path} is a non-empty folder that is not a sweep store; "
                    "choose an empty or new folder"
                )
            shutil.rmtree(path)
    return _generate(cfg, path, params)


def _generate(cfg: SyntheticDataConfig, path: Path, params: dict) -> ChunkStore:
    writer = StoreWriter(path, cfg.width, cfg.dtype, cfg.rows_per_chunk)
    remove_stale_temps(path)  # of a generation killed midway (the sweep's lock is held)
    atomic_write_json(path / PARAMS_FILE, params)
    source = SyntheticSource(cfg)
    n_chunks = math.ceil(cfg.rows / cfg.rows_per_chunk)
    from tqdm.auto import tqdm

    for i in tqdm(range(n_chunks), desc="generating synthetic store", unit="chunk", leave=False):
        if writer.has_chunk(i):
            continue
        rows = min(cfg.rows_per_chunk, cfg.rows - i * cfg.rows_per_chunk)
        writer.write_chunk(i, source.sample(rows, i))
    atomic_write_bytes(
        path / GROUND_TRUTH, save({"features": source.features, "p": source.p.float()})
    )
    stats = {"feature_probability_sum": float(source.p.sum())}
    writer.finalize(n_chunks, {"source": "synthetic", "params": params, **stats})
    log.info("generated synthetic store %s (%d rows)", path, cfg.rows)
    return ChunkStore(path)
