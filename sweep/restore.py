"""An ensemble's state on disk: restore it from its members' checkpoints (or initialise it
fresh), and checkpoint it again.

A first run, a retry and a resume are the same code path: the worker calls
:func:`restore_ensemble` at its top. Restore alone decides where the members continue (the
planner only keeps the members of an ensemble together): the newest step at which every
member has a checkpoint that verifies (:func:`sweep.checkpoints.common_checkpoint`). A
checkpoint that fails verification is reported in its run's ``events.jsonl``
(``bad_checkpoint``); every member that continues from an older step than its newest
checkpoint, or from scratch although it had checkpoints, gets a warning and a
``resume_fallback`` event (``newest``, ``resumed_from``, ``reason``).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass

import torch

from sweep import archs, sae
from sweep.activations.store import Cursor
from sweep.archs import Architecture
from sweep.checkpoints import Checkpoint, Found, common_checkpoint, drop_after
from sweep.config import TrainConfig
from sweep.devices import processor, resolve_compute_dtype
from sweep.ensemble import DeadLatents, Ensemble, hyper_of, stack
from sweep.grid import RunSpec
from sweep.optim import Adam, AdamState
from sweep.rundir import RunFolder

log = logging.getLogger(__name__)


@dataclass
class Restored:
    """An ensemble ready to train from ``cursor`` (``step`` steps already taken)."""

    ens: Ensemble
    cursor: Cursor
    step: int
    diverged_at: torch.Tensor
    """(E,) long: the step at which each member diverged, -1 for healthy members."""


def init_seed(run: RunSpec, train: TrainConfig) -> int:
    """The seed of ``run``'s initial parameters (``train.init_seeding``): runs that differ only
    in l1 / k start alike; with ``per_ratio`` runs of different dictionary sizes do not."""
    if train.init_seeding == "shared":  # sweeps recorded before init_seeding
        return (train.seed * 1_000_003 + run.seed) % 2**64  # (torch's range; smaller kept)
    key = f"init:{train.seed}:{run.seed}:{run.dict_size}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "little") >> 1


def init_member(
    run: RunSpec, train: TrainConfig, b_dec: torch.Tensor, arch: Architecture | None = None
) -> sae.Params:
    g = torch.Generator().manual_seed(init_seed(run, train))
    arch = arch or archs.get(run.arch)
    return arch.init_params(run.width, run.dict_size, g, b_dec)


def compute_dtype(
    train: TrainConfig, device: torch.device, arch: Architecture
) -> torch.dtype | None:
    """The autocast dtype of ``train.dtype`` (None = plain fp32; ``auto``: the architecture's
    GPU dtype on CUDA). On CUDA, TF32 matmuls are switched on for tf32 and off otherwise (the
    flag is process-wide: a later fp32 ensemble in the same process must not inherit it)."""
    name = resolve_compute_dtype(train.dtype, device.type == "cuda", arch.gpu_dtype)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = name == "tf32"
    return torch.bfloat16 if name == "bfloat16" else None


def training_ended(device: torch.device) -> None:
    """TF32 matmuls off again once training ends: members are evaluated in fp32 whatever
    they trained in, as ``sweep evaluate`` (a fresh process) evaluates them, so their
    metrics agree."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False


GPU_COMPILED_RESUME_CONFIRMED = False
"""Whether a compiled step has been measured to resume bit-exactly on a GPU (the compiled
resume tests of tests/test_gpu.py passing on the H200). Until then ``train.compile=auto``
leaves the step eager on GPUs and a compiled step resumed on one is reported inexact: an H200
(torch 2.11) resumed a compiled run with other bits than its uninterrupted self; the likely
cause is fixed (:mod:`sweep.compiled`) but not yet measured there. A GPU session that sees
those tests pass sets this (and the README's "Compiled step" paragraph) to match."""


def use_compile(train: TrainConfig, device: torch.device) -> bool:
    """Whether ``train.compile`` compiles the step on ``device``. ``auto``: on a GPU once
    :data:`GPU_COMPILED_RESUME_CONFIRMED` (exact resume, on by default, comes first), never on
    the CPU, where the eager step measured faster (0.8x at 128 x 512, K=16)."""
    setting = str(train.compile).lower()
    if setting == "auto":
        return device.type == "cuda" and GPU_COMPILED_RESUME_CONFIRMED
    return setting == "true"


def use_cuda_graphs(train: TrainConfig, device: torch.device) -> bool:
    """Whether ``train.cuda_graphs`` replays the step as CUDA graphs on ``device``: wherever
    it is compiled on a GPU, unless ``false``. (``true`` where it is not, an ensemble placed
    on the CPU by ``train.device=auto``: warned about.)"""
    wanted = str(train.cuda_graphs).lower()
    on = device.type == "cuda" and use_compile(train, device)
    if wanted == "true" and not on:
        log.warning(
            "train.cuda_graphs=true but this ensemble's step is not compiled on a GPU "
            "(device %s): it runs without CUDA graphs", device,
        )  # fmt: skip
    return on and wanted != "false"


def step_kind(train: TrainConfig, arch: Architecture, device: torch.device) -> str:
    """How an ensemble's step runs on ``device``, in words (``sweep run --plan``)."""
    if not arch.fast:
        return "vmapped"
    if not use_compile(train, device):
        return "eager"
    return "compiled + CUDA graphs" if use_cuda_graphs(train, device) else "compiled"


def _found(folders: list[RunFolder], ensemble_id: str) -> list[Checkpoint | None]:
    """Every member's checkpoint at the newest common verified step, or all None.

    This is the one place that decides where a run resumes; every way it can fall short of
    a member's newest checkpoint is loud (log + the run's ``events.jsonl``)."""
    found = common_checkpoint([f.path for f in folders])
    out: list[Checkpoint | None] = list(found.loaded) if found.loaded else [None] * len(folders)
    action = f"resumed from step {found.step}" if found.step else "restarted from scratch"
    for path, note in found.bad:
        log.warning("run %s (ensemble %s): %s; %s", path.name, ensemble_id, note, action)
        RunFolder(path).append_event({"event": "bad_checkpoint", "detail": note, "action": action})
    _report_fallback(folders, found, ensemble_id)
    for f in folders:  # (recorded above; training makes them again, bit for bit)
        drop_after(f.path, found.step)
    return out


def _report_fallback(folders: list[RunFolder], found: Found, ensemble_id: str) -> None:
    """Warn and record ``resume_fallback`` in each member whose newest checkpoint is newer
    than the step the ensemble continues from (a damaged or missing newer checkpoint, here or
    in another member: the members share one data cursor, so all go back together)."""
    for folder, newest in zip(folders, found.newest, strict=True):
        if newest <= found.step:
            continue
        why = [f"step {s}: {'; '.join(notes)}" for s, notes in found.skipped.items() if s <= newest]
        reason = " | ".join(why)
        used = f"step {found.step}" if found.step else "scratch (no common checkpoint verifies)"
        log.warning(
            "run %s (ensemble %s): newest checkpoint is step %d but resuming from %s: %s",
            folder.run_id, ensemble_id, newest, used, reason,
        )  # fmt: skip
        folder.append_event(
            {
                "event": "resume_fallback",
                "newest": newest,
                "resumed_from": found.step,
                "reason": reason,
            }
        )


def _report_change(
    folders: list[RunFolder], event: str, before: object, now: object, said: str
) -> None:
    """Warn ``said`` and record ``event`` (``before``, ``now``) in each run's events when a
    resume computes otherwise than its checkpoints were (unknown before: silent)."""
    if before is None or before == now:
        return
    log.warning(said)
    for folder in folders:
        folder.append_event({"event": event, "before": before, "now": now})


def _report_program_change(
    folders: list[RunFolder], before: str | None, now: str, ensemble_id: str
) -> None:
    """``step_program_change`` when the step continues in another program than the
    checkpoint's (another device, ``train.compile``, or a newer sweep's path): equal up to
    rounding, so not bit-identical to an uninterrupted run."""
    said = (
        f"ensemble {ensemble_id} resumes with step program '{now}', its checkpoints were "
        f"written by '{before}': its runs will not be bit-identical to an uninterrupted sweep"
    )
    _report_change(folders, "step_program_change", before, now, said)


def _report_inexact_resume(
    folders: list[RunFolder], ens: Ensemble, device: torch.device, ensemble_id: str
) -> None:
    """Warn and record ``inexact_resume`` when a compiled step resumes on a GPU
    (``train.compile=true``) while it is not :data:`GPU_COMPILED_RESUME_CONFIRMED` to resume
    exactly there: measured so far, it continued equal only up to rounding."""
    if not (ens.compiled and device.type == "cuda") or GPU_COMPILED_RESUME_CONFIRMED:
        return
    log.warning(
        "ensemble %s resumes with the compiled step on a GPU, which continues equal to an "
        "uninterrupted run only up to rounding, not bit for bit; train.compile=false resumes "
        "exactly",
        ensemble_id,
    )
    for folder in folders:
        folder.append_event({"event": "inexact_resume", "why": "compiled step on a GPU"})


def _report_processor_change(
    folders: list[RunFolder], before: str | None, now: str, ensemble_id: str
) -> None:
    """``processor_change`` when the ensemble resumes on another chip model than its
    checkpoints were written on (a retry or re-run landing on another node type): its
    kernels may round or order differently."""
    said = (
        f"ensemble {ensemble_id} resumes on {now}; its checkpoints were written on {before}: "
        "its runs may not be bit-identical to an uninterrupted sweep"
    )
    _report_change(folders, "processor_change", before, now, said)


def software() -> dict[str, str]:
    """The versions whose kernels and training code a checkpoint was computed with."""
    import sweep

    return {"sweep": sweep.__version__, "torch": torch.__version__}


def _versions(v: dict) -> str:
    return ", ".join(f"{name} {v.get(name, '?')}" for name in sorted(software()))


def _report_software_change(
    folders: list[RunFolder], before: dict | None, ensemble_id: str
) -> None:
    """``software_change`` when the ensemble resumes under another torch or sweep than its
    checkpoints were written with: kernels and defaults may round or order differently, so
    exactness against an uninterrupted run is no longer promised."""
    now = software()
    said = (
        f"ensemble {ensemble_id} resumes under {_versions(now)}; its checkpoints were written "
        f"under {_versions(before or {})}: its runs may not be bit-identical to an "
        "uninterrupted sweep"
    )
    _report_change(folders, "software_change", before, now, said)


def dead_latents(train: TrainConfig, run: RunSpec) -> DeadLatents | None:
    """Dead-latent tracking for these runs: AuxK (TopK family, ``train.auxk_alpha`` > 0) or
    resampling (L1-penalised, ``train.resample_dead`` > 0); None when neither applies."""
    topk_family = archs.get(run.arch).knob == "k"
    if topk_family and train.auxk_alpha > 0:
        k_aux = max(1, min(run.width // 2, run.dict_size))
        return DeadLatents(train.dead_tokens, train.auxk_alpha, k_aux)
    if not topk_family and train.resample_dead > 0:
        return DeadLatents(train.dead_tokens)
    return None


def learning_rates(runs: tuple[RunSpec, ...], train: TrainConfig) -> float | tuple[float, ...]:
    """``train.lr``, or each run's own where the grid has an lr axis."""
    if all(r.lr is None for r in runs):
        return train.lr
    return tuple(r.learning_rate(train.lr) for r in runs)


def _prefixed(c: Checkpoint, prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in c.tensors.items() if k.startswith(prefix)}


def _ensemble(
    runs: tuple[RunSpec, ...],
    found: list[Checkpoint | None],
    train: TrainConfig,
    device: torch.device,
    b_dec: torch.Tensor,
    step: int,
    arch: Architecture,
) -> Ensemble:
    """The members at their checkpoints (all found), or fresh (none found)."""
    fresh = found[0] is None
    members = [
        init_member(run, train, b_dec, arch) if c is None else _prefixed(c, "param.")
        for run, c in zip(runs, found, strict=True)
    ]
    params = {k: v.to(device) for k, v in stack(members).items()}
    states = [
        {k: v for k, v in c.tensors.items() if k.startswith("adam.")}
        for c in found
        if c is not None
    ]
    saved = [_prefixed(c, "buffer.") for c in found if c is not None]
    active = [True if c is None else bool(c.meta["active"]) for c in found]
    ens = Ensemble(
        params,
        hyper_of([r.l1 for r in runs], [r.k for r in runs], device),
        Adam(learning_rates(runs, train), (train.betas[0], train.betas[1]), train.eps),
        arch=arch,
        state=None if fresh else AdamState.stack(states, list(params), device),
        active=torch.tensor(active, device=device),
        autocast_dtype=compute_dtype(train, device, arch),
        dead=dead_latents(train, runs[0]),
        rows=step * train.batch_size,
        grad_clip=None if train.grad_clip is None else train.grad_clip / runs[0].width,
        compiled=use_compile(train, device),
        cuda_graphs=use_cuda_graphs(train, device),
    )
    if saved and saved[0]:  # checkpoints written before buffers existed keep fresh ones
        ens.buffers = {k: v.to(device) for k, v in stack(saved).items()}
    return ens


def restore_ensemble(
    runs: tuple[RunSpec, ...],
    folders: list[RunFolder],
    train: TrainConfig,
    device: torch.device,
    b_dec: torch.Tensor,
    ensemble_id: str,
    arch: Architecture | None = None,
) -> Restored:
    """The members' newest common checkpoint (all at one cursor), or a fresh init with
    ``b_dec`` (the scaled data mean). Training curves and step events are cut back to the
    restored step."""
    found = _found(folders, ensemble_id)
    step = 0 if found[0] is None else found[0].step
    arch = arch or archs.get(runs[0].arch)
    ens = _ensemble(runs, found, train, device, b_dec, step, arch)
    diverged = [-1 if c is None else int(c.meta.get("diverged_step", -1)) for c in found]
    diverged_at = torch.tensor(diverged, dtype=torch.long, device=device)
    for f in folders:
        f.drop_records_after(step)  # (curve points and step events: the steps are redone)
    if found[0] is None:
        return Restored(ens, Cursor(), 0, diverged_at)
    meta = found[0].meta
    _report_program_change(folders, meta.get("program"), ens.program, ensemble_id)
    _report_software_change(folders, meta.get("software"), ensemble_id)
    _report_processor_change(folders, meta.get("processor"), processor(device), ensemble_id)
    _report_inexact_resume(folders, ens, device, ensemble_id)
    if meta.get("threads") and meta["threads"] != torch.get_num_threads():
        torch.set_num_threads(int(meta["threads"]))  # bit-exact resume needs the same count
    return Restored(ens, Cursor(**meta["cursor"]), step, diverged_at)


def member_tensors(ens: Ensemble, e: int) -> dict[str, torch.Tensor]:
    """Member ``e``'s parameters and Adam state as flat named tensors."""
    out = {f"param.{k}": v[e] for k, v in ens.params.items()}
    out.update(ens.state.member(e))
    out.update({f"buffer.{k}": v[e] for k, v in ens.buffers.items()})
    return out


def checkpoint_meta(ens: Ensemble, cursor: Cursor, diverged_at: torch.Tensor) -> list[dict]:
    """Each member's checkpoint metadata: the data cursor, the thread count, the step
    program, software versions and chip, its flags."""
    active, diverged, versions = ens.active.tolist(), diverged_at.tolist(), software()
    chip = processor(ens.hyper["l1"].device)
    return [
        {
            "cursor": cursor.as_dict(),
            "threads": torch.get_num_threads(),
            "program": ens.program,
            "software": versions,
            "processor": chip,
            "active": active[e],
            "diverged_step": diverged[e],
        }
        for e in range(len(active))
    ]
