"""A chunk store's file names and format marker, apart from its reader (:mod:`.store`) so
that what only recognises a store (``sweep status`` reading a sweep folder) needs no torch."""

import json
from pathlib import Path

MANIFEST = "manifest.json"
HARVEST_PARAMS = "harvest-params.json"
SYNTHETIC_PARAMS = "synthetic-params.json"
MAKING = (HARVEST_PARAMS, SYNTHETIC_PARAMS)
"""What a store being made holds before its manifest (the harvester's and generator's
settings files): such a folder is a store, never a sweep folder."""


def hook_folder(root: Path, hook: str) -> Path:
    """Where a harvest of several hooks at ``root`` keeps ``hook``'s store."""
    return root / hook.replace("/", "_")


def hook_stores(root: Path) -> dict[str, Path]:
    """The per-hook stores of a harvest of several hooks at ``root``, by hook ({}: none)."""
    try:
        hooks = json.loads((root / HARVEST_PARAMS).read_text()).get("hooks")
    except (OSError, ValueError, AttributeError):
        return {}
    if not isinstance(hooks, list) or len(hooks) < 2:
        return {}
    return {h: hook_folder(root, h) for h in hooks if isinstance(h, str)}


CHUNKS = "chunk_*.npy"
"""A glob for a store's chunk files (:func:`sweep.activations.store.chunk_name` names one);
it also matches other files named so (``chunk_00001.orig.npy``): :func:`chunk_files`."""


def chunk_files(folder: Path) -> dict[int, Path]:
    """The chunk files in ``folder`` by index, in order: names as ``chunk_name`` writes them
    (``chunk_<digits>.npy``), not a copy such as ``chunk_00001.orig.npy`` beside them."""
    found = {}
    for f in folder.glob(CHUNKS):
        digits = f.name[len("chunk_") : -len(".npy")]
        if digits.isascii() and digits.isdigit():
            found[int(digits)] = f
    return dict(sorted(found.items()))


FORMAT = "sweep-chunk-store"
FORMAT_VERSION = 1
GROUND_TRUTH = "ground_truth.safetensors"
VERIFIED = "verified.json"


def store_manifest(folder: Path) -> bool:
    """Whether ``folder`` holds a chunk store's manifest (a finished store, sound or not)."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and manifest.get("format") == FORMAT
