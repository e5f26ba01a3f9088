"""Expand the grid into runs with stable ids, and group them into ensembles.

A :class:`RunSpec` is one grid point (l1 or k x dict_ratio (x lr) x seed). Runs that share a
dict ratio share tensor shapes and are trained together as one :class:`EnsembleSpec` (at
their own learning rates, with an lr axis); a group larger than the member budget is split
into near-equal ensembles. Larger dict ratios come first, so the longest work starts first.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterator
from dataclasses import asdict, dataclass, replace
from typing import NamedTuple

from sweep.devices import BYTES, resolve_compute_dtype
from sweep.errors import SweepError
from sweep.io import memory_text

MEMORY_USE = 0.8
"""Share of a device's memory the memory model may plan for."""

CPU_MAX_MEMBERS = 8  # on CPU, K=16 ran slower per member than K=8 (scripts/bench.py, BENCHMARKS.md)


def fmt_number(v: float) -> str:
    """Shortest text that reads back as ``v``: 4.0 -> '4', 0.5 -> '0.5'."""
    return f"{v:g}" if float(f"{v:g}") == v else repr(v)


def fmt_l1(v: float) -> str:
    """L1 in scientific notation with as few digits as round-trip: 1e-3 -> '1e-03'."""
    if v == 0:
        return "0"
    for digits in range(0, 16):
        text = f"{v:.{digits}e}"
        if float(text) == v:
            return text
    return repr(v)


@dataclass(frozen=True)
class RunSpec:
    """One grid point."""

    run_id: str
    l1: float
    dict_ratio: float
    seed: int
    """Seed index within the grid (0 .. grid.seeds-1)."""
    width: int
    dict_size: int
    arch: str
    k: int = 0
    """Active latents of TopK-style architectures (0 for L1-style ones)."""
    lr: float | None = None
    """Its learning rate where the grid has an lr axis (``grid.lr``); None: ``train.lr``."""

    def learning_rate(self, train_lr: float) -> float:
        """The learning rate it trains at, given the sweep's ``train.lr``."""
        return train_lr if self.lr is None else self.lr

    @property
    def knob(self) -> str:
        """This run's sparsity setting as text: ``k64`` or ``l1_1e-03``."""
        return f"k{self.k}" if self.k else f"l1_{fmt_l1(self.l1)}"

    def as_dict(self) -> dict:
        """Its fields (``lr`` only with an lr axis: a plain sweep's records are as before)."""
        out = asdict(self)
        if out["lr"] is None:
            del out["lr"]
        return out


@dataclass(frozen=True)
class EnsembleSpec:
    """Runs of one shape trained as one vmapped program."""

    ensemble_id: str
    dict_ratio: float
    dict_size: int
    members: tuple[RunSpec, ...]
    evaluate: str = ""
    """Its members are finished: evaluated from their final weights, not trained. ``lost``:
    those whose ``metrics.json`` was lost; ``all``: every one (``sweep evaluate``)."""


def run_id(dict_ratio: float, l1: float, seed: int, k: int = 0, lr: float | None = None) -> str:
    """``r8-l1_1e-03-s0`` for L1-style runs, ``r8-k64-s0`` for TopK-style ones; with an lr
    axis, ``r8-k64-lr3e-04-s0``."""
    knob = f"k{k}" if k else f"l1_{fmt_l1(l1)}"
    rate = "" if lr is None else f"-lr{fmt_l1(lr)}"
    return f"r{fmt_number(dict_ratio)}-{knob}{rate}-s{seed}"


def dict_size(dict_ratio: float, width: int) -> int:
    return max(1, round(dict_ratio * width))


class Point(NamedTuple):
    """One grid point's values."""

    dict_ratio: float
    l1: float
    k: int
    lr: float | None
    seed: int

    @property
    def run_id(self) -> str:
        return run_id(self.dict_ratio, self.l1, self.seed, self.k, self.lr)


def points(
    values: list[float],
    ratios: list[float],
    seeds: int,
    knob: str = "l1",
    lrs: list[float] | None = None,
) -> Iterator[Point]:
    """Every grid point, in :func:`expand`'s order (``lrs``: the lr axis, None: none)."""
    for r in sorted(ratios, reverse=True):
        for v in sorted(values):
            l1, k = (float(v), 0) if knob == "l1" else (0.0, int(v))
            for lr in sorted(lrs) if lrs is not None else [None]:
                rate = None if lr is None else float(lr)
                yield from (Point(r, l1, k, rate, s) for s in range(seeds))


def expand(
    values: list[float],
    ratios: list[float],
    seeds: int,
    width: int,
    arch: str,
    knob: str = "l1",
    lrs: list[float] | None = None,
) -> list[RunSpec]:
    """Every grid point, ordered by dict ratio (descending), then l1 or k, then lr, then
    seed. ``values`` are l1 coefficients (``knob='l1'``) or k values (``knob='k'``)."""
    runs = [
        RunSpec(
            p.run_id,
            p.l1,
            float(p.dict_ratio),
            p.seed,
            width,
            dict_size(p.dict_ratio, width),
            arch,
            p.k,
            p.lr,
        )
        for p in points(values, ratios, seeds, knob, lrs)
    ]
    ids = [r.run_id for r in runs]
    if len(set(ids)) != len(ids):  # e.g. two ratios that round to the same text
        raise SweepError(
            f"grid values collide in run ids; use distinct grid.{knob} / grid.dict_ratio values"
        )
    return runs


def bytes_per_member(
    width: int, dict_size: int, batch_size: int, dtype: str, buffers: float = 3, on_gpu: bool = True
) -> int:
    """Memory of one member while it trains. Per parameter: the weights, their gradients and
    two Adam moments in fp32, plus the gradient clip's squares (fp32) and, under a 16-bit
    compute dtype, the weights' copies and their gradients in it; on the CPU also the
    checkpoint snapshot (weights and moments, fp32: :mod:`sweep.ckpt_writer` keeps it in host
    memory, which there is the device's). Per batch, in the compute
    dtype: the error (B, D) and ``buffers`` (B, F) buffers (:func:`sweep.planning.batch_buffers`):
    codes, their gradient and the top-k's scatter (three), JumpReLU's pre-activations (one
    more), AuxK's pre-activations, masked copy, auxiliary codes and their gradient (four); and
    :data:`STEP_TRANSIENTS`. The compiled step (``train.compile=true``) holds less."""
    n_params = parameters(width, dict_size)
    low = BYTES[dtype] if BYTES[dtype] < 4 else 0
    state = (5 * 4 + 2 * low + (0 if on_gpu else SNAPSHOT_BYTES)) * n_params
    extra_bf, extra_bd = STEP_TRANSIENTS
    rows = (buffers + extra_bf) * batch_size * dict_size + (1 + extra_bd) * batch_size * width
    return state + int(rows * BYTES[dtype])


SNAPSHOT_BYTES = 3 * 4
"""Bytes of a checkpoint snapshot per parameter: the weights and two Adam moments in fp32,
kept in host memory by :mod:`sweep.ckpt_writer` while a member trains."""


def parameters(width: int, dict_size: int) -> int:
    """Parameters of one member: encoder and decoder, and their biases."""
    return 2 * width * dict_size + width + dict_size


STEP_TRANSIENTS = (1, 2)
"""(B, F) and (B, D) buffers per member in the compute dtype that the eager step may hold at
its peak besides the named ones. Measured on an H200 (torch 2.11, bf16, 256 x 4096, batch
1024, two and four members; tests/test_gpu.py), its peak was ~8.1 MiB per member above the
named ones: the size of one (B, F) buffer there, and also of the two float32 copies of the
decoder that its constraint then made (now divided in place). Kept until re-measured; the
two (B, D) ones are the batch's per-member copies the batched GEMMs may make."""


def member_budget(
    width: int,
    dict_size: int,
    batch_size: int,
    dtype: str,
    device_bytes: float,
    on_gpu: bool,
    max_members: int,
    buffers: float = 3,
    share: float = 1.0,
) -> int:
    """How many members one ensemble may hold on one device (``buffers``: see
    :func:`bytes_per_member`; ``share``: the fixed fraction of a GPU an ensemble is given,
    named by the error when one member does not fit): what fits, at most ``max_members``
    when that is set (which also lifts the CPU's default cap)."""
    dtype = resolve_compute_dtype(dtype, on_gpu)
    per = bytes_per_member(width, dict_size, batch_size, dtype, buffers, on_gpu)
    fit = int(MEMORY_USE * device_bytes // per)
    if fit < 1:
        state = bytes_per_member(width, dict_size, 0, dtype, buffers, on_gpu)
        fixes = [f"launch.gpus_per_ensemble=1 (it gives each {share:g} of a GPU)"] * (share < 1)
        fixes += ["a smaller train.batch_size"] * (state < MEMORY_USE * device_bytes)
        raise SweepError(
            f"one member of dict size {dict_size} needs {memory_text(per)} (weights and Adam "
            f"state {memory_text(state)}), more than the device budget "
            f"({memory_text(MEMORY_USE * device_bytes)}: {MEMORY_USE:.0%} of "
            "launch.device_memory_gb or the memory found, per ensemble, less its staged chunks "
            f"on a GPU); use {' or '.join([*fixes, 'a smaller dict ratio'])}"
        )
    if max_members > 0:
        return min(fit, max_members)
    return fit if on_gpu else min(fit, CPU_MAX_MEMBERS)


def ensemble_id(ratio: float, k: int, tag: str = "") -> str:
    """``r<ratio>-e<k><tag>``: the k-th ensemble of this dict ratio in a plan."""
    return f"r{fmt_number(ratio)}-e{k}{tag}"


def group(runs: list[RunSpec], budget_for: dict[float, int]) -> list[EnsembleSpec]:
    """Group runs by dict ratio (largest first) and split each group into near-equal
    ensembles of at most ``budget_for[ratio]`` members."""
    out: list[EnsembleSpec] = []
    ratios = sorted({r.dict_ratio for r in runs}, reverse=True)
    for ratio in ratios:
        members = [r for r in runs if r.dict_ratio == ratio]
        n_ens = math.ceil(len(members) / budget_for[ratio])
        size, more = divmod(len(members), n_ens)  # (36 in 8s: 8, 7, 7, 7, 7 — not 8, 8, 8, 8, 4)
        start = 0
        for k in range(n_ens):
            part = tuple(members[start : start + size + (k < more)])
            start += len(part)
            out.append(EnsembleSpec(ensemble_id(ratio, k), ratio, part[0].dict_size, part))
    return out


def spread(ensembles: list[EnsembleSpec], slots: int) -> list[EnsembleSpec]:
    """``ensembles`` split until there are ``slots`` of them (devices that would otherwise
    idle) or none has two members: each time the costliest (members x dict size, the step's
    work; of equals, the one with more members) is halved. Ordered and numbered as
    :func:`group` does."""
    out = list(ensembles)
    while len(out) < slots:
        splittable = [e for e in out if len(e.members) > 1]
        if not splittable:
            break
        big = max(splittable, key=lambda e: (len(e.members) * e.dict_size, len(e.members)))
        half = math.ceil(len(big.members) / 2)
        i = out.index(big)
        out[i : i + 1] = [
            replace(big, members=big.members[:half]),
            replace(big, members=big.members[half:]),
        ]
    if len(out) == len(ensembles):
        return out
    out.sort(key=lambda e: -e.dict_ratio)  # stable: grid order within a ratio
    return renumber(out, tag="")


def renumber(
    ensembles: list[EnsembleSpec], tag: str, taken: Collection[str] = ()
) -> list[EnsembleSpec]:
    """The same ensembles, numbered afresh per dict ratio in list order, with ``tag``: ids
    unique across ensembles built by separate :func:`group` calls, and none in ``taken``."""
    count: dict[float, int] = {}
    out = []
    for e in ensembles:
        k = count.get(e.dict_ratio, -1) + 1
        while ensemble_id(e.dict_ratio, k, tag) in taken:
            k += 1
        count[e.dict_ratio] = k
        out.append(replace(e, ensemble_id=ensemble_id(e.dict_ratio, k, tag)))
    return out
