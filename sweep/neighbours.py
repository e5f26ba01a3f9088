"""The ``launch=local`` sweeps training on this machine's GPUs, so that one can say when it
would share GPUs with another: each sweep's private Ray hands out every GPU it sees, so two
sweeps started side by side put their ensembles on the same chips (each slower, and device
memory may run out), and neither Ray knows.

Each such driver records itself (host, pid, start, sweep folder, the GPUs its Ray sees) in a
per-user folder while it trains; records of processes that ended are ignored and removed.
GPUs are compared by their UUIDs where ``nvidia-smi`` lists them (one sweep may name them by
index in ``CUDA_VISIBLE_DEVICES``, another by UUID), else as named.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from sweep.io import atomic_write_json
from sweep.lock import same_process

log = logging.getLogger(__name__)


def registry() -> Path:
    """The folder of this user's records (a runtime folder: emptied at reboot)."""
    base = os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
    return Path(base) / f"sweep-{os.getuid()}" / "local-gpu-sweeps"


def visible_gpus(count: int) -> list[str]:
    """The GPUs a local Ray started here hands out: CUDA_VISIBLE_DEVICES's (it keeps to
    them), else the first ``count``; by UUID where ``nvidia-smi`` says it."""
    from sweep.gpuinfo import uuids

    seen = os.environ.get("CUDA_VISIBLE_DEVICES")
    named = [str(i) for i in range(count)] if seen is None else [g.strip() for g in seen.split(",")]
    return uuids([g for g in named if g][:count])


def _others(folder: Path, host: str) -> Iterator[dict]:
    """The records of other live drivers of ``host`` (removing those of drivers that ended;
    a temp folder shared by several nodes holds other hosts' too: let be)."""
    for path in folder.glob(f"{host}-*.json"):
        try:
            record = json.loads(path.read_text())
            pid, started = int(record["pid"]), float(record["started"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if record.get("host") != host or pid == os.getpid():
            continue
        if same_process(pid, started):
            yield record
        else:
            with contextlib.suppress(OSError):
                path.unlink()


@contextlib.contextmanager
def training_on(gpus: list[str], sweep_dir: Path) -> Iterator[None]:
    """While inside, this driver's sweep trains on ``gpus`` of this machine: warns of other
    local sweeps training on any of them (once, at entry)."""
    folder, host = registry(), socket.gethostname()
    mine = folder / f"{host}-{os.getpid()}.json"
    record = {"host": host, "pid": os.getpid(), "started": time.time()}
    record.update(sweep_dir=str(sweep_dir), gpus=gpus)
    try:  # (written before looking: two sweeps starting together see each other)
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_json(mine, record)
        others = list(_others(folder, host))
        shared = [(r, sorted(set(gpus) & set(r.get("gpus") or []))) for r in others]
    except OSError as err:  # (a warning's bookkeeping never stops a sweep)
        log.debug("cannot record this sweep's GPUs in %s: %s", folder, err)
        shared = []
    for other, both in shared:
        if both:
            _warn(other, both)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            mine.unlink()


def _warn(other: dict, both: list[str]) -> None:
    log.warning(
        "another sweep trains on GPU(s) %s of this machine (pid %s, %s): each local sweep's "
        "Ray hands out every GPU it sees, so their ensembles share those GPUs (slower, and "
        "device memory may run out); give each sweep its own GPUs "
        "(CUDA_VISIBLE_DEVICES=0 sweep run ..., CUDA_VISIBLE_DEVICES=1 sweep run ...) or "
        "run them one after the other",
        ",".join(both),
        other.get("pid"),
        other.get("sweep_dir"),
    )
