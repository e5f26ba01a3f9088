"""A chunk store's file names and format marker, apart from its reader (:mod:`.store`) so
that what only recognises a store (``sweep status`` reading a sweep folder) needs no torch."""

from pathlib import Path

MANIFEST = "manifest.json"
HARVEST_PARAMS = "harvest-params.json"
SYNTHETIC_PARAMS = "synthetic-params.json"
MAKING = (HARVEST_PARAMS, SYNTHETIC_PARAMS)
"""What a store being made holds before its manifest (the harvester's and generator's
settings files): such a folder is a store, never a sweep folder."""
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
