"""A chunk store's file names and format marker, apart from its reader (:mod:`.store`) so
that what only recognises a store (``sweep status`` reading a sweep folder) needs no torch."""

MANIFEST = "manifest.json"
MAKING = ("harvest-params.json", "synthetic-params.json")
"""What a store being made holds before its manifest (the harvester's and generator's
settings files): such a folder is a store, never a sweep folder."""
CHUNKS = "chunk_*.npy"
"""A glob for a store's chunk files (:func:`sweep.activations.store.chunk_name` names one)."""
FORMAT = "sweep-chunk-store"
FORMAT_VERSION = 1
GROUND_TRUTH = "ground_truth.safetensors"
VERIFIED = "verified.json"
