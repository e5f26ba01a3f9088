"""Run-folder layout, atomic writes, checkpoints and the DONE marker.

``SWEEP_DIR/runs/<run_id>/`` holds one grid point:

- ``spec.json``      every hyperparameter of the point
- ``cfg.json``       what :func:`sweep.sae.load_run` needs to rebuild the SAE
- ``sae.safetensors`` final weights (plain tensors)
- ``metrics.jsonl``  training curve; ``metrics.json`` final metrics
- ``checkpoint-<step>.safetensors`` while training (params, Adam state, cursor, thread count)
- ``DONE``           written last: the folder is final only when it exists
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from sweep.errors import RunDirError

DONE = "DONE"
SPEC = "spec.json"
CFG = "cfg.json"
WEIGHTS = "sae.safetensors"
METRICS = "metrics.json"
CURVE = "metrics.jsonl"
DIVERGED = "diverged.json"
FAILED = "FAILED"
INTERRUPTED = "interrupted.json"
PLACEMENT = "placement.json"
EVENTS = "events.jsonl"
CKPT_PREFIX = "checkpoint-"


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_read_umask()  # what open() would give; mkstemp alone gives 0600


def atomic_write(path: str | Path, write: Callable[[BinaryIO], object]) -> None:
    """Call ``write(file)`` on a temp file in the same folder, fsync, then rename onto ``path``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.fchmod(fd, _FILE_MODE)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def atomic_write_json(path: str | Path, obj: object) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def read_json(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())


def ensure_writable(folder: str | Path, what: str) -> Path:
    """Create ``folder`` if needed and prove we can write into it."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".write-probe.")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise RunDirError(
            f"{what} {folder} is not writable ({err.strerror}); choose another folder"
        ) from err
    return folder


def run_dir(sweep_dir: str | Path, run_id: str) -> Path:
    return Path(sweep_dir) / "runs" / run_id


def is_done(folder: str | Path) -> bool:
    return (Path(folder) / DONE).is_file()


def append_curve(folder: Path, records: list[dict]) -> None:
    """Append training-curve records to ``metrics.jsonl`` (one line each)."""
    with open(folder / CURVE, "a") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def append_event(folder: Path, event: dict) -> None:
    """Record something a user should know about this run (``events.jsonl``)."""
    with open(folder / EVENTS, "a") as f:
        f.write(json.dumps({"time": time.time(), **event}) + "\n")


def truncate_curve(folder: Path, after_step: int) -> None:
    """Drop curve records past ``after_step`` (written after the checkpoint we resume from)."""
    path = folder / CURVE
    if not path.exists():
        return
    keep = [
        ln
        for ln in path.read_text().splitlines()
        if ln.strip() and json.loads(ln)["step"] <= after_step
    ]
    atomic_write_bytes(path, "".join(ln + "\n" for ln in keep).encode())


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
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


def save_checkpoint(folder: Path, ckpt: Checkpoint, keep: int = 2) -> None:
    """Write ``checkpoint-<step>.safetensors`` atomically, then prune all but the newest ``keep``."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in ckpt.tensors.items()}
    meta = {
        "meta": json.dumps(ckpt.meta, sort_keys=True),
        "step": str(ckpt.step),
        "sha256": _digest(tensors),
    }
    atomic_write_bytes(
        folder / f"{CKPT_PREFIX}{ckpt.step:09d}.safetensors", save(tensors, metadata=meta)
    )
    for old in list_checkpoints(folder)[:-keep]:
        old.unlink(missing_ok=True)


def list_checkpoints(folder: Path) -> list[Path]:
    return sorted(folder.glob(f"{CKPT_PREFIX}*.safetensors"))


def load_checkpoint(path: Path) -> Checkpoint:
    """Load and verify one checkpoint; raises ``ValueError`` if it is truncated or corrupt."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, RuntimeError) as err:
        raise ValueError(f"unreadable checkpoint {path.name}: {err}") from err
    if meta.get("sha256") != _digest(tensors):
        raise ValueError(f"checkpoint {path.name} fails its checksum")
    return Checkpoint(step=int(meta["step"]), tensors=tensors, meta=json.loads(meta["meta"]))


def checkpoint_steps(folder: Path) -> set[int]:
    """Steps of the checkpoint files in ``folder`` (by name; not verified)."""
    return {int(p.stem[len(CKPT_PREFIX) :]) for p in list_checkpoints(folder)}


def common_checkpoint(folders: list[Path]) -> tuple[list[Checkpoint] | None, list[str]]:
    """The newest step at which EVERY folder has a checkpoint that verifies, loaded.

    An ensemble saves its members one after another, so a kill between two saves leaves them
    one checkpoint apart; keeping two per member guarantees a common one. Returns ``None`` when
    there is none, with notes on the checkpoints that failed verification.
    """
    notes: list[str] = []
    for step in sorted(set.intersection(*(checkpoint_steps(f) for f in folders)), reverse=True):
        try:
            return [
                load_checkpoint(f / f"{CKPT_PREFIX}{step:09d}.safetensors") for f in folders
            ], notes
        except ValueError as err:
            notes.append(f"{err}")
    return None, notes


def clear_checkpoints(folder: Path) -> None:
    for p in list_checkpoints(folder):
        p.unlink(missing_ok=True)
