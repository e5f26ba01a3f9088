"""What every SAE architecture provides, and the registry that finds it by config name.

An :class:`Architecture` holds the math of ONE member (no member axis): initialisation,
the encoder's pre-activations, the activation that turns them into codes (training and
inference form), the decoder, the sparsity penalty, and the constraint applied after each
optimizer step. ``sweep.sae`` builds the single-member loss from these pieces,
``sweep.ensemble`` maps it over members, and the loader, exporter and metrics ask the
architecture (via :func:`get`) instead of testing parameter names.

Shapes: ``x_BD`` a batch of B activations of width D; ``pre_BF`` / ``codes_BF`` F features.
``hyper`` holds a member's sparsity settings as 0-d tensors: ``l1`` (the penalty
coefficient of L1-style architectures) and ``k`` (active latents of TopK-style ones).
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable
from typing import ClassVar

import torch
import torch.nn.functional as F

from sweep.errors import SweepError

Params = dict[str, torch.Tensor]
Hyper = dict[str, torch.Tensor]


def row_norms(w: torch.Tensor) -> torch.Tensor:
    """Each row's norm (last axis, kept), at least 1e-12."""
    return w.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def unit_rows(w: torch.Tensor) -> torch.Tensor:
    """Rows (last axis) scaled to unit norm."""
    return w / row_norms(w)


class Architecture:
    """The default is an untied ReLU SAE with unit-norm decoder rows; subclasses override."""

    name: ClassVar[str] = ""
    knob: ClassVar[str] = "l1"
    """The grid field that sets each member's sparsity: ``l1`` (grid.l1) or ``k`` (grid.k)."""
    loss_text: str = ""
    """The exact training loss, as written in cfg.json and the README."""
    saelens: ClassVar[str] = "standard"
    """SAELens's ``architecture`` name for the exported form."""
    saelens_renamed: ClassVar[dict[str, str]] = {}
    """Weights SAELens names otherwise in the exported form (ours -> theirs)."""
    buffers: ClassVar[tuple[str, ...]] = ()
    """Per-member state that is not trained by Adam but is saved with the weights."""
    fast: ClassVar[bool] = False
    """Whether :mod:`sweep.fastpath` has hand-batched gradients for this architecture."""
    l1_codes: ClassVar[bool] = True
    """The penalty is ``l1`` times the codes' sum (ReLU-L1): the fast path adds it, and its
    gradient ``l1 / B`` on kept codes, itself."""
    l0_penalty: ClassVar[bool] = False
    """The penalty is ``l1`` times the mean L0 (JumpReLU): the fast path adds it from its
    count of kept codes (its gradient is :meth:`fast_grads`'s business)."""
    keeps_pre: ClassVar[bool] = False
    """The fast path keeps the pre-activations for :meth:`fast_grads` (an extra (B, F)
    buffer per member)."""
    resamples: ClassVar[bool] = False
    """Dead latents can be resampled (``train.resample_dead``; :mod:`sweep.resample`)."""
    feature_params: ClassVar[tuple[str, ...]] = ()
    """Per-feature parameters besides ``b_enc`` that a resampled latent starts again at 0
    (Adam's moments too)."""
    recipes: ClassVar[tuple[str, ...]] = ()
    """Training recipes this architecture offers (``sae.recipe``; the first is the default)."""

    # What a recipe may change (set by :meth:`configure` on a copy):
    recipe: str = ""
    unit_decoder: bool = True
    """Decoder rows are renormalised to unit norm after every step."""
    weighted_l1: bool = False
    """The L1 penalty weights each code by its decoder row's norm."""
    init_decoder_norm: float = 1.0
    """Norm of the initial decoder rows (the encoder starts as their transpose)."""
    gpu_dtype: str = "bfloat16"
    """What ``train.dtype=auto`` computes in on a GPU."""
    levels: tuple[float, ...] = ()
    """Matryoshka levels (``sae.levels``): the fractions of the dictionary whose first
    latents must also reconstruct the input alone (:meth:`inner_widths`); none: one level."""

    @property
    def batch_buffers(self) -> int:
        """(B, F) buffers per member the fast step holds (codes, their gradient, a top-k's
        scatter, the kept pre-activations): the memory model's
        (:func:`sweep.grid.bytes_per_member`)."""
        return 3 + int(self.keeps_pre)

    @property
    def nested(self) -> bool:
        """Whether the architecture trains nested levels (its class has default
        :attr:`levels`: Matryoshka's, even where a sweep set none)."""
        return bool(type(self).levels)

    def batch_buffers_at(self, d: int, f: int) -> float:
        """:attr:`batch_buffers` at width ``d`` and dictionary size ``f`` (what the memory
        model counts; a Matryoshka's levels add (B, D) buffers, ``d / f`` of a (B, F) one)."""
        return self.batch_buffers

    def configure(
        self,
        recipe: str | None = None,
        init_decoder_norm: float | None = None,
        levels: list[float] | tuple[float, ...] | None = None,
    ) -> Architecture:
        """This architecture with a sweep's ``sae.recipe`` / ``sae.init_decoder_norm`` /
        ``sae.levels`` (None = defaults); a copy, the registered instance stays as it is."""
        out = copy.copy(self)
        if self.recipes:
            out.apply_recipe(recipe or self.recipes[0])
        if init_decoder_norm is not None:
            out.init_decoder_norm = init_decoder_norm
        if levels is not None:
            out.levels = tuple(float(v) for v in levels)
        return out

    def inner_widths(self, f: int) -> list[int]:
        """The nested dictionaries' sizes of a dictionary of ``f`` latents: ``round(level *
        f)`` for each of :attr:`levels` (ascending and each < ``f`` where :meth:`check_levels`
        passes, as every sweep's plan checks). The loss averages the MSE
        of each one's reconstruction with the whole dictionary's (:func:`sweep.sae.loss_fn`)."""
        return [round(v * f) for v in self.levels]

    def check_levels(self, dict_size: int) -> str | None:
        """A problem with :attr:`levels` at this dictionary size (a level of no latent, two
        of one size), or None."""
        widths = self.inner_widths(dict_size)
        sizes = [*widths, dict_size]
        if any(w < 1 for w in widths) or any(a >= b for a, b in itertools.pairwise(sizes)):
            return (
                f"sae.levels {list(self.levels)} of a {dict_size}-latent dictionary are "
                f"{widths} latents: each level needs at least one latent more than the one "
                "before; give fewer or larger levels (or larger dictionaries)"
            )
        return None

    def apply_recipe(self, recipe: str) -> None:
        self.recipe = recipe

    def init_params(
        self, d: int, f: int, g: torch.Generator, b_dec: torch.Tensor | None = None
    ) -> Params:
        """Random unit-norm decoder rows, encoder = decoder transpose, zero encoder bias;
        ``b_dec`` defaults to zeros (the worker passes the scaled data mean)."""
        w = unit_rows(torch.randn(f, d, generator=g))  # (F, D)
        if self.init_decoder_norm != 1.0:
            w = w * self.init_decoder_norm
        return {
            "W_enc": w.T.contiguous(),  # (D, F)
            "b_enc": torch.zeros(f),
            "b_dec": torch.zeros(d) if b_dec is None else b_dec.detach().clone().float(),
            "W_dec": w.clone(),  # (F, D)
        }

    def init_buffers(self, f: int) -> Params:
        return {}

    def decoder(self, params: Params) -> torch.Tensor:
        """The (F, D) decoder rows used in reconstruction."""
        return params["W_dec"]

    def pre(self, params: Params, x_BD: torch.Tensor) -> torch.Tensor:
        return (x_BD - params["b_dec"]) @ params["W_enc"] + params["b_enc"]  # (B, D) -> (B, F)

    def codes(self, params: Params, x_BD: torch.Tensor, k: int) -> torch.Tensor:
        """:meth:`infer` of :meth:`pre`, bit for bit, with no autograd: the bias added and
        (for ReLU codes) the ReLU taken in place, in one (B, F) buffer, not three (an
        evaluation's largest cost beside its two products: 40% less time at 4096 x 24576)."""
        if type(self).pre is not Architecture.pre:  # (its own pre-activations: as they are)
            return self.infer(self.pre(params, x_BD), k, params)
        pre = ((x_BD - params["b_dec"]) @ params["W_enc"]).add_(params["b_enc"])
        if type(self).infer is Architecture.infer:
            return pre.relu_()
        return self.infer(pre, k, params)

    def activate(
        self, pre_BF: torch.Tensor, hyper: Hyper, params: Params, kmax: int
    ) -> torch.Tensor:
        """Training-time codes from pre-activations (``kmax``: the largest k in the ensemble)."""
        return F.relu(pre_BF)

    def infer(self, pre_BF: torch.Tensor, k: int, params: Params) -> torch.Tensor:
        """Inference-time codes (what a trained dictionary computes; ``params`` includes buffers)."""
        return F.relu(pre_BF)

    def keep_batched(
        self,
        pre_EBF: torch.Tensor,
        hyper: Hyper,
        kmax: int,
        params: Params,
        scratch: torch.Tensor,
    ) -> None:
        """:meth:`activate` for every member at once, in place on (E, B, F) pre-activations
        (``hyper`` values (E,), ``params`` stacked; ``scratch`` a free buffer of their shape
        and dtype): the fast path's form of the same selection. Every kept code must be its
        (positive) pre-activation, every other 0."""
        pre_EBF.relu_()

    def fast_grads(
        self, g_EBF: torch.Tensor, pre_EBF: torch.Tensor | None, params: Params, hyper: Hyper
    ) -> Params:
        """Gradients of parameters other than the four weights (stacked), from ``g_EBF``,
        the loss's gradient w.r.t. the codes (before the activation's mask), and the
        pre-activations (when :attr:`keeps_pre`; their buffer may be used as scratch: the
        fast path reads it no more, AuxK being the TopK family's)."""
        return {}

    def penalty(
        self, params: Params, codes_BF: torch.Tensor, pre_BF: torch.Tensor, hyper: Hyper
    ) -> torch.Tensor:
        """The sparsity term added to the MSE (its coefficient included)."""
        return torch.zeros((), device=codes_BF.device)

    def batched_grads(self) -> Callable | None:
        """Hand-batched gradients of its own, :func:`sweep.fastpath.grads`'s for an
        architecture whose codes' gradient is not the shared formulation's (Gated's two
        paths): ``(arch, params, x, hyper, *, with_l0, ws, compute_dtype, cast)``, no top-k;
        or None (:attr:`fast` architectures use the shared one)."""
        return None

    def gate_codes(self, params: Params, pre_BF: torch.Tensor) -> torch.Tensor | None:
        """Codes that must also reconstruct the input alone through a frozen copy of the
        decoder (Gated's auxiliary term, :func:`sweep.sae.loss_fn`), or None (no such term:
        the shared fast path has none)."""
        return None

    def constrain(self, params: Params, active: torch.Tensor) -> None:
        """After an optimizer step, on stacked (E, ...) params: unit decoder rows for active members."""
        if self.unit_decoder and "W_dec" in params:
            w = params["W_dec"]  # (E, F, D); divided in place: no copy of it (unit_rows's bits)
            w.div_(torch.where(active[:, None, None], row_norms(w), 1.0))  # a frozen member: / 1

    def update_buffers(
        self, buffers: Params, codes_EBF: torch.Tensor, active: torch.Tensor
    ) -> None:
        """After a step, on stacked buffers: fold in what this batch's codes (E, B, F) say."""

    def saelens_form(self, saved: Params, k: int) -> tuple[Params, dict]:
        """Extra tensors and ``cfg.json`` fields of the SAELens form (``saved``: the buffers
        and extra parameters of a trained dictionary)."""
        return {}, {}

    def check_hyper(self, value: float, dict_size: int) -> str | None:
        """A problem with one member's sparsity value at this dictionary size, or None."""
        return None

    def check_schedule(self, steps: int, lr: float) -> str | None:
        """Why ``steps`` Adam steps at a mean learning rate ``lr`` are too few for this
        architecture to respond to its sparsity knob (warned about, not refused), or None."""
        return None


REGISTRY: dict[str, Architecture] = {}


def register(cls: type[Architecture]) -> type[Architecture]:
    """Class decorator: make an architecture available as ``sae=<cls.name>``."""
    REGISTRY[cls.name] = cls()
    return cls


def get(name: str) -> Architecture:
    """The architecture registered as ``name`` (a one-line error naming the choices)."""
    arch = REGISTRY.get(name)
    if arch is None:
        raise SweepError(
            f"unknown architecture sae={name!r}; choose one of: {', '.join(sorted(REGISTRY))}"
        )
    return arch
