"""What every section shares: the SAE sizes, the full / quick settings, the synthetic stores,
and the :class:`Context` each section is called with."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from sweep.activations.store import ChunkStore
from sweep.activations.synthetic import ensure_synthetic_store
from sweep.config import SyntheticDataConfig

from .timing import Timer


@dataclass(frozen=True)
class Size:
    name: str
    d: int
    m: int
    batch: int

    @property
    def ratio(self) -> float:
        return self.m / self.d


SMALL = Size("small", 128, 512, 1024)
LARGE = Size("large", 512, 2048, 4096)


@dataclass(frozen=True)
class Settings:
    min_time: float
    """Seconds each timed measurement runs at least."""
    repeats: int
    """Interleaved repeats per variant (the median is reported)."""
    small_k: tuple[int, ...]
    large_k: tuple[int, ...]
    store_rows: int
    """Rows of the streaming store (sections 3 and 5)."""
    store_chunk: int
    eval_rows: int
    ckpt_chunk: int
    """Rows per chunk of the checkpoint store (section 4): the synthetic default."""
    ckpt_seconds: float
    """Target length of one section-4 training run."""
    ckpt_repeats: int
    ckpt_periodic: int
    """Periodic checkpoints the section-4 policy aims for within one run (``checkpoint_every``
    is set from the run's length to give about this many)."""
    ray_seconds: float
    """Target length of one section-5 ensemble (alone, one thread)."""
    ray_ensembles: int
    stall_latents: int = 24_576
    """Latents of section 4's one-member write (width 768): 453 MB of state at 24,576."""
    feed_chunk: int = 65_536
    """Rows per chunk of the feed stores (section 3's stream-alone rates, fp16)."""
    feed_chunks: int = 3


FULL = Settings(
    min_time=1.0, repeats=3, small_k=(4, 8, 16), large_k=(2, 4),
    store_rows=300_000, store_chunk=65_536, eval_rows=16_384,
    ckpt_chunk=SyntheticDataConfig().rows_per_chunk, ckpt_seconds=20.0, ckpt_repeats=3,
    ckpt_periodic=4, ray_seconds=30.0, ray_ensembles=4,
)  # fmt: skip
QUICK = Settings(
    min_time=0.1, repeats=1, small_k=(8,), large_k=(2,),
    store_rows=40_000, store_chunk=8_192, eval_rows=4_096,
    ckpt_chunk=16_384, ckpt_seconds=1.0, ckpt_repeats=1,
    ckpt_periodic=2, ray_seconds=1.5, ray_ensembles=4, feed_chunk=8_192, feed_chunks=2,
    stall_latents=2_048,
)  # fmt: skip
FEED_WIDTHS = (512, 2304)
"""Issue 9's widths for the stream-alone rate (targets 5M and 1M rows/s on a GPU)."""


def make_store(
    path: Path, rows: int, chunk: int, eval_rows: int, width: int = SMALL.d, dtype: str = "float32"
) -> ChunkStore:
    cfg = SyntheticDataConfig(
        width=width,
        n_features=SMALL.m if width == SMALL.d else 4 * width,
        rows=rows,
        rows_per_chunk=chunk,
        eval_rows=eval_rows,
        seed=0,
        dtype=dtype,
    )
    store = ensure_synthetic_store(cfg, path)
    store.verify()  # as `sweep run` does before training (the stream then skips per-chunk scans)
    return store


class Stores:
    """The synthetic stores, generated on first use (never inside a timed region)."""

    def __init__(self, root: Path, st: Settings) -> None:
        self.root, self.st = root, st
        self.made: dict[str, ChunkStore] = {}

    def get(self, kind: str) -> ChunkStore:
        """``stream``: many small chunks; ``ckpt``: two full training chunks of the synthetic
        default size, then the eval rows; ``feed-<width>``: fp16 chunks of that width."""
        st = self.st
        if kind not in self.made and kind.startswith("feed-"):
            rows = st.feed_chunks * st.feed_chunk + st.eval_rows
            path, width = self.root / f"store-{kind}", int(kind.split("-")[1])
            self.made[kind] = make_store(path, rows, st.feed_chunk, st.eval_rows, width, "float16")
        if kind not in self.made:
            if kind == "stream":
                rows, chunk = st.store_rows, st.store_chunk
            else:
                rows, chunk = 2 * st.ckpt_chunk + st.eval_rows, st.ckpt_chunk
            self.made[kind] = make_store(self.root / f"store-{kind}", rows, chunk, st.eval_rows)
        return self.made[kind]


@dataclass
class Context:
    """Everything a section may use; each section is ``run(ctx) -> dict`` of its figures."""

    device: torch.device
    st: Settings
    threads: int
    """The torch thread count of the benchmark (a section that changes it restores it)."""
    tmp: Path
    """Scratch folder: stores, sweep dirs."""
    timer: Timer = field(init=False)
    stores: Stores = field(init=False)

    def __post_init__(self) -> None:
        self.timer, self.stores = Timer(self.device), Stores(self.tmp, self.st)
