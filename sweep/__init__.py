"""sweep: train grids of sparse autoencoders as vmapped ensembles, scheduled with Ray."""

from typing import Any

from sweep.sae import SAE, load_run

__all__ = ["SAE", "Sweep", "load_run", "load_sweep"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    """``load_sweep`` / ``Sweep`` are imported on first use (they pull in pandas)."""
    if name in ("load_sweep", "Sweep"):
        from sweep import api

        return getattr(api, name)
    raise AttributeError(f"module 'sweep' has no attribute {name!r}")
