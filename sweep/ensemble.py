"""Stacked SAEs trained as one program. The only place that adds the member axis.

Every parameter has a leading member axis E; ``torch.func.vmap`` maps the single-member loss
of :mod:`sweep.sae` over it (the batch ``x`` is shared, each member's ``hyper`` — its l1 and
k — is a vmapped input), ``torch.func.grad`` differentiates it, and :class:`sweep.optim.Adam`
updates the stacked tensors. For untied ReLU, TopK and BatchTopK members a hand-batched
formulation of the same gradients (:mod:`sweep.fastpath`) is the default (the benchmark shows
vmap's generic batching is slower than a Python loop on CPU); the vmapped single-member math
stays the reference and the equivalence tests cover both. A member whose loss turns NaN/inf
(or whose gradient norm does: its squares overflow at an absurd L1)
is frozen (no further updates, its step count stops) and the others train on, without a
host sync in the step loop.

Dead latents: when :class:`DeadLatents` is given, each member counts, per latent, the rows
since it last fired (``since_fired``, checkpointed with the member); a latent is dead once
that reaches ``dead_tokens``. TopK-style members then add the AuxK term; ReLU members can
be resampled (:mod:`sweep.resample`).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial

import torch
from torch.func import grad, vmap

from sweep import archs, compiled, fastpath, sae
from sweep.archs import Architecture, Hyper, Params
from sweep.optim import Adam, AdamState, by_name
from sweep.sae import LossParts
from sweep.update import SINCE_FIRED, clip_members, track

CAST = ("W_enc", "W_dec")
"""The weights the compiled step keeps a compute-dtype copy of, those the architecture has (a
tied SAE has no ``W_dec``); the biases are cast per step: they are small."""


@dataclass(frozen=True)
class DeadLatents:
    """When a latent counts as dead, and the AuxK term (TopK family) that revives it."""

    dead_tokens: int
    """Rows without firing after which a latent is dead."""
    auxk_alpha: float = 0.0
    """Weight of the AuxK loss (TopK-style architectures; 0 = off)."""
    k_aux: int = 0
    """Dead latents used by the AuxK reconstruction."""


def stack(members: list[Params]) -> Params:
    """[{name: (...)}] * E -> {name: (E, ...)}."""
    return {k: torch.stack([m[k] for m in members]) for k in members[0]}


def hyper_of(l1: list[float], k: list[int], device: torch.device | str = "cpu") -> Hyper:
    """Members' sparsity settings as (E,) tensors."""
    return {
        "l1": torch.tensor(l1, dtype=torch.float32, device=device),
        "k": torch.tensor(k, dtype=torch.long, device=device),
    }


def vmapped_grads(arch: Architecture, kmax: int, dead: DeadLatents | None, aux: bool) -> Callable:
    """``vmap(grad(sae.loss_fn))`` for members of ``arch``: (params, x, hyper, dead_EF)."""
    fn = partial(sae.loss_fn, arch=arch, kmax=kmax)
    if aux and dead is not None:
        fn = partial(fn, auxk_alpha=dead.auxk_alpha, k_aux=dead.k_aux)
    return vmap(grad(fn, has_aux=True), in_dims=(0, None, 0, 0 if aux else None))


class Ensemble:
    """E SAEs of one shape and architecture, trained together on the same batches."""

    def __init__(
        self,
        params: Params,
        hyper: Hyper,
        adam: Adam,
        *,
        arch: str | Architecture = "untied",
        state: AdamState | None = None,
        active: torch.Tensor | None = None,
        buffers: Params | None = None,
        autocast_dtype: torch.dtype | None = None,
        fast: bool = True,
        dead: DeadLatents | None = None,
        rows: int = 0,
        grad_clip: float | None = None,
        compiled: bool = False,
        cuda_graphs: bool = False,
    ) -> None:
        self.arch = archs.get(arch) if isinstance(arch, str) else arch
        self.params = by_name(params)  # {name: (E, ...)}
        self.hyper = hyper  # {"l1": (E,), "k": (E,)} (+ "lr": (E,) when members' differ)
        self.adam = adam
        if (lr := adam.lr_tensor(hyper["l1"].device)) is not None:
            assert lr.shape == hyper["l1"].shape, "one learning rate per member"
            self.hyper = {**hyper, "lr": lr}  # (read by the compiled step)
        self.state = (state if state is not None else AdamState.zeros_like(self.params)).by_name()
        self.n = hyper["l1"].shape[0]
        dev = hyper["l1"].device
        self.active = (
            active if active is not None else torch.ones(self.n, dtype=torch.bool, device=dev)
        )  # (E,)
        self.buffers = buffers if buffers is not None else self._fresh_buffers(dead, dev)
        self.autocast_dtype = autocast_dtype
        self.fast = fast and self.arch.fast
        self.dead = dead
        self.rows = rows
        """Training rows every member has seen (before this, no latent can be dead)."""
        self.grad_clip = grad_clip
        """Clip each member's gradient to this global norm (None = off)."""
        self.kmax = int(hyper["k"].max()) if self.arch.knob == "k" else 0
        self._ws: dict[str, torch.Tensor] = {}
        self._vmapped: dict[bool, Callable] = {}
        self.compiled = compiled and self.fast
        """Run the step as one ``torch.compile``d function (:mod:`sweep.compiled`)."""
        self.cuda_graphs = cuda_graphs and self.compiled and dev.type == "cuda"
        """Replay the compiled step as CUDA graphs (``train.cuda_graphs``; CUDA only): the
        compiled step's kernels, one launch. The step's outputs then live in the graphs'
        memory (one pool per process and device) until the next graphed step, of any ensemble
        in the process, overwrites them: read them before it."""
        self._compiled_fn: Callable | None = None
        self.compile_seconds: dict[bool, float] = {}
        """Host seconds of the first compiled step of each variant (no dead-latent mask yet,
        or one): compile + one step."""
        self._scales = torch.ones(2, device=dev)  # the compiled step's lr and L1 factors
        self._scales_now = (1.0, 1.0)  # their values (written only when they change)
        self._cast: Params = {}
        self._cast_of: tuple = ()

    def release_training_state(self) -> None:
        """Drop what only training needs (Adam's moments, the step's workspaces and weight
        copies, the compiled step), leaving the weights and buffers to evaluate: the device
        memory goes to the evaluation (a language model, for LM metrics). No more steps.
        Calling it again does nothing more."""
        graphed = self.cuda_graphs and self._compiled_fn is not None
        self.state = AdamState({}, {}, {})
        self._ws, self._cast, self._cast_of = {}, {}, ()
        self._compiled_fn, self._vmapped = None, {}
        if graphed:  # the graphs' memory pool (the step's buffers) goes too, with every
            compiled.forget_compiled()  # compiled step of the process

    def _fresh_buffers(self, dead: DeadLatents | None, dev: torch.device) -> Params:
        f = self.params["W_enc"].shape[-1]
        out = stack([self.arch.init_buffers(f) for _ in range(self.n)]) if self.arch.buffers else {}
        if dead is not None:
            out[SINCE_FIRED] = torch.zeros(self.n, f)
        return {k: v.to(dev) for k, v in out.items()}

    @property
    def buffers(self) -> Params:
        """Per-member state besides the parameters (thresholds, rows since each latent fired),
        in name order whoever sets it (:func:`sweep.optim.by_name`)."""
        return self._buffers

    @buffers.setter
    def buffers(self, tensors: Params) -> None:
        self._buffers = by_name(tensors)

    @property
    def program(self) -> str:
        """How the step is computed (path, device, compute dtype), e.g. ``fast-compiled cuda
        bfloat16``: two programs agree up to rounding, not bit for bit."""
        path = ("fast" if self.fast else "vmap") + ("-compiled" if self.compiled else "")
        path += "-graphed" if self.cuda_graphs else ""
        dtype = str(self.autocast_dtype or self.params["W_enc"].dtype).removeprefix("torch.")
        return f"{path} {self.hyper['l1'].device.type} {dtype}"

    def dead_mask(self) -> torch.Tensor | None:
        """(E, F) bool: latents silent for ``dead_tokens`` rows (None while none can be)."""
        if self.dead is None or self.rows < self.dead.dead_tokens:
            return None
        return self.buffers[SINCE_FIRED] >= self.dead.dead_tokens

    def step(
        self, x_BD: torch.Tensor, full: bool = True, lr_scale: float = 1.0, l1_scale: float = 1.0
    ) -> LossParts:
        """One Adam step of every active member on batch ``x_BD``; returns (E,) loss parts.

        ``full=False`` lets the eager fast path skip L0 (one pass over the codes) on steps that
        are not logged; the compiled step always computes it, fused into another pass.
        ``lr_scale`` and ``l1_scale`` come from the schedule (warmup/decay).
        """
        if self.compiled:
            return self._step_compiled(x_BD, lr_scale, l1_scale)
        hyper = self.hyper if l1_scale == 1.0 else {**self.hyper, "l1": self.hyper["l1"] * l1_scale}
        grads, parts, codes = self._grads(x_BD, hyper, full)
        self.active &= clip_members(grads, self.grad_clip) & torch.isfinite(parts.loss)
        skip = (~self.active).float()  # (E,) 1.0 = leave this member untouched
        self.adam.update(self.params, grads, self.state, skip, lr_scale)
        self.arch.constrain(self.params, self.active)
        self._track(codes)
        self.rows += x_BD.shape[0]
        return parts

    def _step_compiled(self, x_BD: torch.Tensor, lr_scale: float, l1_scale: float) -> LossParts:
        t0 = time.perf_counter()
        cast = self._weights_cast()
        if self._compiled_fn is None:
            if self.cuda_graphs:  # read in place by the graphs, so at fixed addresses (a
                # moved one is recorded again: inductor checks their addresses every replay)
                for x in [*self._state_tensors(), *self.hyper.values()]:
                    torch._dynamo.mark_static_address(x, guard=False)
            self._compiled_fn = compiled.compile_step(self._spec(), self.cuda_graphs)
        self._set_scales(lr_scale, l1_scale)
        dead = self.dead_mask() if self.arch.knob == "k" else None
        parts = compiled.call(
            self._compiled_fn, self.params, self.state, self.buffers, cast, self.active, x_BD,
            self.hyper, self._scales, dead, graphs=self.cuda_graphs,
        )  # fmt: skip
        self._cast_of = self._weights_now()
        variant = dead is None
        if variant not in self.compile_seconds:  # the first call of each variant compiles it
            self.compile_seconds[variant] = time.perf_counter() - t0
        self.rows += x_BD.shape[0]
        return parts

    def _set_scales(self, lr_scale: float, l1_scale: float) -> None:
        """The compiled step's schedule factors, each written (a launch on a GPU) only when
        it changes: most steps of a schedule change neither."""
        for i, (now, new) in enumerate(zip(self._scales_now, (lr_scale, l1_scale), strict=True)):
            if now != new:
                self._scales[i] = new
        self._scales_now = (lr_scale, l1_scale)

    def _weights_cast(self) -> Params:
        """The weights in the compute dtype, for the compiled step to read and refill (none
        without one). Cast again in place when something besides the step changed a weight
        (a restore, a resample, a test): each tensor's version counter says so."""
        dt = self.autocast_dtype
        if dt is None or dt == self.params["W_enc"].dtype:
            return {}
        if not self._cast:
            self._cast = {k: self.params[k].to(dt) for k in CAST if k in self.params}
        elif self._weights_now() != self._cast_of:
            for k, w in self._cast.items():
                w.copy_(self.params[k])
        return self._cast

    def copies_drifted(self) -> list[str]:
        """The weights whose compute-dtype copy (the compiled step's, refilled as it writes
        the weights) is not exactly their cast, cast again: a run resumed from a checkpoint
        casts afresh, so it would continue with other bits than this one (tested never to
        happen; a checkpoint looks, a weight at a time)."""
        drifted = [k for k, w in self._cast.items() if not _casts_of(w, self.params[k])]
        for k in drifted:
            self._cast[k].copy_(self.params[k])
        return drifted

    def _weights_now(self) -> tuple:
        return tuple(
            (id(w), w._version) for w in (self.params.get(k) for k in CAST) if w is not None
        )

    def _state_tensors(self) -> list[torch.Tensor]:
        """Every tensor a step updates in place."""
        out = [*self.params.values(), *self.buffers.values(), *self._cast.values()]
        out += [self.active, self._scales]
        for d in (self.state.exp_avg, self.state.exp_avg_sq, self.state.step):
            out += d.values()
        return out

    def _spec(self) -> compiled.StepSpec:
        dead = self.dead
        aux = dead is not None and dead.auxk_alpha > 0 and self.arch.knob == "k"
        return compiled.StepSpec(
            arch=self.arch,
            adam=self.adam if "lr" not in self.hyper else replace(self.adam, lr=0.0),  # (its
            # members' rates are hyper["lr"], a tensor: ensembles of other rates share a graph)
            kmax=self.kmax,
            grad_clip=self.grad_clip,
            auxk=(dead.auxk_alpha, dead.k_aux) if aux else None,  # type: ignore[union-attr]
            compute_dtype=self.autocast_dtype,
            dead_tokens=dead.dead_tokens if dead else None,
        )

    def _grads(self, x_BD: torch.Tensor, hyper: Hyper, full: bool) -> tuple:
        dead = self.dead_mask() if self.arch.knob == "k" else None
        aux = dead is not None and self.dead is not None and self.dead.auxk_alpha > 0
        if self.fast:
            spec = fastpath.AuxSpec(self.dead.auxk_alpha, self.dead.k_aux, dead) if aux else None  # type: ignore[union-attr,arg-type]
            return fastpath.grads(
                self.arch, self.params, x_BD, hyper, self.kmax, spec, full, self._ws,
                self.autocast_dtype,
            )  # fmt: skip
        if aux not in self._vmapped:
            self._vmapped[aux] = vmapped_grads(self.arch, self.kmax, self.dead, aux)
        with self._autocast():
            grads, (parts, codes) = self._vmapped[aux](self.params, x_BD, hyper, dead)
        return grads, parts, codes

    def _track(self, codes_EBF: torch.Tensor) -> None:
        track(self.arch, self.buffers, codes_EBF, self.active, self.dead and self.dead.dead_tokens)

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.hyper["l1"].device.type, dtype=self.autocast_dtype)


def _casts_of(copy: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``copy`` is exactly ``weight`` cast to its dtype, a member at a time (a cast of
    the whole (E, ...) weight would be one more weight's worth of device memory, which under
    CUDA graphs the step's own buffers, held between steps, do not lend)."""
    return all(torch.equal(c, w.to(c.dtype)) for c, w in zip(copy, weight, strict=True))
