"""Section 3, streamed vs in-memory: one ensemble trained from ``BatchStream`` over an on-disk
chunk store vs from a pre-shuffled tensor already in memory; and the stream alone (every
batch delivered to the device, no training) at issue 9's widths, fp16 stores; and the
synthetic generator alone (no store written) at width 512 on this device."""

from __future__ import annotations

from collections.abc import Callable

import torch

from sweep.activations.store import BatchStream, ChunkStore, Cursor
from sweep.activations.synthetic import SyntheticSource
from sweep.config import SyntheticDataConfig
from sweep.ensemble import Ensemble

from .common import FEED_WIDTHS, SMALL, Context
from .ensembles import init_members, l1_grid, make_ensemble
from .timing import Seconds, fmt_rate, med, speedup, table, verdict

K, TARGET = 8, 0.95


def in_memory_rows(stream: BatchStream, device: torch.device) -> torch.Tensor:
    """Every training row of the store, scaled and shuffled, as one (steps*B, d) tensor."""
    parts = [stream.store.read_rows(i, 0, r) for i, r in enumerate(stream.train_rows) if r > 0]
    x = torch.cat(parts).float() * stream.scale  # (rows, d)
    x = x[torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))]
    return x[: stream.total_steps * stream.batch_size].to(device).contiguous()


def sources(stream: BatchStream, x_mem: torch.Tensor) -> dict[str, Callable[[Ensemble], None]]:
    """Train an ensemble over every batch: from the stream, or from the in-memory tensor."""
    steps, bs = stream.total_steps, stream.batch_size

    def streamed(ens: Ensemble) -> None:
        for _, x in stream.batches(Cursor()):
            ens.step(x, full=False)

    def in_memory(ens: Ensemble) -> None:
        for i in range(steps):
            ens.step(x_mem[i * bs : (i + 1) * bs], full=False)

    return {"streamed": streamed, "in_memory": in_memory}


def run(ctx: Context) -> dict:
    made = generation(ctx)  # (first: it needs no store, and a cut run keeps its figure)
    store, size, device = ctx.stores.get("stream"), SMALL, ctx.device
    stream = BatchStream(store, size.batch, 0, 1, ctx.st.eval_rows, store.scale(True), device)
    steps, bs = stream.total_steps, size.batch
    x_mem = in_memory_rows(stream, device)  # (steps*B, d)
    members, l1s = init_members(size, K, device), l1_grid(K)
    warm = make_ensemble(members, l1s)
    for i in range(3):
        warm.step(x_mem[i * bs : (i + 1) * bs], full=False)
    secs: Seconds = {"streamed": [], "in_memory": []}
    for _ in range(ctx.st.repeats):
        for name, train in sources(stream, x_mem).items():
            ens = make_ensemble(members, l1s)  # fresh, identical start for every run
            secs[name].append(ctx.timer.wall(lambda train=train, ens=ens: train(ens)))
    alone = ctx.timer.wall(lambda: [None for _ in stream.batches(Cursor())])  # reading only
    feed = feed_alone(ctx)
    out = {**report(store, steps, bs, secs, alone), "feed": feed, "disk": disk_side(ctx)}
    return {**out, "generation": made}


GENERATION_TARGET = 2e6
"""Rows/s the synthetic generator must reach at width 512 on a GPU (issue 9)."""


def generation(ctx: Context) -> dict:
    """Rows/s of ``SyntheticSource.sample`` alone (one chunk of the default size, width 512,
    4 x 512 features, as section 6's store), on this device, the median of the repeats."""
    cfg = SyntheticDataConfig(width=512, n_features=2048)
    source, rows = SyntheticSource(cfg), cfg.rows_per_chunk
    source.sample(rows, 0, ctx.device)  # tables on the device, kernels warm
    draw = lambda: source.sample(rows, 1, ctx.device)  # noqa: E731
    secs = [ctx.timer.per_call(draw, ctx.st.min_time) for _ in range(ctx.st.repeats)]
    rate = rows / med(secs)
    ok = verdict(rate / GENERATION_TARGET, 1.0) if ctx.device.type == "cuda" else "GPU target"
    print(f"  synthetic generation alone on {ctx.device.type}, width 512, {rows} rows a chunk: "
          f"{fmt_rate(rate)} rows/s (>= {fmt_rate(GENERATION_TARGET)}: {ok})")  # fmt: skip
    return {"rows": rows, "seconds": secs, "rows_per_s": rate}


FEED_TARGETS = {512: 5e6, 2304: 1e6}
"""Rows/s the stream must deliver to a GPU alone (issue 9)."""


def feed_alone(ctx: Context) -> list[dict]:
    """Rows/s of the stream alone into the device at each width (page cache warm: one pass
    first), batch 4096, the median of the repeats."""
    out = []
    for width in FEED_WIDTHS:
        store = ctx.stores.get(f"feed-{width}")
        stream = BatchStream(store, 4096, 0, 1, ctx.st.eval_rows, 1.0, ctx.device)
        drain = lambda s=stream: [None for _ in s.batches(Cursor())]  # noqa: E731
        drain()
        secs = [ctx.timer.wall(drain) for _ in range(ctx.st.repeats)]
        rows = stream.total_steps * 4096
        out.append({"width": width, "rows": rows, "seconds": secs, "rows_per_s": rows / med(secs)})
    rows = []
    for r in out:
        target = FEED_TARGETS[r["width"]]
        ok = verdict(r["rows_per_s"] / target, 1.0) if ctx.device.type == "cuda" else "GPU target"
        rows.append([str(r["width"]), fmt_rate(r["rows_per_s"]), f">= {fmt_rate(target)}: {ok}"])
    print(f"  the stream alone into {ctx.device.type} (fp16 stores, batch 4096):")
    table(["width", "rows/s", "target (GPU)"], rows)
    return out


def report(store: ChunkStore, steps: int, bs: int, secs: Seconds, alone: float) -> dict:
    rate = {n: steps * bs / med(s) for n, s in secs.items()}
    ratio, best = speedup(secs, "streamed", "in_memory")
    chunks = f"{len(store.chunks)} chunks of {store.chunks[0]['rows']}"
    print(
        f"  store: {store.total_rows} rows x {store.width} {store.dtype}, {chunks} (in page cache)"
    )
    print(
        f"  ensemble {SMALL.d}x{SMALL.m} K={K} B={bs}: {steps} steps per run, fresh ensemble each run"
    )
    rows = [
        [n, fmt_rate(r), fmt_rate(r * K), f"{med(secs[n]):.2f}", f"{min(secs[n]):.2f}"]
        for n, r in rate.items()
    ]
    table(["source", "rows/s", "rows x members/s", "s (median)", "s (best)"], rows)
    print(f"  the stream alone (every batch read, no training) takes {alone:.2f} s")
    print(f"  streamed / in-memory: {ratio:.3f}, best-of {best:.3f}", end="")
    print(f"  (target >= {TARGET}: {verdict(ratio, TARGET)})")
    return {
        "steps": steps,
        "k": K,
        "seconds": secs,
        "rows_per_s": rate,
        "stream_only_seconds": alone,
        "ratio": ratio,
        "ratio_best": best,
        "target": TARGET,
    }


def disk_side(ctx: Context) -> dict:
    """The two reads a GPU sweep makes of a store, on the width-512 fp16 feed store (page
    cache warm): chunks into a staging buffer (``ChunkStore.read_into``) with one reader
    against the reads split across threads, and a store's first verification (sha256 and a
    NaN/inf scan of every chunk). Rows/s, the median of the repeats."""
    from sweep import io
    from sweep.activations.store import VERIFIED

    store = ctx.stores.get("feed-512")
    sizes = [int(c["rows"]) for c in store.chunks]
    buf = torch.empty(max(sizes), store.width, dtype=torch.float16)
    read_all = lambda: [store.read_into(i, buf[:n]) for i, n in enumerate(sizes)]  # noqa: E731
    read_all()
    threads = io.READ_THREADS
    rates = {}
    for name, n in (("read, one reader", 1), (f"read, {threads} readers", threads)):
        fresh_readers(n)
        rates[name] = store.total_rows / med(
            [ctx.timer.wall(read_all) for _ in range(ctx.st.repeats)]
        )
    fresh_readers(threads)

    def verify() -> None:
        (store.path / VERIFIED).unlink(missing_ok=True)
        store.verify()

    rates["verify"] = store.total_rows / med(
        [ctx.timer.wall(verify) for _ in range(ctx.st.repeats)]
    )
    print(f"  the store side, width 512 fp16, {store.total_rows} rows (page cache warm):")
    table(["what", "rows/s"], [[n, fmt_rate(r)] for n, r in rates.items()])
    return {"rows_per_s": rates, "read_threads": threads}


def fresh_readers(threads: int) -> None:
    """``sweep.io`` reading with ``threads`` threads from the next read on (its old pool shut)."""
    from sweep import io

    if io._readers is not None:
        io._readers.shutdown()
    io.READ_THREADS, io._readers = threads, None
