"""An ensemble's state on disk: restore it from its members' checkpoints (or initialise it
fresh), and checkpoint it again.

A first run, a retry and a resume are the same code path: the worker calls
:func:`restore_ensemble` at its top. Restore picks the newest step at which every member
has a checkpoint that verifies (:func:`sweep.checkpoints.common_checkpoint`); a checkpoint
that fails verification is reported in every member's ``events.jsonl``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from sweep import sae
from sweep.activations.store import Cursor
from sweep.checkpoints import Checkpoint, common_checkpoint
from sweep.config import TrainConfig
from sweep.devices import resolve_compute_dtype
from sweep.ensemble import Ensemble, stack
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


def init_member(run: RunSpec, train: TrainConfig, b_dec: torch.Tensor) -> sae.Params:
    g = torch.Generator().manual_seed(train.seed * 1_000_003 + run.seed)
    return sae.init_params(run.arch, run.width, run.dict_size, g, b_dec=b_dec)


def compute_dtype(train: TrainConfig, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``train.dtype`` (None = plain fp32); tf32 switches on TF32 matmuls."""
    name = resolve_compute_dtype(train.dtype, device.type == "cuda")
    if name == "tf32" and device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    return torch.bfloat16 if name == "bfloat16" else None


def _found(folders: list[RunFolder], ensemble_id: str) -> list[Checkpoint | None]:
    """Every member's checkpoint at the newest common verified step, or all None."""
    loaded, notes = common_checkpoint([f.path for f in folders])
    found: list[Checkpoint | None] = list(loaded) if loaded else [None] * len(folders)
    action = f"resumed from step {found[0].step}" if found[0] else "restarted from scratch"
    for path, note in notes:
        log.warning("run %s (ensemble %s): %s; %s", path.name, ensemble_id, note, action)
        RunFolder(path).append_event({"event": "bad_checkpoint", "detail": note, "action": action})
    return found


def restore_ensemble(
    runs: tuple[RunSpec, ...],
    folders: list[RunFolder],
    train: TrainConfig,
    device: torch.device,
    b_dec: torch.Tensor,
    ensemble_id: str,
) -> Restored:
    """The members' newest common checkpoint (all at one cursor), or a fresh init with
    ``b_dec`` (the scaled data mean). Training curves are cut back to the restored step."""
    found = _found(folders, ensemble_id)
    fresh = found[0] is None
    members = [
        init_member(run, train, b_dec)
        if c is None
        else {k[6:]: v for k, v in c.tensors.items() if k.startswith("param.")}
        for run, c in zip(runs, found, strict=True)
    ]
    params = {k: v.to(device) for k, v in stack(members).items()}
    states = [{k: v for k, v in c.tensors.items() if k.startswith("adam.")} for c in found if c]
    active = [True if c is None else bool(c.meta["active"]) for c in found]
    diverged = [-1 if c is None else int(c.meta.get("diverged_step", -1)) for c in found]
    ens = Ensemble(
        params,
        torch.tensor([r.l1 for r in runs], device=device),
        Adam(train.lr, (train.betas[0], train.betas[1]), train.eps),
        state=None if fresh else AdamState.stack(states, list(params), device),
        active=torch.tensor(active, device=device),
        autocast_dtype=compute_dtype(train, device),
    )
    diverged_at = torch.tensor(diverged, dtype=torch.long, device=device)
    step = 0 if fresh else found[0].step  # type: ignore[union-attr]
    for f in folders:
        f.truncate_curve(step)  # records written after the restored step are redone
    if fresh:
        return Restored(ens, Cursor(), 0, diverged_at)
    meta = found[0].meta  # type: ignore[union-attr]
    if meta.get("threads") and meta["threads"] != torch.get_num_threads():
        torch.set_num_threads(int(meta["threads"]))  # bit-exact resume needs the same count
    return Restored(ens, Cursor(**meta["cursor"]), step, diverged_at)


def member_tensors(ens: Ensemble, e: int) -> dict[str, torch.Tensor]:
    """Member ``e``'s parameters and Adam state as flat named tensors."""
    out = {f"param.{k}": v[e] for k, v in ens.params.items()}
    out.update(ens.state.member(e))
    return out


def checkpoint_meta(ens: Ensemble, cursor: Cursor, diverged_at: torch.Tensor) -> list[dict]:
    """Each member's checkpoint metadata: the data cursor, the thread count, its flags."""
    active, diverged = ens.active.tolist(), diverged_at.tolist()
    return [
        {
            "cursor": cursor.as_dict(),
            "threads": torch.get_num_threads(),
            "active": active[e],
            "diverged_step": diverged[e],
        }
        for e in range(len(active))
    ]
