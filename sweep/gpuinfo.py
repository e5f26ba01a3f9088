"""What the GPUs the ensembles train on are: the memory to plan with, whether they take one
process each, and whether they are real CUDA GPUs (``train.dtype=auto`` means bfloat16 then).

Asked where the GPUs are. On one machine whose GPU the driver sees, a short-lived process
reads the first GPU's free memory (torch, so a MIG slice reports its own) and ``nvidia-smi``
its compute mode. Otherwise — a Ray cluster whose head has no GPU (the cluster launcher's),
or several GPU nodes, which may differ — a task on every GPU node runs ``nvidia-smi`` (no
CUDA context, no GPU asked of Ray), and the sweep plans for the GPU with the least free
memory. When neither can say (no ``nvidia-smi``; Ray's fake GPUs on a CPU machine), the
caller falls back to ``launch.device_memory_gb`` or a default.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import subprocess
import sys
from dataclasses import dataclass

log = logging.getLogger(__name__)

QUERY = ["--query-gpu=memory.free,memory.total,compute_mode", "--format=csv,noheader,nounits"]
PROBE_SECONDS = 60.0
"""How long the driver waits for the GPU nodes' answers before planning without them."""


@dataclass(frozen=True)
class GpuInfo:
    free: float = 0.0
    """Bytes to plan each GPU with (the least free of all; 0: unknown)."""
    exclusive: bool = False
    """The GPUs take one process each (an exclusive compute mode)."""
    real: bool = False
    """CUDA GPUs were found (not only Ray's count of them)."""


def read_nvidia_smi(command: str = "nvidia-smi") -> list[tuple[float, float, str]]:
    """(free bytes, total bytes, compute mode) of each GPU of this machine; [] when
    ``nvidia-smi`` is absent, fails, or reports no memory (a MIG-enabled GPU)."""
    if shutil.which(command) is None:
        return []
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run([command, *QUERY], capture_output=True, text=True, timeout=60)
        rows = []
        for line in out.stdout.splitlines() if out.returncode == 0 else []:
            parts = [p.strip() for p in line.split(",")]
            with contextlib.suppress(ValueError, IndexError):
                rows.append((float(parts[0]) * 2**20, float(parts[1]) * 2**20, parts[2]))
        return rows
    return []


def usable_gpu_bytes(free: float, total: float) -> float:
    """What the memory model plans with: the free memory, said aloud when other processes
    hold much of the GPU."""
    if free < 0.9 * total:
        log.warning(
            "a GPU has %.1f of %.1f GiB free (other processes hold the rest): planning for "
            "%.1f GiB (launch.device_memory_gb sets it)",
            free / 2**30,
            total / 2**30,
            free / 2**30,
        )
    return free


def ask(gpu_nodes: int, command: str = "nvidia-smi") -> GpuInfo:
    """The GPUs' facts, from this machine when its GPU is the only GPU node's, else from
    every GPU node of the Ray cluster (``gpu_nodes``: how many have GPUs)."""
    import torch

    if torch.cuda.is_available() and gpu_nodes <= 1:
        rows = read_nvidia_smi(command)
        return GpuInfo(_local_free(), any(_exclusive(m) for _, _, m in rows), real=True)
    found = cluster_rows(command)
    if not found:
        return GpuInfo(real=torch.cuda.is_available())
    free, total, _ = min(found)
    if free < 0.9 * max(f for f, _, _ in found):
        log.warning(
            "the cluster's GPUs differ (%.1f to %.1f GiB free): planning every ensemble for "
            "the smallest",
            free / 2**30,
            max(f for f, _, _ in found) / 2**30,
        )
    log.info(
        "%d GPU(s) on %d node(s), the least free %.1f GiB", len(found), gpu_nodes, free / 2**30
    )
    exclusive = any(_exclusive(m) for _, _, m in found)
    return GpuInfo(usable_gpu_bytes(free, total), exclusive, real=True)


def cluster_rows(command: str = "nvidia-smi") -> list[tuple[float, float, str]]:
    """:func:`read_nvidia_smi` on every alive Ray node that has GPUs, in tasks that ask for
    none; [] when Ray is not running or the nodes do not answer in time."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    if not ray.is_initialized():
        return []
    nodes = [n["NodeID"] for n in ray.nodes() if n.get("Alive") and n["Resources"].get("GPU")]
    task = ray.remote(num_cpus=0)(read_nvidia_smi)
    refs = [
        task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n, soft=False)).remote(
            command
        )
        for n in nodes
    ]
    try:
        return [row for rows in ray.get(refs, timeout=PROBE_SECONDS) for row in rows]
    except (ray.exceptions.RayError, TimeoutError) as err:
        log.warning(
            "could not read the GPU nodes' memory (%s); launch.device_memory_gb sets it",
            type(err).__name__,
        )
        for ref in refs:
            with contextlib.suppress(Exception):
                ray.cancel(ref, force=True)
        return []


def _exclusive(mode: str) -> bool:
    return mode.strip().startswith("Exclusive")


def _local_free() -> float:
    """Free memory of this machine's first visible GPU (a MIG slice: its own), read in a
    short-lived process so that the driver, which trains nothing, holds no CUDA context (and
    its memory) for the whole sweep. Free, not total: another process on the GPU (a second
    sweep, a notebook) keeps what it holds."""
    import torch

    query = "import torch; print(*torch.cuda.mem_get_info(0))"
    try:
        out = subprocess.run(
            [sys.executable, "-c", query], capture_output=True, text=True, timeout=120, check=True
        )
        free, total = (float(v) for v in out.stdout.split()[-2:])
    except (OSError, ValueError, subprocess.SubprocessError):
        free, total = (float(v) for v in torch.cuda.mem_get_info(0))
    return usable_gpu_bytes(free, total)
