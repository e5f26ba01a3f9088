"""safetensors files written straight from the tensors' memory.

``safetensors.torch.save`` builds the whole file in memory, twice (its own buffer, then a
Python ``bytes``), holding the GIL while it does. For one member of a 768 x 24576 ensemble
(453 MB of weights and Adam state) a checkpoint written that way "in the background" took
1.06 s and stopped every other thread for up to 0.34 s at a time (1.8 s on a loaded machine;
``scripts/bench.py --sections 4``): per member, the training thread (on a GPU: every kernel
launch) waited, and the file cost 0.9 GB of transient host memory. :func:`write` streams the
header and then each tensor's bytes to the open file instead (each ``write`` releases the
GIL; nothing is copied): 0.49 s, the longest stall of another thread 6 ms.

The layout is the format's (an 8-byte little-endian header length, the JSON header padded with
spaces to 8 bytes, then the tensors' bytes back to back, each named by its ``data_offsets``),
tensors in safetensors' order (by dtype, the widest first so each stays aligned, then by
name): the bytes are those ``safetensors.torch.save`` makes of the same tensors (a test holds
them to it; several metadata entries it orders as its hash map does), and files are read
back with safetensors itself.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

if TYPE_CHECKING:
    import torch

DTYPES = {
    "torch.int64": "I64",
    "torch.float64": "F64",
    "torch.float32": "F32",
    "torch.int32": "I32",
    "torch.bfloat16": "BF16",
    "torch.float16": "F16",
    "torch.int16": "I16",
    "torch.int8": "I8",
    "torch.uint8": "U8",
    "torch.bool": "BOOL",
}
"""torch dtype -> the format's name for it, in the order safetensors lays tensors out."""
RANK = {name: rank for rank, name in enumerate(DTYPES)}


def write(f: BinaryIO, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write ``tensors`` (CPU) and ``metadata`` to ``f`` as one safetensors file (``f``: a
    buffered binary file, as ``open(..., "wb")`` gives: its ``write`` takes all it is given)."""
    names = sorted(tensors, key=lambda k: (RANK.get(str(tensors[k].dtype), -1), k))
    header: dict[str, object] = {"__metadata__": metadata} if metadata else {}
    at = 0
    for k in names:
        v = tensors[k]
        if str(v.dtype) not in DTYPES or v.device.type != "cpu":
            raise ValueError(f"tensor {k}: cannot write {v.dtype} on {v.device} to safetensors")
        size = v.numel() * v.element_size()
        header[k] = {
            "dtype": DTYPES[str(v.dtype)],
            "shape": list(v.shape),
            "data_offsets": [at, at + size],
        }
        at += size
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    f.write(len(text).to_bytes(8, "little"))
    f.write(text)
    for k in names:
        f.write(_bytes_of(tensors[k]))


def _bytes_of(v: torch.Tensor) -> memoryview:
    """The tensor's bytes, without a copy when it is contiguous."""
    import torch

    return memoryview(v.contiguous().reshape(-1).view(torch.uint8).numpy())


def whole(path: str | Path) -> bool:
    """Whether the file at ``path`` is as long as its header says (reads the header only: a
    cheap test for a file cut short, not for damaged bytes)."""
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n)) if 0 < n < 1 << 27 else None
            size = os.fstat(f.fileno()).st_size
    except (OSError, ValueError):
        return False
    try:
        ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
        return size == 8 + n + max(ends, default=0)
    except (AttributeError, TypeError, KeyError, IndexError, ValueError):
        return False  # (not a dict of tensor entries)
