"""Devices and dtypes: one table of dtype names, one way to pick a device.

Torch is imported inside the functions so that :mod:`sweep.config` can use the names
without importing torch.
"""

from __future__ import annotations

import contextlib
import functools
import os
import platform
from pathlib import Path
from typing import TYPE_CHECKING

from sweep.errors import SweepError

if TYPE_CHECKING:
    import numpy as np
    import torch

TENSOR_DTYPES = ("float32", "float16", "bfloat16")
"""Names of stored / model dtypes (chunk stores, harvested models)."""
COMPUTE_DTYPES = ("auto", "float32", "tf32", "bfloat16")
"""Names of ``train.dtype`` values (``auto``: see :func:`resolve_compute_dtype`)."""
BYTES = {"float32": 4, "tf32": 4, "float16": 2, "bfloat16": 2}


def resolve_compute_dtype(name: str, on_gpu: bool, gpu_auto: str = "bfloat16") -> str:
    """``auto`` -> ``gpu_auto`` compute on a GPU (the architecture's
    :attr:`~sweep.archs.base.Architecture.gpu_dtype`, bfloat16 but for one recipe; fp32 master
    weights and Adam state stay), ``float32`` on the CPU; any other name is itself."""
    if name != "auto":
        return name
    return gpu_auto if on_gpu else "float32"


def torch_dtype(name: str) -> torch.dtype:
    import torch

    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


def numpy_dtype(name: str) -> type[np.generic]:
    """How a stored dtype lies in a ``.npy`` file (bfloat16 as its raw uint16 bits)."""
    import numpy as np

    return {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}[name]


def resolve_device(name: str, field: str = "train.device") -> torch.device:
    """``auto`` -> the (Ray-assigned, via CUDA_VISIBLE_DEVICES) GPU when present, else CPU."""
    import torch

    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise SweepError(f"{field}=cuda but no CUDA device is visible; use {field}=auto or cpu")
        return torch.device("cuda", torch.cuda.current_device())
    try:
        return torch.device("cpu" if name == "auto" else name)
    except RuntimeError as err:
        raise SweepError(f"unknown device {name!r} for {field}; use auto, cpu or cuda") from err


def processor(device: torch.device) -> str:
    """The chip ``device`` computes on, by model: another model may pick other kernels
    (cuBLAS's GEMM algorithms, MKL's code paths for its vector units), so a step resumed
    there continues equal only up to rounding."""
    import torch

    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"{torch.cuda.get_device_name(device)} (sm_{major}{minor})"
    return _cpu_model()


@functools.cache
def _cpu_model() -> str:
    """``model name`` of /proc/cpuinfo, else the platform's names for it."""
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def release_device_memory() -> None:
    """Hand the memory this process cached on its GPU back to the driver (a sweep's driver
    after generating or harvesting data there: its ensembles need that memory)."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()  # what is still queued frees its blocks first
        torch.cuda.empty_cache()


def host_memory_bytes(
    cgroups: Path = Path("/proc/self/cgroup"), root: Path = Path("/sys/fs/cgroup")
) -> int:
    """The host memory this process may use: the machine's physical memory, or less under a
    cgroup memory limit on its cgroup or any above it (a SLURM job's ``--mem``, a
    container's limit; cgroup v2 or v1). ``cgroups``, ``root``: where to read them."""
    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return min([physical, *_cgroup_limits(cgroups, root)])


def _cgroup_limits(cgroups: Path, root: Path) -> list[int]:
    """Every memory limit set on this process's cgroup and its ancestors."""
    try:
        lines = cgroups.read_text().splitlines()
    except OSError:
        return []
    limits = []
    for line in lines:
        _, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if controllers == "":  # v2: one hierarchy
            base, name = root, "memory.max"
        elif "memory" in controllers.split(","):  # v1: the memory controller's own
            base, name = root / "memory", "memory.limit_in_bytes"
        else:
            continue
        folder = base / path.strip().lstrip("/")
        for where in (folder, *folder.parents):
            try:
                limits.append(int((where / name).read_text().strip()))
            except (OSError, ValueError):  # absent, or "max" (no limit)
                pass
            if where == base:
                break
    return limits
