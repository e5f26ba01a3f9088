"""Checkpoint files of one run folder: ``checkpoint-<step>.safetensors``.

Each holds one member's tensors (``param.*`` and ``adam.*``) and its metadata (data cursor,
thread count, active / diverged flags) with one sha256 over the step, the metadata and the
tensors, so a changed cursor is caught like a changed weight. Writes are atomic and the
previous checkpoint is kept until a newer one is complete. (Checkpoints of format 1, whose
sha256 covered the tensors only, still load.)
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from sweep.io import atomic_write_bytes

PREFIX = "checkpoint-"
FORMAT = "2"


def _digest(tensors: dict[str, torch.Tensor], header: str = "") -> str:
    h = hashlib.sha256(header.encode())
    for k in sorted(tensors):
        h.update(k.encode())
        h.update(tensors[k].contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@dataclass
class Checkpoint:
    """One member's state at ``step``: tensors (params + optimizer) and metadata."""

    step: int
    tensors: dict[str, torch.Tensor]
    meta: dict


def path_of(folder: Path, step: int) -> Path:
    return folder / f"{PREFIX}{step:09d}.safetensors"


def save_checkpoint(folder: Path, ckpt: Checkpoint, keep: int = 2) -> None:
    """Write ``checkpoint-<step>.safetensors`` atomically, then prune all but the newest ``keep``."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in ckpt.tensors.items()}
    meta = {"meta": json.dumps(ckpt.meta, sort_keys=True), "step": str(ckpt.step), "format": FORMAT}
    meta["sha256"] = _digest(tensors, _header(meta))
    atomic_write_bytes(path_of(folder, ckpt.step), save(tensors, metadata=meta))
    for old in list_checkpoints(folder)[:-keep]:
        old.unlink(missing_ok=True)


def _header(meta: dict[str, str]) -> str:
    """What the checksum covers besides the tensors (format 2: step and metadata)."""
    return f"{meta['step']}\n{meta['meta']}" if meta.get("format") == FORMAT else ""


def list_checkpoints(folder: Path) -> list[Path]:
    return sorted(Path(folder).glob(f"{PREFIX}*.safetensors"))


def load_checkpoint(path: Path) -> Checkpoint:
    """Load and verify one checkpoint; raises ``ValueError`` if it is truncated or corrupt."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, RuntimeError) as err:
        raise ValueError(f"unreadable checkpoint {path.name}: {err}") from err
    try:
        ok = meta.get("sha256") == _digest(tensors, _header(meta))
        ckpt = Checkpoint(step=int(meta["step"]), tensors=tensors, meta=json.loads(meta["meta"]))
    except (KeyError, ValueError) as err:
        raise ValueError(f"checkpoint {path.name} has damaged metadata ({err})") from err
    if not ok or ckpt.step != int(path.stem[len(PREFIX) :]):
        raise ValueError(f"checkpoint {path.name} fails its checksum")
    return ckpt


def checkpoint_steps(folder: Path) -> set[int]:
    """Steps of the checkpoint files in ``folder`` (by name; not verified)."""
    return {int(p.stem[len(PREFIX) :]) for p in list_checkpoints(folder)}


def common_checkpoint(
    folders: list[Path],
) -> tuple[list[Checkpoint] | None, list[tuple[Path, str]]]:
    """The newest step at which EVERY folder has a checkpoint that verifies, loaded.

    An ensemble saves its members one after another, so a kill between two saves leaves them
    one checkpoint apart; keeping two per member guarantees a common one. Returns ``None`` when
    there is none, with (folder, note) for each checkpoint that failed verification.
    """
    notes: list[tuple[Path, str]] = []
    for step in sorted(set.intersection(*(checkpoint_steps(f) for f in folders)), reverse=True):
        loaded, bad = [], False
        for f in folders:  # every member, so each damaged checkpoint is reported in its run
            try:
                loaded.append(load_checkpoint(path_of(f, step)))
            except ValueError as err:
                notes.append((f, str(err)))
                bad = True
        if not bad:
            return loaded, notes
    return None, notes


def clear_checkpoints(folder: Path) -> None:
    for p in list_checkpoints(folder):
        p.unlink(missing_ok=True)
