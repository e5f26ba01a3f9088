"""SAE architectures, one class each (a module holds a family: relu, topk, jumprelu; matryoshka, gated),
registered under their config name (``sae=<name>``).

Adding one: write a module with an :class:`Architecture` subclass decorated with
:func:`register`, import it below, and give it equivalence tests; the ensemble, loader,
exporter and metrics find it through :func:`get`.
"""

from sweep.archs import gated, jumprelu, matryoshka, relu, topk  # noqa: F401  (registers them)
from sweep.archs.base import REGISTRY, Architecture, Hyper, Params, get, register, unit_rows

__all__ = ["REGISTRY", "Architecture", "Hyper", "Params", "get", "register", "unit_rows"]
