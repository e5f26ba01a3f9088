"""Section 4, part 2: one researcher-size member's checkpoint written the way sweep writes it
(:mod:`sweep.tensorfile`, streamed from the tensors' memory) against ``safetensors.torch.save``
then a write of its bytes (what the worker did before 2026-12-02), side by side.

Both write to the same folder with fsync (:func:`sweep.io.atomic_write`). While each writes,
a thread that only sleeps 1 ms at a time records its longest wait: the time the writer kept
the GIL from the training thread (a GPU's training thread launches no kernel meanwhile).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save

from sweep import tensorfile
from sweep.io import atomic_write, atomic_write_bytes

from .timing import table

WIDTH = 768
"""GPT-2 small's width; at 24,576 latents (ratio 32) a member's fp32 state is 453 MB."""


def member_state(d: int, m: int) -> dict[str, torch.Tensor]:
    """One member's checkpoint tensors as the worker names them (random values)."""
    shapes = {"W_enc": (d, m), "W_dec": (m, d), "b_enc": (m,), "b_dec": (d,)}
    out = {}
    for k, shape in shapes.items():
        out[f"param.{k}"] = torch.randn(shape)
        out[f"adam.exp_avg.{k}"] = torch.randn(shape)
        out[f"adam.exp_avg_sq.{k}"] = torch.rand(shape)
        out[f"adam.step.{k}"] = torch.tensor(1000.0)
    return out


def stalled(write: Callable[[], None]) -> tuple[float, float]:
    """(seconds ``write`` took, longest gap of a 1 ms sleeper thread meanwhile)."""
    stop, gaps = threading.Event(), [0.0]

    def sleeper() -> None:
        last = time.perf_counter()
        while not stop.is_set():
            time.sleep(0.001)
            now = time.perf_counter()
            gaps[0], last = max(gaps[0], now - last), now

    thread = threading.Thread(target=sleeper)
    thread.start()
    time.sleep(0.05)
    t0 = time.perf_counter()
    try:
        write()
        took = time.perf_counter() - t0
    finally:
        stop.set()
        thread.join()
    return took, gaps[0]


def run(tmp: Path, latents: int, repeats: int) -> dict:
    state, meta, path = member_state(WIDTH, latents), {"step": "1000"}, tmp / "stall.safetensors"
    writers = {
        "sweep.tensorfile (streamed)": lambda: atomic_write(
            path, lambda f: tensorfile.write(f, state, meta)
        ),
        "safetensors save() + write": lambda: atomic_write_bytes(path, save(state, metadata=meta)),
    }
    got: dict[str, list[tuple[float, float]]] = {n: [] for n in writers}
    for _ in range(repeats):  # interleaved
        for name, write in writers.items():
            got[name].append(stalled(write))
    path.unlink(missing_ok=True)
    mb = sum(v.numel() * v.element_size() for v in state.values()) / 1e6
    print(f"  one member's checkpoint at {WIDTH} x {latents} ({mb:.0f} MB), written with fsync:")
    table(
        ["writer", "s (best)", "longest stall of another thread, s (worst)"],
        [[n, f"{min(t for t, _ in r):.2f}", f"{max(g for _, g in r):.3f}"] for n, r in got.items()],
    )
    return {"latents": latents, "megabytes": mb, "runs": got}
