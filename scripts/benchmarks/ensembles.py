"""Building blocks for timing sweep's ensembles in-process: synthetic batches, initial members,
an L1 grid, an :class:`Ensemble` as the worker builds it, and a one-step rate probe."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import torch

from sweep import grid, sae
from sweep.activations.synthetic import SyntheticSource
from sweep.archs import Architecture
from sweep.config import SyntheticDataConfig, TrainConfig
from sweep.ensemble import Ensemble, hyper_of, stack
from sweep.grid import EnsembleSpec
from sweep.optim import Adam

from .common import Size
from .timing import Timer


def make_batches(size: Size, n: int, device: torch.device) -> list[torch.Tensor]:
    """``n`` batches of synthetic activations (sparse known features), scaled as training sees
    them (mean row norm sqrt(d))."""
    cfg = SyntheticDataConfig(width=size.d, n_features=size.m, seed=1)
    x = SyntheticSource(cfg).sample(n * size.batch, chunk=0)  # (n*B, d)
    x = x * (math.sqrt(size.d) / x.norm(dim=1).mean())
    return list(x.to(device).view(n, size.batch, size.d).unbind(0))  # n x (B, d)


def init_members(
    size: Size, k: int, device: torch.device, arch: str = "untied"
) -> list[sae.Params]:
    g = torch.Generator().manual_seed(0)
    members = [sae.init_params(arch, size.d, size.m, g) for _ in range(k)]
    return [{n: v.to(device) for n, v in p.items()} for p in members]


def l1_grid(k: int) -> list[float]:
    return [float(v) for v in torch.linspace(1e-2, 8e-2, k)]


def k_grid(k: int) -> list[int]:
    """k values of a TopK grid of ``k`` members: 16, 32, 64, 128, 16, ..."""
    return [16 * 2 ** (i % 4) for i in range(k)]


def make_ensemble(
    members: list[sae.Params],
    l1s: list[float],
    fast: bool = True,
    arch: str | Architecture = "untied",
    ks: list[int] | None = None,
    compiled: bool = False,
    cuda_graphs: bool = False,
    autocast_dtype: torch.dtype | None = None,
    grad_clip: float | None = None,
) -> Ensemble:
    """An ensemble as the worker builds it (``ks``: TopK-style members' k values; ``compiled``:
    its step ``torch.compile``d, as ``train.compile`` does; ``autocast_dtype``: its compute
    dtype, float32 when None)."""
    t = TrainConfig()
    params = {n: v.clone() for n, v in stack(members).items()}  # {name: (K, ...)}
    device = params["W_enc"].device
    hyper = hyper_of(l1s if ks is None else [0.0] * len(ks), ks or [0] * len(l1s), device)
    adam = Adam(t.lr, (t.betas[0], t.betas[1]), t.eps)
    return Ensemble(
        params, hyper, adam, arch=arch, fast=fast, compiled=compiled, cuda_graphs=cuda_graphs,
        autocast_dtype=autocast_dtype, grad_clip=grad_clip,
    )  # fmt: skip


def feeder(
    batches: list[torch.Tensor], step: Callable[[torch.Tensor], object]
) -> Callable[[], object]:
    """A no-argument call that steps on the next batch, cycling."""
    cycle = itertools.cycle(batches)
    return lambda: step(next(cycle))


def ensemble_spec(size: Size, l1s: list[float]) -> EnsembleSpec:
    """The grid's one ensemble of ``size`` with these L1 values (for ``worker.train_ensemble``)."""
    runs = grid.expand(l1s, [size.ratio], 1, size.d, "untied")
    return grid.group(runs, {size.ratio: len(runs)})[0]


def seconds_per_step(size: Size, k: int, threads: int, device: torch.device, timer: Timer) -> float:
    """A quick measure of one fast-ensemble step (to size the training runs)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        ens = make_ensemble(init_members(size, k, device), l1_grid(k))
        x = make_batches(size, 1, device)[0]
        for _ in range(2):
            ens.step(x, full=False)
        return timer.per_call(lambda: ens.step(x, full=False), 0.5)
    finally:
        torch.set_num_threads(before)


def size_fields(size: Size, k: int) -> dict:
    """The leading fields of a section-1 / section-7 result: the size and member count."""
    return {"size": size.name, "d": size.d, "m": size.m, "batch": size.batch, "k": k}


def size_cells(r: dict) -> list[str]:
    """:func:`size_fields` as the first table cells."""
    return [r["size"], f"{r['d']}x{r['m']}", str(r["batch"]), str(r["k"])]
