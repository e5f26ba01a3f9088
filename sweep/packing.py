"""``launch.gpus_per_ensemble=auto``: how much of a GPU each ensemble asks Ray for.

Ray runs tasks whose GPU shares add up to at most 1 on the same GPU. Two processes on one GPU
time-slice it: sharing pays when an ensemble alone leaves the GPU idle part of the time (its
step is too small to hide the host's kernel launches; start-up, evaluation and writes) and
costs nothing but memory otherwise. So each ensemble asks for the smallest share in
:data:`SHARES` that holds its memory (the memory model of :func:`sweep.grid.bytes_per_member`
plus the batch stream's staged chunks) and covers its modelled GPU load: the time its step's
GEMMs keep the GPU busy over the time the host needs to issue the step,

    load = min(1, (12 * B * d * m * E / SUSTAINED_FLOPS[dtype]) / HOST_SECONDS_PER_STEP).

Ray packs fractional tasks onto one GPU before it uses the next, so :func:`fill` then raises
the costliest ensembles' shares while the cluster's GPUs could hold them all at once.

The constants are modelled from the H200 figures in issue 10 (the step reaches 0.3-0.55 of
the bf16 peak; ~100 launches per step); scripts/benchmarks/e2e.py reports what auto chose
against fixed shares on a GPU, which is what tunes them.
"""

from __future__ import annotations

import math

from sweep.grid import MEMORY_USE, EnsembleSpec, bytes_per_member
from sweep.io import memory_text

SHARES = (0.25, 0.5, 1.0)
"""GPU shares auto chooses from (four ensembles per GPU at most)."""
SUSTAINED_FLOPS = {"bfloat16": 3e14, "float16": 3e14, "tf32": 1.5e14, "float32": 4e13}
"""FLOP/s an ensemble step sustains on a current datacenter GPU, by compute dtype."""
HOST_SECONDS_PER_STEP = 1e-3
"""Host time to issue one ensemble step (kernel launches and Python), which a step whose
GPU time is shorter cannot hide."""


def gpu_load(width: int, dict_size: int, batch: int, members: int, dtype: str) -> float:
    """Modelled fraction of the time one ensemble alone keeps a GPU busy while training."""
    flops = 12.0 * batch * width * dict_size * members  # nominal: 6 GEMMs forward + backward
    gpu_seconds = flops / SUSTAINED_FLOPS.get(dtype, SUSTAINED_FLOPS["float32"])
    return min(1.0, gpu_seconds / HOST_SECONDS_PER_STEP)


def gpu_share(
    ens: EnsembleSpec,
    batch: int,
    dtype: str,
    gpu_bytes: float,
    stream_bytes: float = 0.0,
    buffers: float = 3,
) -> float:
    """The GPU share ``ens`` asks for: the smallest of :data:`SHARES` covering its memory
    (``stream_bytes``: the batch stream's chunks staged on the device; ``buffers``: see
    :func:`sweep.grid.bytes_per_member`) and its load."""
    width, members = ens.members[0].width, len(ens.members)
    memory = members * bytes_per_member(width, ens.dict_size, batch, dtype, buffers) + stream_bytes
    need = max(
        memory / (MEMORY_USE * gpu_bytes), gpu_load(width, ens.dict_size, batch, members, dtype)
    )
    return next((s for s in SHARES if s >= need), 1.0)


def fill(shares: dict[EnsembleSpec, float], gpus: float) -> dict[EnsembleSpec, float]:
    """``shares`` raised while the GPUs could hold them all at once: Ray packs fractional
    tasks onto one GPU before it uses the next, so four quarter-GPU ensembles on a four-GPU
    node would share GPU 0 while three idle. In rounds, each ensemble is raised a share,
    the costliest (members x dict size) first, as long as the total stays within ``gpus``:
    four alike on two GPUs get half of one each, not shares of 1, 0.5, 0.25 and 0.25 (three
    on one GPU)."""
    out = dict(shares)
    order = sorted(out, key=lambda e: -len(e.members) * e.dict_size)  # stable: plan order
    raised = True
    while raised:
        raised = False
        for e in order:
            up = next((s for s in SHARES if s > out[e]), None)
            if up is not None and sum(out.values()) - out[e] + up <= gpus + 1e-9:
                out[e], raised = up, True
    return out


def packed_note(share: float, ensembles: int, gpus: float) -> str | None:
    """What a fixed fraction of a GPU per ensemble leaves idle, or None: Ray fills one GPU
    with fractional tasks before it uses the next, so ``ensembles`` asking for ``share`` each
    run on ceil(ensembles x share) of the ``gpus``."""
    if share >= 1 or ensembles < 2:
        return None
    used, whole = math.ceil(ensembles * share - 1e-9), math.floor(gpus + 1e-9)
    if used >= min(ensembles, whole):
        return None
    return (
        f"launch.gpus_per_ensemble={share:g}: Ray fills one GPU with fractional tasks before "
        f"it uses the next, so these {ensembles} ensembles share {used} of the {gpus:g} GPUs "
        f"and {whole - used} idle; launch.gpus_per_ensemble=auto raises shares while GPUs "
        "are free"
    )


HOST_SNAPSHOT_SHARE = 0.5
"""The share of the host's memory the checkpoint snapshots of the ensembles training at once
on GPUs may take before the plan says so."""


def host_note(
    snapshots: dict[EnsembleSpec, float], shares: dict[EnsembleSpec, float], gpus: float,
    host_bytes: float, fewer: str = "launch.num_gpus",
) -> str | None:  # fmt: skip
    """Said when the checkpoint snapshots (``snapshots``, bytes per ensemble) of the ensembles
    that may train at once — the largest first, as many as the ``gpus`` hold at their
    ``shares`` — exceed :data:`HOST_SNAPSHOT_SHARE` of ``host_bytes``: on a GPU each keeps
    its weights and Adam moments in host memory to write checkpoints while it trains, and a
    job's memory limit would end a worker at its first checkpoint. ``fewer``: what sets the
    GPUs used."""
    held, used, at_once = 0.0, 0.0, 0
    for e in sorted(snapshots, key=lambda e: -snapshots[e]):
        if used + shares[e] <= gpus + 1e-9:
            used, held, at_once = used + shares[e], held + snapshots[e], at_once + 1
    if held <= HOST_SNAPSHOT_SHARE * host_bytes:
        return None
    fixes = ["more host memory (a SLURM job: --mem)"]
    fixes += [f"fewer GPUs at once ({fewer})"] * (at_once > 1)
    fixes += ["smaller ensembles (grid.max_members)"] * any(len(e.members) > 1 for e in shares)
    return (
        f"the {at_once} ensemble(s) that may train at once keep {memory_text(held)} of "
        f"checkpoint snapshots in host memory (each its weights and Adam moments): "
        f"{held / host_bytes:.0%} of the {memory_text(host_bytes)} this machine lets the "
        "sweep use (a SLURM or container limit counts), a worker may be killed at its first "
        f"checkpoint; give it {', or '.join(fixes)}"
    )


def describe(shares: dict[str, float]) -> str:
    """``r32-e0 1, r4-e0 0.25`` for the log."""
    return ", ".join(f"{name} {share:g}" for name, share in shares.items())
