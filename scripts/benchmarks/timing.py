"""The timing helpers every section shares: a CUDA-aware timer, interleaved repeats, median and
best-of ratios, and the printed table."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

Seconds = dict[str, list[float]]
"""Per variant, seconds per call (or per run) of each repeat."""


class Timer:
    """Per-call timing: on CUDA between two CUDA events around the calls (the device's own
    clock, from an idle queue to the last call's last kernel); on the CPU the wall clock."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def per_call(self, fn: Callable[[], object], min_time: float) -> float:
        """Seconds per call of ``fn``, calling it until ``min_time`` has passed on the host
        (at least once; on CUDA the count is what the host queued in that time)."""
        self.sync()
        events = [torch.cuda.Event(enable_timing=True) for _ in range(2)] if self.cuda else []
        if events:
            events[0].record()
        t0, n = time.perf_counter(), 0
        while True:
            fn()
            n += 1
            if time.perf_counter() - t0 >= min_time:
                break
        if not events:
            return (time.perf_counter() - t0) / n
        events[1].record()
        events[1].synchronize()
        return events[0].elapsed_time(events[1]) / 1e3 / n

    def wall(self, fn: Callable[[], object]) -> float:
        self.sync()
        t0 = time.perf_counter()
        fn()
        self.sync()
        return time.perf_counter() - t0


def interleaved(
    variants: dict[str, Callable[[], object]],
    timer: Timer,
    repeats: int,
    min_time: float,
    warmup: int = 2,
) -> Seconds:
    """Seconds per call of every variant: warm each up, then time them in turn, ``repeats`` times."""
    for fn in variants.values():
        for _ in range(warmup):
            fn()
    timer.sync()
    out: Seconds = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            out[name].append(timer.per_call(fn, min_time))
    return out


def med(xs: list[float]) -> float:
    return statistics.median(xs)


def speedup(secs: Seconds, a: str, b: str) -> tuple[float, float]:
    """(median, best-of-N) of rate(a) / rate(b), from seconds per equal unit of work."""
    return med(secs[b]) / med(secs[a]), min(secs[b]) / min(secs[a])


def verdict(value: float, target: float, higher: bool = True) -> str:
    ok = value >= target if higher else value <= target
    return "met" if ok else "NOT met"


def table(headers: list[str], rows: list[list[str]]) -> None:
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]
    print("  " + "  ".join(h.rjust(w) for h, w in zip(headers, widths, strict=True)))
    for r in rows:
        print("  " + "  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)))


def fmt_rate(x: float) -> str:
    for unit, div in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if x >= div:
            return f"{x / div:.3g}{unit}"
    return f"{x:.3g}"
