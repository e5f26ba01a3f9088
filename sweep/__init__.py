"""sweep: train grids of sparse autoencoders as vmapped ensembles, scheduled with Ray."""

from typing import Any

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
