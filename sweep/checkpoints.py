"""Checkpoint files of one run folder: ``checkpoint-<step>.safetensors``.

Each holds one member's tensors (``param.*`` and ``adam.*``) and its metadata (data cursor,
thread count, active / diverged flags) with one sha256 over the step, the metadata and each
tensor's name, dtype, shape and bytes, so a changed cursor or a header that reads the same
bytes as another dtype is caught like a changed weight. Writes are atomic and the previous
checkpoint is kept until a newer one is complete. (Checkpoints of the earlier formats still
load: 1, whose sha256 covered names and bytes only, and 2, which added step and metadata.)
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from sweep import tensorfile
from sweep.errors import SweepError
from sweep.io import atomic_write, read_error

if TYPE_CHECKING:  # torch and safetensors are imported where tensors are: file names need none
    import torch

PREFIX = "checkpoint-"


class CheckpointUnreadable(SweepError):
    """A checkpoint could not be read (not found damaged): the resume stops, keeping it."""


FORMAT = "3"


def _digest(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> str:
    """The checksum of a checkpoint of ``meta["format"]`` (see the module docstring)."""
    import torch

    form = meta.get("format", "1")
    h = hashlib.sha256(f"{meta['step']}\n{meta['meta']}".encode() if form != "1" else b"")
    for k in sorted(tensors):
        t = tensors[k]
        h.update((f"{k}:{t.dtype}:{list(t.shape)}" if form not in ("1", "2") else k).encode())
        h.update(t.contiguous().reshape(-1).view(torch.uint8).numpy())  # no copy
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
    """Write ``checkpoint-<step>.safetensors`` atomically, then prune (:func:`_prune`)."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in ckpt.tensors.items()}
    meta = {"meta": json.dumps(ckpt.meta, sort_keys=True), "step": str(ckpt.step), "format": FORMAT}
    meta["sha256"] = _digest(tensors, meta)
    atomic_write(path_of(folder, ckpt.step), lambda f: tensorfile.write(f, tensors, meta))
    _prune(folder, ckpt.step, keep)


def _prune(folder: Path, step: int, keep: int) -> None:
    """Keep the checkpoint of ``step`` and the newest ``keep - 1`` before it. Any after it is
    stale (as :func:`drop_after` says: a resume drops them as it starts; this is the same
    rule where a save finds one all the same)."""
    found = list_checkpoints(folder)
    older = [p for p in found if step_of(p) < step]
    stale = [p for p in found if step_of(p) > step]
    for old in stale + older[: max(0, len(older) - (keep - 1))]:
        old.unlink(missing_ok=True)


def drop_after(folder: Path, step: int) -> None:
    """Remove the checkpoints newer than ``step``, the one a resume continues from (an
    ensemble's members fell back from them: missing in another member, or damaged). Kept,
    the first save past one of them would prune ``step`` in its favour, and a kill between
    two members' saves would then leave them no common step at all."""
    for stale in list_checkpoints(folder):
        if step_of(stale) > step:
            stale.unlink(missing_ok=True)


def list_checkpoints(folder: Path) -> list[Path]:
    """The checkpoint files in ``folder``, oldest first (a file named like one whose step is
    not a number, e.g. a copy ``checkpoint-000000020-copy.safetensors``, is not one)."""
    found = Path(folder).glob(f"{PREFIX}*.safetensors")
    return sorted((p for p in found if _numbered(p)), key=step_of)


def _numbered(path: Path) -> bool:
    digits = path.stem[len(PREFIX) :]
    return digits.isascii() and digits.isdigit()


def step_of(path: Path) -> int:
    """The step a checkpoint file's name says."""
    return int(path.stem[len(PREFIX) :])


def load_checkpoint(path: Path) -> Checkpoint:
    """Load and verify one checkpoint; raises ``ValueError`` if it is truncated or corrupt
    (or gone since it was listed), :class:`CheckpointUnreadable` if it could not be read
    (an I/O error: proof of nothing about the file, which a resume must not give up on),
    and an allocation's error as it is (the worker names out-of-memory and its fix).

    The tensors and the metadata come from one opening of the file (safetensors checks the
    header and every tensor's extent) and the tensors are copied out of its mapping before
    they are verified, so what is verified is what is loaded, whatever later happens to the
    file; nothing is read into an intermediate buffer (a resume holds each member's state
    once)."""
    from safetensors import SafetensorError

    try:
        meta, tensors = _read(path)
    except SafetensorError as err:  # (its header or extents are wrong)
        raise ValueError(f"unreadable checkpoint {path.name}: {err}") from err
    try:
        ok = meta.get("sha256") == _digest(tensors, meta)
        ckpt = Checkpoint(step=int(meta["step"]), tensors=tensors, meta=json.loads(meta["meta"]))
    except (KeyError, ValueError) as err:
        raise ValueError(f"checkpoint {path.name} has damaged metadata ({err})") from err
    if not ok or ckpt.step != step_of(path):
        raise ValueError(f"checkpoint {path.name} fails its checksum")
    return ckpt


def _read(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """A checkpoint's metadata and tensors. An error opening it is asked of the OS
    (safetensors calls any failure to open a file not found): gone, a ``ValueError``;
    another, :class:`CheckpointUnreadable`; none now (a passing one), it is read again."""
    try:
        return _opened(path)
    except OSError as err:
        real = read_error(path, err)
        if real is None:
            raise ValueError(f"checkpoint {path.name} is gone (since it was listed)") from err
        if real is not err:
            raise _unreadable(path, f"{type(real).__name__}: {real}") from err
    try:
        return _opened(path)
    except OSError as err:
        raise _unreadable(
            path, f"safetensors could not open it, though it is there: {err}"
        ) from err


def _opened(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """The file's metadata, and its tensors copied out of its mapping."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.metadata() or {}, {k: f.get_tensor(k).clone() for k in f.keys()}  # noqa: SIM118


def _unreadable(path: Path, why: str) -> CheckpointUnreadable:
    return CheckpointUnreadable(
        f"could not read checkpoint {path} ({why}); it is kept: mend the cause and re-run the "
        "command (or delete that file to resume from an older checkpoint)"
    )


def checkpoint_steps(folder: Path, whole: bool = False) -> set[int]:
    """Steps of the checkpoint files in ``folder`` (by name; not verified; ``whole``: only
    files as long as their header says, see :func:`sweep.tensorfile.whole`)."""
    found = [p for p in list_checkpoints(folder) if not whole or tensorfile.whole(p)]
    return {step_of(p) for p in found}


@dataclass
class Found:
    """What :func:`common_checkpoint` found for an ensemble's members (one entry per folder)."""

    loaded: list[Checkpoint] | None
    """Every member's checkpoint at the newest common step that verifies; None: there is none."""
    newest: list[int]
    """Each member's newest checkpoint step on disk (by file name; 0 = none)."""
    bad: list[tuple[Path, str]] = field(default_factory=list)
    """(folder, note) for each checkpoint that failed verification."""
    skipped: dict[int, list[str]] = field(default_factory=dict)
    """Each step newer than the one loaded -> why it could not be used."""

    @property
    def step(self) -> int:
        """The step the members continue from (0 = from scratch)."""
        return self.loaded[0].step if self.loaded else 0


def common_checkpoint(folders: list[Path]) -> Found:
    """The newest step at which EVERY folder has a checkpoint that verifies, loaded.

    An ensemble saves its members one after another, so a kill between two saves leaves them
    one checkpoint apart; keeping two per member guarantees a common one. Every newer step
    that could not be used is recorded with the reason (missing in some member, or failing
    verification), so the caller can say loudly what the members fell back from.
    """
    steps = [checkpoint_steps(f) for f in folders]
    found = Found(None, [max(s, default=0) for s in steps])
    for step in sorted(set.union(*steps), reverse=True):
        missing = [f.name for f, s in zip(folders, steps, strict=True) if step not in s]
        if missing:
            found.skipped[step] = [f"no checkpoint in {', '.join(missing)}"]
            continue
        loaded, notes = _load_step(folders, step)
        if not notes:
            found.loaded = loaded
            return found
        found.bad += notes
        found.skipped[step] = [f"{f.name}: {note}" for f, note in notes]
    return found


def _load_step(folders: list[Path], step: int) -> tuple[list[Checkpoint], list[tuple[Path, str]]]:
    """Every member's checkpoint at ``step`` and a note for each that fails verification (all
    are tried, so each damaged checkpoint is reported in its own run)."""
    loaded, notes = [], []
    for f in folders:
        try:
            loaded.append(load_checkpoint(path_of(f, step)))
        except ValueError as err:
            notes.append((f, str(err)))
    return loaded, notes


def clear_checkpoints(folder: Path) -> None:
    for p in list_checkpoints(folder):
        p.unlink(missing_ok=True)
