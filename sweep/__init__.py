"""sweep: train grids of sparse autoencoders as vmapped ensembles, scheduled with Ray."""

import os
from typing import Any

# MKL's strict reproducibility mode, set before torch first calls MKL (a value the user set
# stays): a GEMM rounds the same on any number of threads. Without it one member's GEMMs split
# their reduction between threads while an ensemble's run one thread per member, so a run
# trained alone (a repaired run, a grid point with no ensemble-mates, a split ensemble) or
# with another thread count was not bit-identical to the same run trained in an ensemble.
# Its cost on CPU steps, measured: none at 512 x 2048, within noise at 128 x 512 (BENCHMARKS.md).
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

__all__ = ["SAE", "Sweep", "load_run", "load_sweep"]
__version__ = "0.1.0"

_LAZY = {
    "SAE": "sweep.sae",
    "load_run": "sweep.sae",
    "load_sweep": "sweep.api",
    "Sweep": "sweep.api",
}


def __dir__() -> list[str]:
    return sorted([*__all__, "__version__"])


def __getattr__(name: str) -> Any:
    """Public names are imported on first use, so ``import sweep.actors`` (in Ray's helper
    processes) stays free of torch and pandas."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'sweep' has no attribute {name!r}")
