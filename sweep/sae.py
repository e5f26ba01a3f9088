"""The math of ONE sparse autoencoder, written for a single member, for any architecture.

``ensemble.py`` is the only place that adds the member axis (with ``torch.func.vmap``); the
architecture-specific pieces (encoder activation, decoder, penalty) live in
:mod:`sweep.archs`, one module each.

Shapes: ``x_BD`` a batch of B activations of width D; ``codes_BF`` F dictionary features.

Loss (the one convention used everywhere)::

    mse  = mean over batch and dimensions of (x_hat - x)**2
    loss = mse + penalty (the architecture's: l1 * mean L1 norm for ReLU SAEs, l1 * mean L0
           for JumpReLU, none for TopK / BatchTopK) [+ auxk_alpha * AuxK, TopK family]
           [+ the gate's reconstruction through a frozen decoder, Gated]

Matryoshka (``sae=matryoshka``, Bussmann et al. 2025): with inner sizes m_1 < ... < m_n
(:meth:`~sweep.archs.Architecture.inner_widths`), ``mse`` in the loss is replaced by the mean
of n + 1 MSEs: each m_i's reconstruction from the codes of the first m_i latents alone
(``codes[:, :m_i] @ W_dec[:m_i] + b_dec``; the codes as the whole dictionary chose them), and
the whole dictionary's. The reported ``mse`` and ``fvu`` stay the whole dictionary's.

AuxK (Gao et al. 2024), when ``auxk_alpha > 0`` and some latents are dead (have not fired for
``train.dead_tokens`` rows): the dead latents' top-``k_aux`` pre-activations (ReLU'd) must
reconstruct the main residual ``e = x - x_hat`` (held fixed) through the decoder::

    auxk = min(n_dead / k_aux, 1) * mean((codes_aux @ W_dec - e)**2)

A plain MSE, as the main term (sparsify's and the BatchTopK paper's weighting); Gao et al.
divide each term by its target's variance, so their AuxK weighs ``1 / FVU`` times more.

Training sees activations scaled so the store's mean row norm is sqrt(D) (``data.normalize``),
so per-element variance is about 1 and one grid means similar sparsity on any model/layer.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F

from sweep import archs, rundir
from sweep.archs import Architecture, Hyper, Params
from sweep.errors import NotARunFolder, SweepError
from sweep.sums import member_sums

if TYPE_CHECKING:
    from sweep.grid import RunSpec


class LossParts(NamedTuple):
    """Per-batch training quantities (scalars for one member; (E,) in an ensemble)."""

    loss: torch.Tensor
    mse: torch.Tensor
    sparsity: torch.Tensor
    """Mean over the batch of the L1 norm of the codes."""
    l0: torch.Tensor | None
    """Mean number of active features per row (None where a caller skipped it for speed)."""
    fvu: torch.Tensor
    """Residual variance / variance of x around its batch mean."""


def init_params(
    arch: str, d: int, f: int, generator: torch.Generator, b_dec: torch.Tensor | None = None
) -> Params:
    """A fresh member of architecture ``arch`` (see :meth:`Architecture.init_params`)."""
    return archs.get(arch).init_params(d, f, generator, b_dec)


def decoder(params: Params, arch: str = "untied") -> torch.Tensor:
    """(F, D) decoder rows of architecture ``arch``."""
    return archs.get(arch).decoder(params)


def encode(params: Params, x_BD: torch.Tensor, arch: str = "untied", k: int = 0) -> torch.Tensor:
    """Inference-time codes (training space; ``params`` include saved buffers)."""
    a = archs.get(arch)
    if not torch.is_grad_enabled():  # (an evaluation: the same bits in less memory and time)
        return a.codes(params, x_BD, k)
    return a.infer(a.pre(params, x_BD), k, params)


def decode(params: Params, codes_BF: torch.Tensor, arch: str = "untied") -> torch.Tensor:
    return codes_BF @ decoder(params, arch) + params["b_dec"]  # (B, F) -> (B, D)


def auxk_loss(
    pre_BF: torch.Tensor, dead_F: torch.Tensor, W_dec: torch.Tensor, e_BD: torch.Tensor, k_aux: int
) -> torch.Tensor:
    """The AuxK term for one member (see the module docstring); ``e_BD`` is detached."""
    masked = torch.where(dead_F, pre_BF, -torch.inf)
    vals, idx = masked.topk(k_aux, dim=-1)  # (B, k_aux)
    codes_aux = torch.zeros_like(pre_BF).scatter(-1, idx, F.relu(vals))
    scale = (dead_F.sum() / k_aux).clamp(max=1.0)
    return scale * mean_square(codes_aux @ W_dec - e_BD)


def mean_square(x: torch.Tensor) -> torch.Tensor:
    """``x.pow(2).mean()``, summed as :func:`sweep.sums.member_sums` sums (its bits do not
    depend on the thread count, nor, under ``vmap``, on the member count); its gradient is
    ``x.pow(2).mean()``'s, bit for bit."""
    return member_sums(x.pow(2)[None])[0] / x.numel()


def nested_mse(
    arch: Architecture,
    params: Params,
    codes_BF: torch.Tensor,
    x_BD: torch.Tensor,
    mse: torch.Tensor,
) -> torch.Tensor:
    """Matryoshka's reconstruction term: the mean of the whole dictionary's ``mse`` and the
    MSE of each inner level's reconstruction, from the codes of its first m latents alone."""
    total = mse
    for m in arch.inner_widths(codes_BF.shape[-1]):
        total = total + mean_square(
            codes_BF[:, :m] @ arch.decoder(params)[:m] + params["b_dec"] - x_BD
        )
    return total / (len(arch.levels) + 1)


def loss_fn(
    params: Params,
    x_BD: torch.Tensor,
    hyper: Hyper,
    dead_F: torch.Tensor | None = None,
    *,
    arch: Architecture,
    kmax: int = 0,
    auxk_alpha: float = 0.0,
    k_aux: int = 0,
) -> tuple[torch.Tensor, tuple[LossParts, torch.Tensor]]:
    """The training loss of one SAE on one batch, with its parts (all detached but ``loss``)
    and the codes (for dead-latent and threshold bookkeeping).

    ``kmax``: the top-k width taken by TopK-style members (the largest k of the ensemble);
    ``dead_F`` (bool) with ``auxk_alpha`` and ``k_aux`` > 0 adds the AuxK term.
    """
    pre_BF = arch.pre(params, x_BD)
    codes_BF = arch.activate(pre_BF, hyper, params, kmax)
    err_BD = codes_BF @ arch.decoder(params) + params["b_dec"] - x_BD
    mse = mean_square(err_BD)
    loss = nested_mse(arch, params, codes_BF, x_BD, mse) if arch.levels else mse
    loss = loss + arch.penalty(params, codes_BF, pre_BF, hyper)
    gate_BF = arch.gate_codes(params, pre_BF)
    if gate_BF is not None:  # (Gated's: the gate's codes through the frozen decoder)
        dec = arch.decoder(params).detach()
        loss = loss + mean_square(gate_BF @ dec + params["b_dec"].detach() - x_BD)
    if dead_F is not None and auxk_alpha > 0 and k_aux > 0:
        aux = auxk_loss(pre_BF, dead_F, arch.decoder(params), -err_BD.detach(), k_aux)
        loss = loss + auxk_alpha * aux
    with torch.no_grad():
        var = mean_square(x_BD - x_BD.mean(dim=0)).clamp_min(1e-12 / x_BD.numel())
        parts = LossParts(
            loss=loss.detach(),
            mse=mse.detach(),
            sparsity=codes_BF.abs().sum(dim=1).mean(),
            l0=(codes_BF != 0).sum(dim=1).mean(dtype=torch.float32),
            fvu=mse.detach() / var,
        )
    return loss, (parts, codes_BF.detach())


CORE_WEIGHTS = ("W_enc", "b_enc", "W_dec", "b_dec")
"""The weights every architecture has (a tied one derives its W_dec); the rest of a run's
tensors (thresholds, a gate's magnitudes) are the SAE's buffers."""

PER_HEAD_HOOKS = ("hook_z", "hook_q", "hook_k", "hook_v", "hook_result", "hook_rot_q", "hook_rot_k")
"""transformer_lens hooks whose activations are (..., heads, d_head)."""


class SAE(torch.nn.Module):
    """A trained dictionary that takes RAW activations (the training scale is folded in).

    With ``s`` the store's scale, training saw ``s * x``; folding gives
    ``W_enc' = s W_enc``, ``b_dec' = b_dec / s``, ``W_dec' = W_dec / s``, so the codes are
    exactly the training codes and ``decode`` returns raw-space reconstructions.

    The weights are parameters without gradients (``sae.requires_grad_(True)`` to fine-tune);
    ``encode``/``decode`` also take numpy arrays and nested lists. The math runs in the SAE's
    dtype on its device (float32 unless moved); results come back on the input's device, in
    its dtype when that is a float dtype, so ``lambda act, hook: sae(act)`` splices into a
    bfloat16 model as it is. An SAE trained on a harvested per-head hook (``hook_z``, ...,
    :data:`PER_HEAD_HOOKS`; the harvest flattens its heads) takes (..., heads, d_head) too.
    """

    def __init__(self, params: Params, cfg: dict) -> None:
        super().__init__()
        self.cfg = cfg
        self.arch = archs.get(cfg.get("architecture", "untied"))
        self.k = int(cfg.get("k") or 0)
        hook = str((cfg.get("provenance") or {}).get("hook", ""))
        self.per_head = hook.rsplit(".", 1)[-1] in PER_HEAD_HOOKS
        """Trained on a per-head hook (a harvest flattened its heads): takes them unflattened."""
        s = float(cfg.get("act_scale", 1.0))
        dec = self.arch.decoder(params)  # (F, D) training space
        self.W_enc = torch.nn.Parameter(params["W_enc"] * s)  # (D, F)
        self.b_enc = torch.nn.Parameter(params["b_enc"].clone())  # (F,)
        self.W_dec = torch.nn.Parameter(dec / s)  # (F, D)
        self.b_dec = torch.nn.Parameter(params["b_dec"] / s)  # (D,)
        # thresholds, a gate's magnitudes: they act on pre-activations, which folding
        # leaves unchanged
        self._extra = [n for n in params if n not in CORE_WEIGHTS]
        for name in self._extra:
            self.register_buffer(name, params[name].clone())
        self.requires_grad_(False)

    def __getattr__(self, name: str):  # (nn.Module's, for what normal lookup did not find)
        """``threshold`` of a JumpReLU SAE trained with ``sae.recipe=log``: exp(log_threshold),
        the per-feature threshold in the form every other run has (and the export writes)."""
        buffers = self.__dict__.get("_buffers", {})
        if name == "threshold" and "log_threshold" in buffers:
            return buffers["log_threshold"].exp()
        return super().__getattr__(name)

    def extra_repr(self) -> str:
        knob = f"k={self.k}" if self.k else f"l1={self.cfg.get('l1')}"
        return f"{self.cfg.get('run_id')}: {self.arch.name}, d_in={self.d_in}, d_sae={self.d_sae}, {knob}"

    def _input(self, x: object, width: int, what: str, heads: bool = False) -> torch.Tensor:
        """``x`` as a tensor of shape (..., width), as given (device, dtype); with ``heads``,
        per-head activations (..., heads, d_head) with heads * d_head = width (a ``hook_z``,
        which a harvest flattens) come flattened. Else a one-line TypeError/ValueError (a complex
        tensor too: casting it would drop its imaginary part with only torch's warning)."""
        if not isinstance(x, torch.Tensor):
            try:
                x = torch.as_tensor(x)
            except (TypeError, ValueError, RuntimeError) as err:
                raise TypeError(
                    f"{what} must be a tensor or array of shape (..., {width}), got {type(x).__name__}"
                ) from err
        if x.is_complex():
            raise TypeError(
                f"{what} must be real, got {x.dtype}; pass x.real (or x.abs()) if that is meant"
            )
        if heads and x.ndim >= 2 and x.shape[-1] != width and x.shape[-2] * x.shape[-1] == width:
            x = x.flatten(-2)
        if x.shape[-1:] != (width,):
            raise ValueError(f"{what} must have shape (..., {width}), got {tuple(x.shape)}")
        return x

    def _inside(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` on this SAE's device, in its dtype (where the math runs)."""
        return x.to(self.W_enc.device, self.W_enc.dtype)

    @staticmethod
    def _like(out: torch.Tensor, given: torch.Tensor) -> torch.Tensor:
        """A result back on the input's device, in its dtype when that is a float dtype (a
        bfloat16 model's hook gets bfloat16 back)."""
        dtype = given.dtype if given.is_floating_point() else out.dtype
        return out.to(given.device, dtype)

    @property
    def d_in(self) -> int:
        return self.W_enc.shape[0]

    @property
    def d_sae(self) -> int:
        return self.W_enc.shape[1]

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        p = {n: getattr(self, n) for n in ("W_enc", "b_enc", "b_dec", *self._extra)}
        return self.arch.infer(self.arch.pre(p, x), self.k, p)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(..., D) raw activations -> (..., F) codes (a per-head hook's (..., H, D/H) too)."""
        x = self._input(x, self.d_in, "activations", self.per_head)
        return self._like(self._encode(self._inside(x)), x)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """(..., F) codes -> (..., D) raw-space reconstruction."""
        codes = self._input(codes, self.d_sae, "codes")
        return self._like(self._inside(codes) @ self.W_dec + self.b_dec, codes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The reconstruction of ``x``, in ``x``'s shape, dtype and device (computed in the
        SAE's: the codes are not rounded to a low-precision input's dtype)."""
        flat = self._input(x, self.d_in, "activations", self.per_head)
        out = self._encode(self._inside(flat)) @ self.W_dec + self.b_dec
        return self._like(out, flat).reshape(getattr(x, "shape", flat.shape))


def run_cfg(
    run: RunSpec, act_scale: float, store: str, provenance: dict, arch: Architecture | None = None
) -> dict:
    """A run folder's ``cfg.json``: everything :func:`load_run` needs, plus provenance."""
    arch = arch or archs.get(run.arch)
    return {
        "format": "sweep-sae",
        "version": 1,
        "architecture": run.arch,
        "d_in": run.width,
        "d_sae": run.dict_size,
        "act_scale": act_scale,
        "l1": run.l1,
        "k": run.k,
        "dict_ratio": run.dict_ratio,
        "seed": run.seed,
        **({} if run.lr is None else {"lr": run.lr}),  # (a grid with an lr axis)
        "run_id": run.run_id,
        "recipe": arch.recipe or None,
        "loss": arch.loss_text,
        **_nesting(arch, run.dict_size),
        "store": store,
        "provenance": provenance,
        "dtype": "float32",
    }


def _nesting(arch: Architecture, dict_size: int) -> dict:
    """A Matryoshka run's levels and its nested dictionaries' sizes (SAELens's name for them:
    ``matryoshka_widths``, the whole dictionary last); nothing for another architecture."""
    if not arch.nested:
        return {}
    return {
        "levels": list(arch.levels),
        "matryoshka_widths": [*arch.inner_widths(dict_size), dict_size],
    }


def load_run(path: str | Path, device: str | torch.device = "cpu") -> SAE:
    """Rebuild the SAE of one run folder (needs only its ``cfg.json`` and ``sae.safetensors``)."""
    folder, device = Path(path).expanduser(), as_device(device)
    _check_run_folder(folder)
    if (folder / rundir.DONE).is_file():  # a sweep's run: its weights must verify
        run = rundir.RunFolder(folder)
        problem = run.final_problem(deep=True)
        if problem:
            raise SweepError(f"run {folder}: {problem}; {run.fix_for(problem)}")
    elif problem := rundir.snapshot_problem(folder):
        raise SweepError(f"snapshot {folder}: {problem}")
    return read_run(folder, device)


def _check_run_folder(folder: Path) -> None:
    """``folder`` holds a run's cfg.json and weights (else a one-line error naming the fix)."""
    from sweep.sweepdir import is_sweep

    if folder.is_file():
        raise NotARunFolder(
            f"{folder} is a file; pass the run folder that holds it ({folder.parent})"
        )
    if not folder.is_dir():
        _not_started(folder)
        raise NotARunFolder(f"no folder {folder}; pass a run folder (SWEEP_DIR/runs/<run_id>)")
    if is_sweep(folder):
        raise NotARunFolder(
            f"{folder} is a sweep folder, not a run folder; load one run from "
            f"{folder / rundir.RUNS}/<run_id>, or all of them with sweep.load_sweep({str(folder)!r})"
        )
    if (folder / rundir.SPEC).is_file() and not (folder / rundir.DONE).is_file():
        raise SweepError(  # a sweep's run, training (or stopped) with or without final files
            f"run {folder} is not finished (no {rundir.DONE}); its sweep finishes it (re-run "
            f"its command, or 'sweep resume {folder.parent.parent}', if it stopped): see "
            f"'sweep status {folder.parent.parent}'"
        )
    if (folder / "sae_weights.safetensors").is_file() and not (folder / rundir.WEIGHTS).is_file():
        raise NotARunFolder(
            f"{folder} is a run exported for SAELens ('sweep export'): load it with "
            "sae_lens.SAE.load_from_disk, or load_run its sweep's run folder"
        )
    for name in (rundir.CFG, rundir.WEIGHTS):
        if not (folder / name).is_file():
            raise NotARunFolder(
                f"{folder} has no {name}: not a finished sweep run folder; pass "
                "SWEEP_DIR/runs/<run_id> of a finished run (see 'sweep status SWEEP_DIR')"
            )


def _not_started(folder: Path) -> None:
    """A run id of a sweep without its folder yet: one line saying so (or that the sweep
    has no such run)."""
    from sweep.sweepdir import MANIFEST, SweepFolder

    sweep_dir = folder.parent.parent  # (its runs/ may not be made yet: its manifest says)
    if folder.parent.name != rundir.RUNS or not (sweep_dir / MANIFEST).is_file():
        return
    if folder.name not in SweepFolder(sweep_dir).run_ids():
        raise SweepError(
            f"sweep {sweep_dir} has no run {folder.name}; 'sweep status {sweep_dir}' lists its runs"
        )
    raise SweepError(
        f"run {folder.name} of sweep {sweep_dir} has not started (no folder yet); its sweep "
        f"trains it: see 'sweep status {sweep_dir}'"
    )


def as_device(device: str | torch.device) -> torch.device:
    """``device`` as a torch device that is there (a one-line error for one that is not)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise SweepError(f"unknown device {device!r}; pass device='cpu' or 'cuda'") from err
    if dev.type == "cpu":
        return torch.device("cpu")  # (cpu:0 is the CPU; safetensors refuses the index)
    if dev.type == "mps" and torch.backends.mps.is_available():
        return dev  # (Apple silicon: an SAE loaded there computes there)
    if dev.type != "cuda":
        raise SweepError(f"device={device!r} is not supported here; pass device='cpu' or 'cuda'")
    if not torch.cuda.is_available():
        raise SweepError(f"device={device!r} but no CUDA device is visible; pass device='cpu'")
    count = torch.cuda.device_count()
    if dev.index is not None and dev.index >= count:
        raise SweepError(
            f"device={device!r} but {count} CUDA device(s) are visible; pass 'cuda' or "
            f"'cuda:0'{f' to cuda:{count - 1}' if count > 1 else ''}"
        )
    return dev


def read_run(folder: Path, device: str | torch.device = "cpu") -> SAE:
    """:func:`load_run` without its checks, for a caller that verified the folder already."""
    from safetensors.torch import load_file

    device = as_device(device)
    try:
        cfg = json.loads((folder / rundir.CFG).read_text())
    except (UnicodeDecodeError, ValueError) as err:
        raise SweepError(
            f"{folder / rundir.CFG} is damaged ({type(err).__name__}); re-run its sweep to write it again"
        ) from err
    params = load_file(str(folder / rundir.WEIGHTS), device=str(device))
    return SAE(params, cfg).to(device)
