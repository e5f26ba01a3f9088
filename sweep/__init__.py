"""sweep: train grids of sparse autoencoders as vmapped ensembles, scheduled with Ray."""

from sweep.sae import SAE, load_run

__all__ = ["SAE", "load_run"]
__version__ = "0.1.0"
