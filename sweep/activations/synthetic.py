"""Synthetic activations with known ground-truth features (Sharkey et al. 2022 style).

Each row is a sparse non-negative combination of ``n_features`` random unit-norm directions
in ``width`` dimensions: feature ``i`` fires with probability ``p_i`` proportional to
``decay**i`` (scaled so ``sum(p) = mean_active``), with a magnitude uniform in (0, 1].
Firing can be correlated through a Gaussian copula (``correlation`` c in [0, 1)): feature
``i`` fires when ``z_i > t_i = ndtri(1 - p_i)`` with ``z = sqrt(1-c) * eps + sqrt(c) * s``,
``s = L g`` for 16 shared latent factors ``g`` per row, which keeps every marginal ``p_i``.
Optional Gaussian noise of std ``noise`` is added to every element.

How it is sampled (generator version 2), a block of rows at a time, with work proportional
to the rows times the *active* features (about ``mean_active``), not times ``n_features``:

- Independent features: the rows where feature ``i`` fires are a Bernoulli(p_i) process,
  drawn as geometric gaps ``floor(log(1-u) / log(1-p_i)) + 1`` between successes (float64).
  Each feature draws its expected count plus two standard deviations of gaps at once; the
  few features whose gaps fall short of the block's end draw more (a deterministic loop).
- Correlated features: given ``g``, features fire independently with probability
  ``1 - Phi(a_i)``, ``a_i = (t_i - sqrt(c) s_i) / sqrt(1-c)`` (that is ``eps_i > a_i``, i.e.
  ``z_i > t_i``). A split point ``h_i`` per feature (chosen once, to make the work below
  smallest) divides the (row, feature) pairs. Where ``s_i > h_i`` ("likely") a pair fires
  with probability ``1 - Phi(a_i)``. Elsewhere that probability is below
  ``r_i = 1 - Phi(A_i)``, ``A_i`` the ``a_i`` at ``s_i = h_i``: candidates are drawn as a
  Bernoulli(r_i) process (above), each kept with probability ``(1 - Phi(a_i)) / r_i``
  (exact thinning). One uniform per pair decides. The only dense work is one pass
  ``x = [g, 1] @ [L, -h]^T = s - h`` over cache-sized slices of rows: it finds the likely
  pairs (``x > 0``) and gives every pair, likely or candidate, its ``s`` (one value per
  pair, so the two regions never overlap).
- Decoding: the (row, feature) pairs are sorted row-major, magnitudes ``1 - u`` drawn, and
  rows summed sparsely with ``embedding_bag`` (no dense ``(rows, n_features)`` codes).
- Noise: one ``randn`` per block from a second generator, so noise never shifts the codes.

The same code runs on the CPU and on a CUDA device (``device``). Every chunk is generated
from generators seeded by ``(seed, chunk)``: the same (seed, chunk, device type — and on CUDA
GPU model, on the CPU its instruction set: torch's ``randn`` gives other bits without AVX2
or on ARM) gives the same bits whatever was generated before, and an interrupted generation
resumes at its first missing chunk (on another GPU model or kind of CPU it starts over). CPU and CUDA stores
hold the same distribution but different bits; the manifest's provenance records the
generator (version, device, GPU model, algorithm).
"""

from __future__ import annotations

import hashlib
import logging
import math
import shutil
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save
from torch.special import ndtr, ndtri

from sweep.activations.layout import SYNTHETIC_PARAMS
from sweep.activations.store import (
    GROUND_TRUTH,
    MANIFEST,
    ChunkStore,
    StoreWriter,
    writer_threads,
)
from sweep.config import SyntheticDataConfig
from sweep.devices import host_memory_bytes, release_device_memory, resolve_device
from sweep.errors import StoreError, out_of_memory
from sweep.io import (
    STALE_TEMP_SECONDS,
    atomic_write_bytes,
    atomic_write_json,
    begun,
    check_disk_space,
    flock_held,
    json_dict,
    remove_stale_temps,
)
from sweep.progress import progress_bar

log = logging.getLogger(__name__)

PARAMS_FILE = SYNTHETIC_PARAMS
GENERATOR_VERSION = 2
ALGORITHM = (
    "geometric-gap Bernoulli processes per feature; copula by a dense likely-set pass plus "
    "thinned candidates; sparse embedding_bag decode; noise from its own generator"
)
_N_FACTORS = 16
_BLOCK = {"cpu": 8192, "cuda": 131072}  # rows sampled at a time
_DENSE = {"cpu": 1 << 20, "cuda": 1 << 26}  # (rows, F) elements per slice of the dense pass
_GAP_SIGMAS = 2.0  # gaps drawn per feature and round: mean + this many standard deviations
_MARGIN = 1e-4  # r is taken at h + _MARGIN: a bound on firing even for s rounded up to h
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


SOURCE_BYTES_PER_FEATURE = (24, 320)
"""Host bytes per ground-truth feature while a generator is built: ``24 * width + 320``
(float64 directions and their normalised copy, float32 ones, per-feature probabilities,
thresholds, factor loadings and a device's tables)."""


def check_memory(cfg: SyntheticDataConfig) -> None:
    """Refuse (before any work) ground-truth features whose tables alone would not fit in half
    of the host memory this process may use."""
    per_dim, fixed = SOURCE_BYTES_PER_FEATURE
    need = cfg.n_features * (per_dim * cfg.width + fixed)
    have = host_memory_bytes()
    if need > have / 2:
        raise StoreError(
            f"data.n_features={cfg.n_features:,} at data.width={cfg.width} needs about "
            f"{need / 2**30:.1f} GiB of host memory for the generator's feature tables alone, "
            f"over half of the {have / 2**30:.1f} GiB this process may use; lower "
            "data.n_features (or data.width)"
        )


def check_resources(cfg: SyntheticDataConfig, path: Path) -> None:
    """Refuse (before any work) a store whose generator would not fit in memory or whose
    chunks would not fit on the disk that holds ``path``."""
    check_memory(cfg)
    nbytes = cfg.rows * cfg.width * getattr(torch, cfg.dtype).itemsize
    check_disk_space(
        {path: nbytes}, "lower data.rows, free space, or pass data.path=<a folder on a larger disk>"
    )


def generator_params(cfg: SyntheticDataConfig) -> dict:
    d = asdict(cfg)
    return {k: d[k] for k in _DEFINING}


def generator_info(device: str | torch.device) -> dict:
    """How a store is generated: recorded in its manifest and in its incomplete-store marker.
    On CUDA the GPU model too: CUDA random streams depend on the launch grid, which depends on
    the number of multiprocessors, so another model would resume with other bits."""
    dev = torch.device(device)
    info = {"version": GENERATOR_VERSION, "device": dev.type, "algorithm": ALGORITHM}
    if dev.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(dev)
    return info


def marker_generator(device: torch.device) -> dict:
    """:func:`generator_info` and, on the CPU, torch's CPU capability (its instruction set:
    ``randn`` gives other bits without AVX2, or on ARM), for the incomplete-store marker
    only: a generation resumed on another kind of CPU would mix chunks of two bit streams.
    (Not in the manifest, whose hash is the store's identity: the same bits made on another
    node are the same store.)"""
    info = generator_info(device)
    if device.type == "cpu":
        info["cpu"] = getattr(torch.backends.cpu, "get_cpu_capability", lambda: "unknown")()
    return info


def _same_generator(was: object, now: dict) -> bool:
    """Whether an incomplete store's recorded generator is this one (a marker written before
    the CPU capability was recorded is taken as this CPU's)."""
    return isinstance(was, dict) and {**was, "cpu": was.get("cpu", now.get("cpu"))} == {
        **now,
        "cpu": now.get("cpu"),
    }


def _generator_text(info: dict) -> str:
    """E.g. ``cpu (AVX2, generator version 2)``, ``cuda (NVIDIA H200, generator version 2)``."""
    if not info.get("device"):
        return "an earlier generator"
    kind = info.get("gpu") or info.get("cpu")
    return f"{info.get('device')} ({kind + ', ' if kind else ''}generator version {info.get('version')})"


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


class Codes(NamedTuple):
    """Ground-truth codes of some rows, sorted by row then feature: row ``row[j]`` holds
    ``value[j]`` times feature ``feature[j]``."""

    row: torch.Tensor  # (M,) int64
    feature: torch.Tensor  # (M,) int64
    value: torch.Tensor  # (M,) float32 in (0, 1]


def bernoulli_successes(
    p: torch.Tensor, n: int, g: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, feature) of every success of independent Bernoulli(p_f) trials on rows 0..n-1
    for every feature f (p: (F,) float64 in [0, 1]), unsorted; draws ~ n * sum(p) numbers."""
    log_q = torch.log1p(-p)  # (F,) -inf where p = 1
    last = torch.full(p.shape, -1, dtype=torch.int64, device=p.device)  # (F,) last success row
    todo = (p > 0).nonzero().squeeze(1)  # features whose process has not passed row n-1 yet
    rows, feats = [], []
    while todo.numel():
        pos, feat, end = _gap_round(p[todo], log_q, todo, last[todo], n, g)
        keep = pos < n
        rows.append(pos[keep])
        feats.append(feat[keep])
        short = end < n  # drew too few gaps to pass the block's end: draw more next round
        last[todo[short]] = end[short]
        todo = todo[short]
    if not rows:
        empty = torch.zeros(0, dtype=torch.int64, device=p.device)
        return empty, empty
    return torch.cat(rows), torch.cat(feats)


def _gap_round(
    p: torch.Tensor,
    log_q: torch.Tensor,
    todo: torch.Tensor,
    last: torch.Tensor,
    n: int,
    g: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Success positions after ``last`` for the features ``todo`` (T,), a batch of gaps each:
    (pos (M,), feature (M,), last position drawn per feature (T,))."""
    mu = (n - 1 - last).double() * p  # (T,) expected successes left
    m = (mu + _GAP_SIGMAS * mu.sqrt()).floor().long() + 1  # (T,) gaps drawn, >= 1
    feat = torch.repeat_interleave(todo, m)  # (M,)
    u = torch.rand(feat.shape, generator=g, dtype=torch.float64, device=p.device)  # [0, 1)
    gap = (torch.log1p(-u) / log_q[feat]).clamp_(max=n).floor_().long() + 1  # (M,) >= 1
    total = gap.cumsum(0)  # (M,) int64: exact
    ends = m.cumsum(0)  # (T,) one past each feature's segment
    before = torch.cat([total.new_zeros(1), total[ends[:-1] - 1]])  # (T,) sum of earlier segments
    pos = total - torch.repeat_interleave(before - last, m)  # (M,) rows of the successes
    return pos, feat, pos[ends - 1]


def thinning_rates(t: torch.Tensor, h: torch.Tensor, c: float) -> torch.Tensor:
    """``1 - Phi((t - sqrt(c) h) / sqrt(1-c))``: the firing probability at s = h, a bound on
    it wherever s < h (t, h broadcast; float64)."""
    return ndtr(-(t - math.sqrt(c) * h) / math.sqrt(1 - c))


def split_points(t: torch.Tensor, c: float) -> torch.Tensor:
    """(F,) per feature, the split ``h`` between the likely region (s >= h, drawn exactly) and
    the thinned one that makes the expected pairs per row ``P(s >= h) + r`` smallest."""
    grid = torch.linspace(-6.0, 10.0, 1601, dtype=torch.float64)  # (G,)
    best = []
    for part in t.split(4096):  # bounded memory for many features
        work = ndtr(-grid) + thinning_rates(part[:, None], grid, c)  # (f, G) pairs per row
        best.append(grid[work.argmin(1)])
    return torch.cat(best)


def _flat_nonzero(mask: torch.Tensor) -> torch.Tensor:
    """(M,) flat indices of the True elements of a contiguous bool tensor (on the CPU through
    numpy, whose bool ``nonzero`` is several times faster than torch's on sparse masks)."""
    if mask.device.type != "cpu":
        return mask.reshape(-1).nonzero().squeeze(1)
    return torch.from_numpy(np.flatnonzero(mask.numpy())).long()


@dataclass(frozen=True)
class _Tables:
    """The fixed tensors a device samples from."""

    features: torch.Tensor  # (F, d) float32
    p: torch.Tensor  # (F,) float64
    t: torch.Tensor  # (F,) float64 copula thresholds
    h: torch.Tensor  # (F,) float64 split points, float32 values (correlated only)
    r: torch.Tensor  # (F,) float64 candidate rates: p when features are independent
    dense: torch.Tensor  # (k+1, F) float32: [g, 1] @ dense = s - h


def _generators(seed: int, chunk: int, device: torch.device) -> tuple[torch.Generator, ...]:
    """The (codes, noise) generators of chunk ``chunk``: seeded by (seed, chunk) alone."""
    words = np.random.SeedSequence([seed % 2**64, chunk]).generate_state(2, np.uint64)
    return tuple(torch.Generator(device=device).manual_seed(int(w) & (2**63 - 1)) for w in words)


def decode(codes: Codes, features: torch.Tensor, n: int) -> torch.Tensor:
    """(n, d) rows: sum of value * feature over each row's codes (empty rows are zero)."""
    ends = torch.bincount(codes.row, minlength=n).cumsum(0)  # (n,) codes sorted by row
    starts = torch.cat([ends.new_zeros(1), ends[:-1]])  # (n,) each row's first code
    return F.embedding_bag(
        codes.feature, features, starts, mode="sum", per_sample_weights=codes.value
    )  # (n, d)


def _sorted_keys(row: torch.Tensor, feature: torch.Tensor, n_features: int) -> torch.Tensor:
    """(M,) the distinct keys ``row * n_features + feature`` of (row, feature) pairs, sorted
    (on the CPU by numpy, several times faster than torch's sort here)."""
    key = row * n_features + feature  # (M,)
    if key.device.type != "cpu":
        return key.sort().values
    return torch.from_numpy(np.sort(key.numpy()))


def _sorted_codes(
    row: torch.Tensor, feature: torch.Tensor, n_features: int, g: torch.Generator
) -> Codes:
    """Sort (row, feature) pairs row-major and draw their magnitudes, uniform in (0, 1]."""
    key = _sorted_keys(row, feature, n_features)  # (M,)
    row = key // n_features
    value = 1.0 - torch.rand(key.shape, generator=g, device=key.device)  # (M,) (0, 1]
    return Codes(row, key - row * n_features, value)


class SyntheticSource:
    """The fixed parts of a synthetic distribution: features, probabilities, factor loadings."""

    def __init__(self, cfg: SyntheticDataConfig) -> None:
        self.cfg = cfg
        g = torch.Generator().manual_seed(cfg.seed)
        feats = torch.randn(cfg.n_features, cfg.width, generator=g, dtype=torch.float64)
        self.features = (feats / feats.norm(dim=1, keepdim=True)).float()  # (F, d) unit rows
        self.p = firing_probabilities(cfg.n_features, cfg.mean_active, cfg.decay)  # (F,)
        self.p_float = self.p.float()
        self.threshold = ndtri(1 - self.p).float()  # (F,) z > t  <=>  fires
        load = torch.randn(cfg.n_features, _N_FACTORS, generator=g)
        self.loadings = load / load.norm(dim=1, keepdim=True)  # (F, k) unit rows
        self._tables: dict[torch.device, _Tables] = {}

    def sample(self, rows: int, chunk: int, device: str | torch.device = "cpu") -> torch.Tensor:
        """(rows, d) float32 activations of chunk ``chunk`` on ``device``; depends only on
        (seed, chunk, rows, device type)."""
        dev = torch.device(device)
        tab = self._on(dev)
        codes_g, noise_g = _generators(self.cfg.seed, chunk, dev)
        blocks = _blocks(rows, dev)
        out = None if len(blocks) == 1 else torch.empty(rows, self.cfg.width, device=dev)
        for at, n in blocks:
            x = decode(self._block_codes(n, tab, codes_g), tab.features, n)  # (n, d)
            if self.cfg.noise > 0:
                eps = torch.randn(n, self.cfg.width, generator=noise_g, device=dev)  # (n, d)
                x.add_(eps, alpha=self.cfg.noise)
            if out is None:  # one block (a chunk on a GPU): no second copy of the chunk
                return x
            out[at : at + n] = x
        return out

    def codes(self, rows: int, chunk: int, device: str | torch.device = "cpu") -> Codes:
        """The ground-truth codes of :meth:`sample`'s rows (the same draws, without noise)."""
        dev = torch.device(device)
        tab = self._on(dev)
        codes_g, _ = _generators(self.cfg.seed, chunk, dev)
        blocks = _blocks(rows, dev)
        parts = [self._block_codes(n, tab, codes_g) for _, n in blocks]
        return Codes(
            torch.cat([c.row + at for c, (at, _) in zip(parts, blocks, strict=True)]),
            torch.cat([c.feature for c in parts]),
            torch.cat([c.value for c in parts]),
        )

    def _block_codes(self, n: int, tab: _Tables, g: torch.Generator) -> Codes:
        if self.cfg.correlation > 0:
            row, feat = self._correlated(n, tab, g)
        else:
            row, feat = bernoulli_successes(tab.p, n, g)
        return _sorted_codes(row, feat, self.cfg.n_features, g)

    def _correlated(
        self, n: int, tab: _Tables, g: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(row, feature) of the firings of n copula rows: likely pairs drawn exactly, the
        rest as thinned Bernoulli(r) candidates (see the module docstring)."""
        c, nf = self.cfg.correlation, self.cfg.n_features
        factors = torch.randn(n, _N_FACTORS, generator=g, device=tab.p.device)  # (n, k)
        g1 = torch.cat([factors, factors.new_ones(n, 1)], 1)  # (n, k+1)
        key = _sorted_keys(*bernoulli_successes(tab.r, n, g), nf)  # (C,) candidates
        cand_row = key // nf
        like_row, like_feat, like_x, cand_x = self._dense_pass(g1, tab, cand_row, key % nf)
        row, feat = torch.cat([like_row, cand_row]), torch.cat([like_feat, key % nf])  # (P,)
        x = torch.cat([like_x, cand_x])  # (P,) s - h
        likely = torch.arange(x.numel(), device=x.device) < like_x.numel()  # (P,)
        s = x.double() + tab.h[feat]  # (P,)
        a = (tab.t[feat] - math.sqrt(c) * s) / math.sqrt(1 - c)  # (P,) fires iff eps > a
        u = torch.rand(s.shape, generator=g, dtype=torch.float64, device=s.device)  # (P,)
        rate = torch.where(likely, 1.0, tab.r[feat])  # (P,) likely: u < 1 - Phi(a) is eps > a
        fire = (likely | (x <= 0)) & (u * rate < ndtr(-a))  # x > 0: among the likely
        return row[fire], feat[fire]

    def _dense_pass(
        self, g1: torch.Tensor, tab: _Tables, cand_row: torch.Tensor, cand_feat: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        """x = s - h over slices of rows small enough to stay in cache: (row, feature, x) of
        the likely pairs (x > 0), and x of each candidate (cand_row sorted)."""
        n, nf = g1.shape[0], self.cfg.n_features
        step = min(n, max(1, _DENSE.get(g1.device.type, _DENSE["cuda"]) // nf))  # rows
        x_buf = torch.empty(step, nf, device=g1.device)  # reused: no page faults per slice
        mask_buf = torch.empty(step, nf, dtype=torch.bool, device=g1.device)
        starts = torch.arange(0, n + step, step, device=g1.device).clamp_(max=n)
        bounds = torch.searchsorted(cand_row, starts).tolist()  # candidates of each slice
        rows, feats, xs, cand_xs = [], [], [], []
        for j, at in enumerate(range(0, n, step)):
            m = min(step, n - at)
            x = torch.mm(g1[at : at + m], tab.dense, out=x_buf[:m]).view(-1)  # (m*F,)
            lo, hi = bounds[j], bounds[j + 1]
            cand_xs.append(x[(cand_row[lo:hi] - at) * nf + cand_feat[lo:hi]])
            x.clamp_min_(0)  # then bool(x) = x > 0: cheaper than a comparison on the CPU
            idx = _flat_nonzero(mask_buf[:m].copy_(x_buf[:m]))  # (M,) likely pairs
            rows.append(at + idx // nf)
            feats.append(idx % nf)
            xs.append(x[idx])
        return torch.cat(rows), torch.cat(feats), torch.cat(xs), torch.cat(cand_xs)

    def _on(self, device: torch.device) -> _Tables:
        """The tables on ``device`` (made once per device)."""
        if device not in self._tables:
            p, t, c = self.p, ndtri(1 - self.p), self.cfg.correlation  # (F,) float64
            h = split_points(t, c).float() if c > 0 else torch.zeros(p.shape)  # (F,) float32
            r = thinning_rates(t, h.double() + _MARGIN, c) if c > 0 else p  # (F,)
            dense = torch.cat([self.loadings, -h[:, None]], 1).T.contiguous()  # (k+1, F)
            tab = _Tables(self.features, p, t, h.double(), r, dense)
            self._tables[device] = _Tables(**{k: v.to(device) for k, v in vars(tab).items()})
        return self._tables[device]


def _blocks(rows: int, device: torch.device) -> list[tuple[int, int]]:
    """(first row, rows) of each block a chunk is sampled in."""
    size = _BLOCK.get(device.type, _BLOCK["cuda"])
    return [(at, min(size, rows - at)) for at in range(0, rows, size)]


def _begun_params(path: Path) -> dict:
    """What an incomplete store was begun with (``{}`` when its marker is damaged; an error
    reading it is raised, not taken for other settings: the store would be cleared)."""
    return json_dict(path / PARAMS_FILE, strict=True)


def _differing(old: dict, new: dict) -> list[str]:
    """The data parameters (not the generator) an incomplete store was begun with otherwise."""
    return sorted(k for k in set(old) | set(new) if k != "generator" and old.get(k) != new.get(k))


def refuse_begun(
    cfg: SyntheticDataConfig, path: Path, owned: bool, generator: dict | None = None
) -> None:
    """Refuse an incomplete store at ``path`` begun with other parameters (or, ``generator``
    given, by another generator) unless the sweep owns the folder (reads only): it may be
    another sweep's, still generating."""
    if owned or not begun(path) or (path / MANIFEST).exists():
        return
    old, new = _begun_params(path), generator_params(cfg)
    diff, was = _differing(old, new), old.get("generator")
    if not diff and generator is not None and isinstance(was, dict):
        if not _same_generator(was, generator):
            raise StoreError(
                f"data.path {path} holds an incomplete synthetic store begun on "
                f"{_generator_text(was)}, whose data differ bit-wise from this machine's "
                f"({_generator_text(generator)}); finish it where it was begun, use another "
                "data.path, or delete that folder to generate it here"
            )
    if not diff:
        return
    what, fix = f"whose {PARAMS_FILE} is damaged", ""
    if old:
        shown = ", ".join(f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in diff)
        what = f"made with other data parameters ({shown})"
        fix = "pass its values to finish it, "
    raise StoreError(
        f"data.path {path} holds an incomplete synthetic store {what}; {fix}use another "
        "data.path, or delete that folder to generate it anew"
    )


def _clear_begun(path: Path, old: dict, new: dict) -> None:
    """Clear an incomplete store begun otherwise (the caller refused what it may not clear):
    with other parameters, or by another generator (e.g. the GPU's where this one runs on
    the CPU; its chunks so far are lost, said aloud)."""
    was, now = old.get("generator", {}), new["generator"]
    if _differing(old, new):
        log.info("clearing incomplete synthetic store %s (other parameters)", path)
    else:
        log.warning(
            "clearing incomplete synthetic store %s: it was being generated on %s and is now "
            "generated on %s, whose data differ bit-wise",
            path, _generator_text(was), _generator_text(now),
        )  # fmt: skip
    shutil.rmtree(path)


def existing_store(cfg: SyntheticDataConfig, path: Path) -> ChunkStore | None:
    """The complete store at ``path`` if these parameters made it; None when there is none
    yet (or it is incomplete); refused: a store made otherwise, or a folder that is no store."""
    params = generator_params(cfg)
    if (path / MANIFEST).exists():
        store = ChunkStore(path)
        old = store.provenance.get("params", {})
        source = store.provenance.get("source")
        if source != "synthetic":
            raise StoreError(
                f"store {path} is not a synthetic store (its source: {source or 'unknown'}); "
                "train on it with data=chunks data.path=..., or pass another data.path"
            )
        if old != params:
            diff = sorted(k for k in params if old.get(k) != params[k])
            raise StoreError(
                f"store {path} exists but was made with different data parameters "
                f"({', '.join(diff)}); give data.path a new folder or the store these "
                f"parameters made (delete {path} only if no other sweep trains on it)"
            )
        return store
    if begun(path) and not (path / PARAMS_FILE).exists():  # (a stop inside its first write: no)
        raise StoreError(
            f"data.path {path} is a non-empty folder that is not a sweep store; "
            "choose an empty or new folder"
        )
    return None


def ensure_synthetic_store(
    cfg: SyntheticDataConfig,
    path: str | Path,
    device: str | torch.device = "cpu",
    progress: bool = True,
    owned: bool = False,
) -> ChunkStore:
    """Open the store at ``path`` if it was generated with these parameters, else generate it
    (on ``device``: "cpu", "cuda", or "auto" for this machine's GPU when it has one — resolved
    only when generating, so reusing a store never starts a CUDA context).

    A complete store made with other parameters is never overwritten (error); a complete one
    with these parameters is reused whichever generator made it. An incomplete one made by
    another generator version or device type is cleared; one made with other parameters is
    cleared when ``owned`` (the sweep's own folder, under its lock), else refused; else it is
    resumed at its first missing chunk.
    """
    path = Path(path)
    store = existing_store(cfg, path)
    if store is not None:
        log.info("reusing synthetic store %s", path)
        return store
    with _generating(path):
        return _make(cfg, path, device, progress, owned)


@contextmanager
def _generating(path: Path) -> Iterator[None]:
    """Hold the store's folder (made if needed) while one process generates it: a second sweep
    on the same ``data.path`` waits, then reuses (or refuses, one line) what the first made,
    instead of both writing one folder (mixing chunks of two seeds, or clearing each other's
    writes). An ``fcntl.flock`` of the folder, released by the kernel when the process dies;
    a file system without flock is not locked, and a folder that cannot be made is left to
    the writer's own error."""
    with suppress(OSError):
        path.mkdir(parents=True, exist_ok=True)
    waits = "another process is generating the synthetic store %s; waiting for it"
    with flock_held(path, busy=lambda: log.warning(waits, path)):
        yield


def _make(
    cfg: SyntheticDataConfig,
    path: Path,
    device: str | torch.device,
    progress: bool,
    owned: bool,
) -> ChunkStore:
    """:func:`ensure_synthetic_store` under :func:`_generating`: reuse what the process waited
    for made, else generate (clearing or refusing an incomplete store as it says)."""
    store = existing_store(cfg, path)
    if store is not None:
        log.info("reusing synthetic store %s", path)
        return store
    check_resources(cfg, path)
    device = resolve_device(device) if isinstance(device, str) else device
    marker = {**generator_params(cfg), "generator": marker_generator(device)}
    refuse_begun(cfg, path, owned, marker["generator"])
    if begun(path):
        old = _begun_params(path)
        if _differing(old, marker) or not _same_generator(
            old.get("generator"), marker["generator"]
        ):
            _clear_begun(path, old, marker)
    try:
        store = _generate(cfg, path, marker, device, progress, owned)
    except Exception as err:
        kind = out_of_memory(err)
        if kind is None:
            raise
        where = "host memory" if kind == "host" else f"memory on {device}"
        raise StoreError(
            f"generating the synthetic store ran out of {where} (chunks of "
            f"{min(cfg.rows_per_chunk, cfg.rows):,} rows x width {cfg.width}); lower "
            "data.rows_per_chunk (the chunks written so far are kept)"
        ) from err
    release_device_memory()  # the tables and blocks are gone: leave the memory to training
    return store


def _generate(
    cfg: SyntheticDataConfig,
    path: Path,
    marker: dict,
    device: torch.device,
    progress: bool,
    owned: bool,
) -> ChunkStore:
    source = SyntheticSource(cfg)
    sizes = chunk_rows(cfg)
    with StoreWriter(
        path, cfg.width, cfg.dtype, cfg.rows_per_chunk, threads=writer_threads()
    ) as writer:  # creates the folder
        # of a generation killed midway: in the sweep's own folder any (its lock is held),
        # elsewhere only old ones (another sweep may be writing there)
        remove_stale_temps(path, older_than=0.0 if owned else STALE_TEMP_SECONDS)
        atomic_write_json(path / PARAMS_FILE, marker)
        _write_chunks(source, writer, sizes, device, progress)
        truth = save({"features": source.features, "p": source.p.float()})
        atomic_write_bytes(path / GROUND_TRUTH, truth)
        params = {k: v for k, v in marker.items() if k != "generator"}
        stats = {
            "feature_probability_sum": float(source.p.sum()),
            "ground_truth_sha256": hashlib.sha256(truth).hexdigest(),
        }
        provenance = {"source": "synthetic", "params": params, "generator": generator_info(device)}
        writer.finalize(len(sizes), {**provenance, **stats})
    log.info("generated synthetic store %s (%d rows) on %s", path, cfg.rows, device.type)
    return ChunkStore(path)


def chunk_rows(cfg: SyntheticDataConfig) -> list[int]:
    """The rows of each chunk of the store ``cfg`` makes (the last one may be short)."""
    return [min(cfg.rows_per_chunk, cfg.rows - at) for at in range(0, cfg.rows, cfg.rows_per_chunk)]


def _write_chunks(
    source: SyntheticSource,
    writer: StoreWriter,
    sizes: list[int],
    device: torch.device,
    progress: bool = True,
) -> None:
    """Sample and hand over the chunks (of ``sizes`` rows) not yet on disk; the writer's
    threads hash and write one while the next is sampled (stats are taken on ``device``,
    before the copy to the CPU)."""
    bar = progress_bar(
        range(len(sizes)),
        desc="generating synthetic store",
        unit="chunk",
        leave=False,
        disable=not progress,
    )
    for i in bar:
        if writer.has_chunk(i):
            continue
        writer.write_chunk(i, source.sample(sizes[i], i, device))  # (rows, d) on device
