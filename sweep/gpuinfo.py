"""What the GPUs the ensembles train on are: the memory to plan with, whether they take one
process each, and whether they are CUDA GPUs torch can use (``train.dtype=auto`` means
bfloat16 then).

Asked where the GPUs are. On one machine whose GPUs the driver sees, a short-lived process
reads the least free memory of the visible GPUs its Ray uses (torch, so a MIG slice reports
its own) and ``nvidia-smi`` their compute modes. Otherwise — a Ray cluster whose GPU nodes
are other machines (the cluster launcher's head has none), or several GPU nodes, which may
differ — a task on every GPU node (asking Ray for no GPU, making no CUDA context) says
whether torch sees CUDA there and what ``nvidia-smi`` says of the GPUs Ray gives that node's
tasks, and the sweep plans for the GPU with the least free memory. MIG-enabled GPUs (``nvidia-smi`` may report the whole GPU's memory) and GPUs in the
Prohibited compute mode are left out. When nothing can say, the caller falls back to
``launch.device_memory_gb`` or a default, and says so.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import subprocess
import sys
import threading
from dataclasses import dataclass

log = logging.getLogger(__name__)

FIELDS = "index,uuid,memory.free,memory.total,compute_mode,mig.mode.current"
QUERY = [f"--query-gpu={FIELDS}", "--format=csv,noheader,nounits"]
SMI_SECONDS = 15.0
"""How long one ``nvidia-smi`` may take."""
PROBE_SECONDS = 60.0
"""How long the driver waits for the GPU nodes' answers (a node's worker start included)."""

Row = tuple[float, float, str]
"""One GPU: free bytes, total bytes, compute mode."""


@dataclass(frozen=True)
class GpuInfo:
    free: float = 0.0
    """Bytes to plan each GPU with (the least free of all; 0: unknown)."""
    exclusive: bool = False
    """The GPUs take one process each (an exclusive compute mode)."""
    real: bool = False
    """CUDA GPUs torch can use were found (not only Ray's count of them)."""


def read_nvidia_smi(command: str = "nvidia-smi") -> list[Row]:
    """The usable GPUs of this machine that this process may use (``CUDA_VISIBLE_DEVICES``,
    by index or UUID, when it names any); [] when ``nvidia-smi`` is absent or fails."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").strip()
    allowed = {v.strip() for v in visible.split(",")} if visible else None  # ("": a Ray task
    # that asked for no GPU, in Ray versions that hide them from it: the node's GPUs count)
    rows = []
    for parts in _smi_gpus(command):
        if allowed is not None and not allowed & {parts[0], parts[1]}:
            continue
        if parts[5] == "Enabled" or parts[4] == "Prohibited":
            continue  # whole-GPU memory of MIG slices; no CUDA context allowed
        with contextlib.suppress(ValueError):
            rows.append((float(parts[2]) * 2**20, float(parts[3]) * 2**20, parts[4]))
    return rows


def _smi_gpus(command: str) -> list[list[str]]:
    """Every GPU of this machine as ``nvidia-smi`` lists it (:data:`FIELDS`); [] when it is
    absent or fails."""
    if shutil.which(command) is None:
        return []
    try:
        out = subprocess.run([command, *QUERY], capture_output=True, text=True, timeout=SMI_SECONDS)
    except (OSError, subprocess.SubprocessError):
        return []
    listed = [[p.strip() for p in line.split(",")] for line in out.stdout.splitlines()]
    return [parts for parts in listed if len(parts) == 6] if out.returncode == 0 else []


def uuids(names: list[str], command: str = "nvidia-smi") -> list[str]:
    """``names`` of this machine's GPUs as ``CUDA_VISIBLE_DEVICES`` gives them (indices, UUIDs
    or UUID prefixes, as CUDA takes them) as their UUIDs, where ``nvidia-smi`` lists them."""
    listed = {index: uuid for index, uuid, *_ in _smi_gpus(command)}
    found = []
    for name in names:
        match = [u for u in listed.values() if name.startswith("GPU-") and u.startswith(name)]
        found.append(listed.get(name) or (match[0] if len(match) == 1 else name))
    return found


def node_facts(command: str = "nvidia-smi") -> tuple[list[Row], bool]:
    """What a GPU node says (run there as a Ray task): its GPUs, and whether torch sees CUDA."""
    return read_nvidia_smi(command), _torch_sees_cuda()


def _torch_sees_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


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


def ask(
    gpu_nodes: list[bool],
    need_memory: bool = True,
    command: str = "nvidia-smi",
    need_dtype: bool = True,
    gpus: int = 0,
) -> GpuInfo:
    """The GPUs' facts, from this machine when it is the only GPU node, else from every GPU
    node of the Ray cluster (``gpu_nodes``: whether each node Ray counts GPUs on is this
    machine's; ``gpus``: how many GPUs, 0 unknown). ``need_memory``: False when
    ``launch.device_memory_gb`` says it; ``need_dtype``: False when ``train.dtype`` is set
    (not auto)."""
    local = _torch_sees_cuda()
    if local and all(gpu_nodes) and len(gpu_nodes) <= 1:
        return _local(need_memory, command, gpus)
    rows = [row for found, cuda in cluster_answers(command) if cuda for row in found]
    if not rows:
        if local and any(gpu_nodes):  # the driver's own GPUs, at least (never those Ray
            return _local(need_memory, command)  # was not given)
        _unknown_gpus(len(gpu_nodes), need_memory, need_dtype)
        return GpuInfo()
    return _smallest(rows, len(gpu_nodes))


def _unknown_gpus(gpu_nodes: int, need_memory: bool, need_dtype: bool) -> None:
    """Say what GPUs no node described mean for the settings left to them."""
    means = ["train.dtype=auto means float32"] * need_dtype
    means += ["the memory model plans 16 GiB GPUs"] * need_memory
    sets = ["train.dtype=bfloat16"] * need_dtype + ["launch.device_memory_gb"] * need_memory
    said = f"Ray counts GPUs on {gpu_nodes} node(s), but none said what they are (no nvidia-smi, "
    said += "MIG, or a torch without CUDA there)"
    if not means:  # (both set: nothing rests on it)
        log.info(said)
        return
    log.warning(
        "%s: %s; if they are CUDA GPUs, set %s", said, " and ".join(means), " and ".join(sets)
    )


class Early:
    """:func:`ask`'s answer for a Ray instance started on this machine, read in a thread begun
    before Ray starts: reading the free memory (a process that imports torch and makes a CUDA
    context) takes seconds, which Ray's own start then hides."""

    def __init__(self, need_memory: bool, gpus: int = 0) -> None:
        self._answer: list[GpuInfo] = []
        self._thread = threading.Thread(
            target=self._read, args=(need_memory, gpus), name="sweep-gpu-probe", daemon=True
        )  # (daemon: a stop during start-up does not wait for it)
        self._thread.start()

    def _read(self, need_memory: bool, gpus: int) -> None:
        try:
            self._answer.append(_local(need_memory, "nvidia-smi", gpus))
        except Exception as err:  # noqa: BLE001 (ask() asks again, and says what fails)
            log.debug("the early GPU probe failed: %s", err)

    @classmethod
    def begin(cls, local_ray: bool, need_memory: bool, gpus: int = 0) -> Early | None:
        """Start reading when a local Ray instance's GPUs are this machine's and torch sees
        CUDA here (else :func:`ask` asks Ray's nodes, once Ray is up): None otherwise."""
        return cls(need_memory, gpus) if local_ray and _torch_sees_cuda() else None

    def answer(self) -> GpuInfo | None:
        """The answer (waiting for it); None if the thread failed (then :func:`ask`)."""
        self._thread.join()
        return self._answer[0] if self._answer else None


def _smallest(rows: list[Row], gpu_nodes: int) -> GpuInfo:
    """Every ensemble may land on any GPU: plan for the one with the least free memory."""
    free, total, _ = min(rows)
    most = max(f for f, _, _ in rows)
    if free < 0.9 * most:
        log.warning(
            "the cluster's GPUs differ (%.1f to %.1f GiB free): planning every ensemble for "
            "the smallest",
            free / 2**30,
            most / 2**30,
        )
    log.info("%d GPU(s) on %d node(s), the least free %.1f GiB", len(rows), gpu_nodes, free / 2**30)
    exclusive = any(exclusive_mode(mode) for _, _, mode in rows)
    return GpuInfo(usable_gpu_bytes(free, total), exclusive, real=True)


def cluster_answers(command: str = "nvidia-smi") -> list[tuple[list[Row], bool]]:
    """:func:`node_facts` of every alive Ray node with GPUs, from tasks that ask for no
    resources; the nodes that do not answer in time are named and left out."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    if not ray.is_initialized():
        return []
    nodes = [n["NodeID"] for n in ray.nodes() if n.get("Alive") and n["Resources"].get("GPU")]
    task = ray.remote(num_cpus=0)(node_facts)
    refs = {
        task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n, soft=False)).remote(
            command
        ): n
        for n in nodes
    }
    ready, silent = ray.wait(list(refs), num_returns=len(refs), timeout=PROBE_SECONDS)
    answers, lost = [], [refs[r] for r in silent]
    for ref in ready:
        try:
            answers.append(ray.get(ref))
        except ray.exceptions.RayError:
            lost.append(refs[ref])
    if lost:
        log.warning(
            "%d of %d GPU node(s) did not say what their GPUs are (%s); planning with the "
            "others' answers",
            len(lost),
            len(nodes),
            ", ".join(n[:8] for n in lost),
        )
    for ref in silent:
        with contextlib.suppress(Exception):
            ray.cancel(ref, force=True)
    return answers


def _local(need_memory: bool, command: str, gpus: int = 0) -> GpuInfo:
    free = _local_free(gpus) if need_memory else 0.0
    return GpuInfo(free, exclusive_here(command), real=True)


def exclusive_mode(mode: str) -> bool:
    return mode.startswith("Exclusive")


def exclusive_here(command: str = "nvidia-smi") -> bool:
    """Whether a GPU of this machine takes one process at a time."""
    return any(exclusive_mode(mode) for _, _, mode in read_nvidia_smi(command))


LEAST_FREE = """
import sys, torch
free = []
for i in range(torch.cuda.device_count())[: int(sys.argv[1]) or None]:
    try:
        free.append(torch.cuda.mem_get_info(i))
    except Exception:  # (an exclusive-mode GPU another process holds: not one Ray gives)
        pass
print(*min(free))
"""
"""Prints the free and total bytes of the GPU with the least free memory (a MIG slice: its
own) of the first ``argv[1]`` visible ones (0: all): any that Ray gives may get an ensemble."""


def _local_free(gpus: int = 0) -> float:
    """:data:`LEAST_FREE` of the ``gpus`` (0: all) visible GPUs Ray uses here (its local
    instance takes the first ``launch.num_gpus``), read in a short-lived process so
    that the driver, which trains nothing, never holds a CUDA context (and its memory) for
    the whole sweep; 0 when that fails. Free, not total: another process on a GPU (a second
    sweep, a notebook) keeps what it holds."""
    try:
        out = subprocess.run(
            [sys.executable, "-c", LEAST_FREE, str(gpus)],
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )
        free, total = (float(v) for v in out.stdout.split()[-2:])
    except (OSError, ValueError, subprocess.SubprocessError) as err:
        log.warning("could not read the GPU's free memory (%s)", type(err).__name__)
        return 0.0
    return usable_gpu_bytes(free, total)
