"""Typed configuration: the only place schemas and validation live.

Hydra composes YAML from ``sweep/configs`` over these dataclass schemas (registered in
:func:`register_configs`). The CLI converts the composed ``DictConfig`` to :class:`SweepConfig`
once, at the boundary, and calls :meth:`SweepConfig.check`; everything downstream receives
plain frozen specs.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
import re
import typing
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar, Union

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from sweep.devices import COMPUTE_DTYPES, TENSOR_DTYPES

COMPILE_SETTINGS = ("auto", "true", "false")
"""Values of ``train.compile`` and ``train.cuda_graphs`` (lower case; Hydra turns ``true``
into a bool)."""
INIT_SEEDINGS = ("per_ratio", "shared")
"""Values of ``train.init_seeding``."""

T = TypeVar("T")

LOGGERS = ("none", "wandb")
LOGGER_MODES = ("auto", "online", "offline", "disabled")


class ConfigError(ValueError):
    """An invalid configuration value. The message names the field and the fix."""


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


@dataclass
class DataConfig:
    """Where activations come from. Subclassed per ``data`` group option."""

    name: str = MISSING
    """Which source: ``synthetic`` or ``chunks``."""
    path: str | None = None
    """Chunk store folder. For ``synthetic`` it defaults to ``<sweep_dir>/store``."""
    normalize: bool = True
    """Scale activations by one constant per store so the mean row norm is sqrt(width)."""
    eval_rows: int = 16384
    """Rows held out at the end of the store for final metrics (never trained on)."""

    def check(self) -> None:
        own = type(self).name  # (the option of the data group this class is)
        _require(
            self.name == own,
            f"data.name={self.name!r} does not name this source ({own}); choose the source "
            "with data=synthetic, data=chunks or data=harvest, not data.name",
        )
        _require(self.eval_rows > 0, f"data.eval_rows must be > 0, got {self.eval_rows}")


@dataclass
class SyntheticDataConfig(DataConfig):
    """Synthetic activations with known ground-truth features (Sharkey et al. 2022 style)."""

    name: str = "synthetic"
    width: int = 64
    """Activation width d."""
    n_features: int = 256
    """Number of ground-truth feature directions (unit norm, random)."""
    mean_active: float = 4.0
    """Expected number of active ground-truth features per row."""
    decay: float = 0.997
    """Feature i fires with probability proportional to decay**i (geometric decay)."""
    noise: float = 0.0
    """Standard deviation of Gaussian noise added to every element."""
    correlation: float = 0.0
    """In [0, 1): strength of correlation between features' firing (Gaussian copula)."""
    rows: int = 1_000_000
    """Total rows generated (training rows + eval rows)."""
    seed: int = 0
    """Generator seed: same parameters and seed give the same store, bit for bit."""
    rows_per_chunk: int = 131072
    """Rows in each chunk file."""
    dtype: str = "float32"
    """Stored dtype: float32 | float16 | bfloat16."""

    def check(self) -> None:
        super().check()
        _require(self.width > 0, f"data.width must be > 0, got {self.width}")
        _require(self.n_features > 0, f"data.n_features must be > 0, got {self.n_features}")
        _require(
            0 < self.mean_active <= self.n_features,
            f"data.mean_active must be in (0, data.n_features={self.n_features}], got {self.mean_active}",
        )
        _require(0 < self.decay <= 1, f"data.decay must be in (0, 1], got {self.decay}")
        _require(self.noise >= 0, f"data.noise must be >= 0, got {self.noise}")
        _require(
            -(2**63) <= self.seed < 2**63,
            f"data.seed must fit in 64 bits (-2**63 to 2**63 - 1), got {self.seed}",
        )
        _require(
            0 <= self.correlation < 1,
            f"data.correlation must be in [0, 1), got {self.correlation}",
        )
        _require(
            self.rows_per_chunk > 0, f"data.rows_per_chunk must be > 0, got {self.rows_per_chunk}"
        )
        _require(
            self.rows > self.eval_rows,
            f"data.rows ({self.rows}) must exceed data.eval_rows ({self.eval_rows}); raise data.rows",
        )
        _require(
            self.dtype in TENSOR_DTYPES,
            f"data.dtype must be one of {', '.join(TENSOR_DTYPES)}, got {self.dtype!r}",
        )


@dataclass
class ChunksDataConfig(DataConfig):
    """An existing chunk store on disk (harvested or generated earlier)."""

    name: str = "chunks"

    def check(self) -> None:
        super().check()
        _require(
            bool(self.path),
            "data.path is required for data=chunks: pass data.path=/path/to/store",
        )


@dataclass
class HarvestSource:
    """What a harvest reads and how it writes (shared by ``sweep harvest`` and ``data=harvest``)."""

    model: str = MISSING
    """Model name (loaded with transformer_lens' TransformerBridge.boot_transformers) or a local HF model folder."""
    dataset: str = MISSING
    """Hub dataset name, a save_to_disk folder, or a local .txt (blank-line separated) / .jsonl / .parquet file (or .json: JSON Lines or one array of records)."""
    split: str = "train"
    """Dataset split (hub datasets and save_to_disk folders)."""
    text_field: str = "text"
    """Field / column holding the text (.jsonl, .parquet, datasets)."""
    rows: int = MISSING
    """Rows (token activations) written to each store."""
    context: int = 128
    """Tokens per context (BOS included when prepended)."""
    prepend_bos: bool = True
    """Start every context with the tokenizer's BOS token."""
    drop_bos: bool = True
    """Do not store the BOS position's activations (they are outliers)."""
    rows_per_chunk: int = 262144
    """Rows in each chunk file."""
    dtype: str = "float16"
    """Stored dtype: float32 | float16 | bfloat16."""
    shuffle_rows: int = 1048576
    """Rows shuffled together before writing, rounded up to whole chunks (host memory: about
    2 x shuffle_rows x width x dtype bytes per hook, as one group is written while the next is harvested)."""
    batch_contexts: int = 32
    """Contexts per forward pass."""
    seed: int = 0
    """Seeds the shuffle."""
    device: str = "auto"
    """``auto`` (cuda when available), ``cpu`` or ``cuda``."""
    model_dtype: str = "float32"
    """Model weights' dtype: float32 | float16 | bfloat16."""
    shards: int = 1
    """Disjoint token ranges harvested in parallel, one Ray task each (a GPU each on CUDA); 0 = one per Ray GPU."""
    lm_eval_tokens: int = 16384
    """Tokens after the harvested range kept with the store for LM metrics (ce_loss_*, loss_recovered); 0 = none."""

    def check_source(self, prefix: str) -> None:
        for name in ("model", "dataset"):
            _require(
                bool(getattr(self, name)), f"{prefix}{name} is required: pass {prefix}{name}=..."
            )
        _require(self.rows > 0, f"{prefix}rows must be > 0, got {self.rows}")
        _require(self.context >= 2, f"{prefix}context must be >= 2, got {self.context}")
        _require(
            self.rows_per_chunk > 0,
            f"{prefix}rows_per_chunk must be > 0, got {self.rows_per_chunk}",
        )
        _require(
            self.dtype in TENSOR_DTYPES,
            f"{prefix}dtype must be one of {', '.join(TENSOR_DTYPES)}, got {self.dtype!r}",
        )
        _require(
            self.shuffle_rows >= 0, f"{prefix}shuffle_rows must be >= 0, got {self.shuffle_rows}"
        )
        _require(
            self.batch_contexts > 0,
            f"{prefix}batch_contexts must be > 0, got {self.batch_contexts}",
        )
        _require(
            self.device in ("auto", "cpu", "cuda"),
            f"{prefix}device must be auto, cpu or cuda, got {self.device!r}",
        )
        _require(
            self.model_dtype in TENSOR_DTYPES,
            f"{prefix}model_dtype must be one of {', '.join(TENSOR_DTYPES)}, got {self.model_dtype!r}",
        )
        _require(self.shards >= 0, f"{prefix}shards must be >= 0, got {self.shards}")
        _require(self.seed >= 0, f"{prefix}seed must be >= 0, got {self.seed}")
        _require(
            self.lm_eval_tokens >= 0,
            f"{prefix}lm_eval_tokens must be >= 0, got {self.lm_eval_tokens}",
        )


@dataclass
class HarvestDataConfig(DataConfig, HarvestSource):
    """Harvest one hook of a model into ``data.path`` (default ``<sweep_dir>/store``), then train
    on it; the harvest is skipped when that store is already complete with these values."""

    name: str = "harvest"
    hook: str = MISSING
    """transformer_lens hook name, e.g. ``blocks.2.hook_resid_post``."""

    def check(self) -> None:
        super().check()
        self.check_source("data.")
        _require(bool(self.hook), "data.hook is required: pass data.hook=blocks.N.hook_resid_post")
        _require(
            self.rows > self.eval_rows,
            f"data.rows ({self.rows}) must exceed data.eval_rows ({self.eval_rows}); raise data.rows",
        )


DATA_OPTIONS = (SyntheticDataConfig, ChunksDataConfig, HarvestDataConfig)
"""The ``data`` group's options' schemas."""


@dataclass
class SAEConfig:
    """Architecture of every dictionary in the sweep (one per sweep)."""

    name: str = MISSING
    """A registered architecture (:mod:`sweep.archs`): ``untied``, ``tied``, ``topk``,
    ``batchtopk``, ``matryoshka``, ``jumprelu`` or ``gated``."""
    recipe: str | None = None
    """The training recipe, for architectures that offer several (untied: ``unit`` or
    ``weighted``; jumprelu: ``linear`` or ``log``); None = the architecture's default, named
    in the composed config (so config.yaml records it)."""
    init_decoder_norm: float | None = None
    """Norm of the initial decoder rows; None = the recipe's (0.1 for ``weighted``, else 1).
    Where decoder rows are kept at unit norm (every recipe but ``weighted``) it sets only the
    encoder's starting scale (its transpose): the rows are renormalised after the first step."""
    levels: list[float] | None = None
    """``sae=matryoshka``'s inner levels: ascending fractions of the dictionary in (0, 1), each
    the size of a nested dictionary that must reconstruct the input alone (the whole one is
    always the last); None = its default (1/32, 3/32, 7/32, 15/32), named in the composed
    config. Other architectures have none."""

    def check(self) -> None:
        from sweep.archs import REGISTRY

        _require(
            self.name in REGISTRY,
            f"unknown architecture sae={self.name!r}; choose one of: {', '.join(sorted(REGISTRY))}",
        )
        recipes = REGISTRY[self.name].recipes
        if self.recipe is not None:
            _require(
                self.recipe in recipes,
                f"unknown recipe sae.recipe={self.recipe!r} for sae={self.name}; "
                + (
                    f"choose one of: {', '.join(recipes)}"
                    if recipes
                    else "it has none: drop sae.recipe"
                ),
            )
        _require(
            self.init_decoder_norm is None
            or (math.isfinite(self.init_decoder_norm) and self.init_decoder_norm > 0),
            f"sae.init_decoder_norm must be > 0 (or null for the recipe's), got {self.init_decoder_norm}",
        )
        self._check_levels(REGISTRY[self.name].nested)

    def _check_levels(self, nested: bool) -> None:
        if self.levels is None:
            return
        _require(
            nested or not self.levels,
            f"sae.levels is sae=matryoshka's (nested dictionaries); sae={self.name} has none: "
            "drop sae.levels, or use sae=matryoshka",
        )
        given = list(self.levels)
        _require(
            all(0 < v < 1 for v in given) and all(a < b for a, b in itertools.pairwise(given)),
            f"sae.levels must be ascending fractions of the dictionary in (0, 1) (the whole "
            f"dictionary is always the last level), got {given}; e.g. sae.levels='[0.0625,0.25]'",
        )

    def architecture(self):  # -> sweep.archs.Architecture
        """The registered architecture configured with this recipe (and levels)."""
        from sweep.archs import get

        return get(self.name).configure(self.recipe, self.init_decoder_norm, self.levels)

    @property
    def knob(self) -> str:
        """The grid field that sets sparsity for this architecture: ``l1`` or ``k``."""
        from sweep.archs import get

        return get(self.name).knob


DEFAULT_L1 = [1e-2, 2e-2, 4e-2, 8e-2]
DEFAULT_K = [16, 32, 64, 128]


MAX_RUNS = 100_000
"""Most runs one sweep plans (a typo such as ``grid.seeds=100000`` would plan for minutes)."""


@dataclass
class GridConfig:
    """The grid: every combination of (l1 or k) x dict_ratio x seed is one run."""

    l1: list[float] | None = None
    """Sparsity coefficients (>= 0) of L1-style architectures (untied, tied, gated: the gate's;
    JumpReLU's L0 coefficient); None = ``DEFAULT_L1``."""
    k: list[int] | None = None
    """Active latents per row of TopK-style architectures (topk, batchtopk, matryoshka); None = ``DEFAULT_K``."""
    dict_ratio: list[float] = field(default_factory=lambda: [4.0, 8.0])
    """Dictionary size / activation width (> 0); dict size = round(ratio * width)."""
    lr: list[float] | None = None
    """Learning rates (> 0) as a grid axis: every (l1 or k, dict_ratio) point trains at each,
    and run ids name it (``r8-k64-lr1e-03-s0``); None = every run at ``train.lr``."""
    seeds: int = 1
    """Number of initialisation seeds per (l1 or k, lr, dict_ratio) point."""
    max_members: int = 0
    """Largest ensemble (members trained as one program): a cap on what the memory model
    fits (it also lifts the CPU's default cap of 8); 0 = the memory model alone."""

    def values(self, knob: str) -> list[float]:
        """The grid's sparsity values for an architecture whose knob is ``knob``."""
        given = self.l1 if knob == "l1" else self.k
        return list(given) if given is not None else list(DEFAULT_L1 if knob == "l1" else DEFAULT_K)

    def check_for(self, sae: SAEConfig) -> None:
        """The grid field matches the architecture: grid.k for TopK-style, grid.l1 otherwise."""
        knob = sae.knob
        other = "k" if knob == "l1" else "l1"
        _require(
            getattr(self, other) is None,
            f"grid.{other} does not apply to sae={sae.name}, which takes grid.{knob}; "
            f"drop grid.{other}",
        )
        values = self.values(knob)
        _require(
            len(values) > 0,
            f"grid.{knob} is empty: give at least one value, e.g. grid.{knob}='[{'1e-3' if knob == 'l1' else '32'}]'",
        )
        _distinct(knob, values)
        for v in values:
            if knob == "l1":
                _require(
                    math.isfinite(v) and v >= 0,
                    f"grid.l1 values must be finite and >= 0, got {v}; e.g. grid.l1='[1e-3,1e-2]'",
                )
            else:
                _require(
                    v == int(v) and v >= 1,
                    f"grid.k values must be whole numbers >= 1, got {v}; e.g. grid.k='[16,32,64]'",
                )
        lrs = len(self.lr or [None])
        runs = len(values) * lrs * len(self.dict_ratio) * self.seeds
        _require(
            runs <= MAX_RUNS,
            f"the grid has {runs:,} runs ({len(values)} {knob} x {len(self.dict_ratio)} dict_ratio "
            + (f"x {lrs} lr " if self.lr else "")
            + f"x {self.seeds:,} seeds), more than {MAX_RUNS:,}; grid.seeds counts the seeds of each "
            f"point: lower it, or split the grid into several sweeps",
        )

    def check(self) -> None:
        _require(
            len(self.dict_ratio) > 0,
            "grid.dict_ratio is empty: give at least one value, e.g. grid.dict_ratio='[4]'",
        )
        for v in self.dict_ratio:
            _require(math.isfinite(v) and v > 0, f"grid.dict_ratio values must be > 0, got {v}")
        _distinct("dict_ratio", self.dict_ratio)
        self._check_lr()
        _require(self.seeds >= 1, f"grid.seeds must be >= 1, got {self.seeds}")
        _require(self.max_members >= 0, f"grid.max_members must be >= 0, got {self.max_members}")

    def _check_lr(self) -> None:
        if self.lr is None:
            return
        _require(
            len(self.lr) > 0,
            "grid.lr is empty: give at least one learning rate, e.g. grid.lr='[1e-3,3e-3]', "
            "or grid.lr=null for train.lr",
        )
        for v in self.lr:
            _require(
                math.isfinite(v) and v > 0,
                f"grid.lr values must be finite and > 0, got {v}; e.g. grid.lr='[1e-3,3e-3]'",
            )
        _distinct("lr", self.lr)


def _distinct(name: str, values: list) -> None:
    """``grid.<name>`` lists each value once."""
    _require(
        len(set(values)) == len(values),
        f"grid.{name} has duplicate values: {values}; list each value once",
    )


@dataclass
class TrainConfig:
    """Optimisation settings shared by every run of the sweep (``lr`` unless ``grid.lr``)."""

    batch_size: int = 1024
    lr: float = 3e-3
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    """Adam's epsilon, in this loss's units: the loss averages the squared error over the
    dimensions where SAELens sums it, so the gradients are 1/width of SAELens's and 1e-8 acts as
    width x 1e-8 would there. Kept so: SAELens's units (eps / width) measured worse on SmolLM2
    activations (BENCHMARKS.md: TopK at width 576, FVU +2%, dead latents 12% -> 23%)."""
    epochs: int = 1
    """Passes over the training rows of the store."""
    lr_warmup: float = 0.0
    """Fraction of training over which the learning rate ramps linearly from 0."""
    lr_decay: float = 0.2
    """Fraction of training at the end over which the learning rate decays linearly to 0.
    0.2 as in Anthropic's and dictionary_learning's recipes: on SmolLM2-135M activations it
    lowered FVU 2-8% for TopK, BatchTopK and JumpReLU and left ReLU-L1's frontier level
    (BENCHMARKS.md)."""
    l1_warmup: float = 0.0
    """Fraction of training over which every member's l1 ramps linearly from 0."""
    seed: int = 0
    """Seeds the data order and (with the run's seed index) each member's initialisation."""
    init_seeding: str = "per_ratio"
    """What seeds a member's initialisation beside ``seed``: per_ratio (its seed index and
    dictionary size: the runs of one seed index and ratio start alike across l1 / k values,
    different ratios start independently) | shared (its seed index alone: a smaller dictionary
    starts as the leading atoms of a larger one, which inflates cross-ratio similarity such as
    mmcs_next_ratio; what sweeps recorded before this setting trained with)."""
    device: str = "auto"
    """``auto`` (cuda when available), ``cpu`` or ``cuda``."""
    dtype: str = "auto"
    """Compute precision: auto (bfloat16 on a GPU, tf32 there for JumpReLU's log recipe;
    float32 on the CPU) | float32 | tf32 (tf32 matmuls on CUDA) | bfloat16. Parameters and
    Adam state are always float32."""
    compile: str = "auto"
    """Run each ensemble's step as one ``torch.compile``d program (fused elementwise passes,
    one Adam pass per parameter for all members): auto (off for now: on the CPU the eager step
    measured faster; on a GPU a compiled run does not yet resume bit-exactly) | true | false."""
    cuda_graphs: str = "auto"
    """Replay the compiled step as CUDA graphs (one launch per step instead of ~30: 1.7x at
    128 x 512, K=16 on an H200, no change at GPT-2 sizes; the same kernels, so the same
    bits): auto (wherever the step is compiled on a GPU) | true (the same, asked for: needs
    train.compile=true) | false."""
    log_every: int = 50
    """Steps between training-curve records (one device sync for all members)."""
    checkpoint_minutes: float = 10.0
    """Minutes of training between checkpoints; one is also written on every stop
    (SIGTERM/SIGINT) and before a run's final files."""
    checkpoint_every: int | None = None
    """Also checkpoint every this many steps (None = by time only)."""
    snapshots: list[float] = field(default_factory=list)
    """Fractions of training (in (0, 1)) at which each run's weights are kept as they are then,
    in ``runs/<run_id>/snapshots/step-<N>/`` (loadable with ``sweep.load_run``); [] = none."""
    threads: int = 0
    """Torch CPU threads per ensemble; 0 = the CPUs Ray assigned to the task."""
    dead_tokens: int = 10_000_000
    """Training rows without firing after which a latent counts as dead (for AuxK and
    resampling; 10M as in Gao et al. 2024)."""
    auxk_alpha: float = 0.03125
    """Weight of the AuxK loss for topk / batchtopk / matryoshka (Gao et al.'s 1/32; 0 = off). It uses the
    top width/2 dead latents and only starts once ``dead_tokens`` rows have been trained.
    A plain MSE like the main loss (sparsify's weighting; Gao et al. normalise both terms by
    their targets' variance, which weighs AuxK 1/FVU times more)."""
    resample_dead: int = 0
    """untied / tied / gated (L1-penalised): every this many steps, re-initialise dead latents from badly
    reconstructed rows of the current batch and reset their Adam state (0 = off)."""
    resample_stop: float = 0.5
    """Fraction of training after which no more resampling happens."""
    grad_clip: float | None = 1.0
    """Clip each member's gradient norm (None = off), as ``torch.nn.utils.clip_grad_norm_``
    would for that member alone, in SAELens's units: the gradient of width x loss (the
    squared error summed over dimensions), so 1.0 is what SAELens's trainer does."""

    def snapshot_steps(self, total: int) -> set[int]:
        """The steps (1-based, of ``total``) after which :attr:`snapshots` are kept."""
        return set(self._snapshots_at(total)) - {total}

    def _snapshots_at(self, total: int) -> dict[int, list[float]]:
        """The :attr:`snapshots` fractions by the step (1-based, of ``total``) each falls on."""
        at: dict[int, list[float]] = {}
        for f in self.snapshots:
            at.setdefault(max(1, round(f * total)), []).append(f)
        return at

    def snapshots_note(self, total: int) -> str | None:
        """A warning for :attr:`snapshots` that fall on one step of ``total``, or on the last
        (whose weights are the run's own), so fewer snapshots are kept than named."""
        at = self._snapshots_at(total)
        said = [
            f"{', '.join(f'{f:g}' for f in fs)} fall on step {step} of {total}: one snapshot there"
            for step, fs in sorted(at.items())
            if len(fs) > 1 and step != total
        ]
        if total in at:
            fs = at[total]
            verb = "fall" if len(fs) > 1 else "falls"
            said.append(
                f"{', '.join(f'{f:g}' for f in fs)} {verb} on the last step ({total}): no "
                "snapshot, the run's own weights are that step's"
            )
        return f"train.snapshots {'; '.join(said)}" if said else None

    def lr_scale(self, step: int, total: int) -> float:
        """Multiplier of ``lr`` for 0-based ``step`` of ``total`` (warmup, flat, linear decay)."""
        warm, decay = self.lr_warmup * total, self.lr_decay * total
        if warm > 0 and step < warm:
            return (step + 1) / warm
        if decay > 0 and step >= total - decay:
            return max(0.0, (total - step) / decay)
        return 1.0

    def mean_lr_scale(self) -> float:
        """The mean of :meth:`lr_scale` over training (each linear ramp averages 1/2)."""
        return 1.0 - (self.lr_warmup + self.lr_decay) / 2

    def l1_scale(self, step: int, total: int) -> float:
        warm = self.l1_warmup * total
        return min(1.0, (step + 1) / warm) if warm > 0 else 1.0

    def _check_cuda_graphs(self) -> None:
        graphs = str(self.cuda_graphs).lower()
        _require(
            graphs in COMPILE_SETTINGS,
            f"train.cuda_graphs must be auto, true or false, got {self.cuda_graphs!r}",
        )
        if graphs != "true":
            return
        _require(
            str(self.compile).lower() == "true",
            "train.cuda_graphs=true replays the compiled step: set train.compile=true too "
            "(or train.cuda_graphs=auto)",
        )
        _require(
            self.device != "cpu",
            "train.cuda_graphs=true needs a GPU but train.device=cpu; use train.device=cuda "
            "or auto (or train.cuda_graphs=auto)",
        )

    def check(self) -> None:
        self._check_optimizer()
        self._check_compute()
        self._check_saving()
        self._check_dead_latents()

    def _check_optimizer(self) -> None:
        _require(self.batch_size > 0, f"train.batch_size must be > 0, got {self.batch_size}")
        _require(0 <= self.seed < 2**63, f"train.seed must be in [0, 2**63), got {self.seed}")
        _require(math.isfinite(self.lr) and self.lr > 0, f"train.lr must be > 0, got {self.lr}")
        _require(
            len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
            f"train.betas must be two values in [0, 1), got {list(self.betas)}",
        )
        _require(self.eps > 0, f"train.eps must be > 0, got {self.eps}")
        _require(self.epochs >= 1, f"train.epochs must be >= 1, got {self.epochs}")
        for name in ("lr_warmup", "lr_decay", "l1_warmup"):
            v = getattr(self, name)
            _require(0 <= v <= 1, f"train.{name} must be a fraction in [0, 1], got {v}")
        _require(
            self.lr_warmup + self.lr_decay <= 1,
            f"train.lr_warmup + train.lr_decay must be <= 1, got {self.lr_warmup + self.lr_decay}",
        )
        _require(
            self.grad_clip is None or (math.isfinite(self.grad_clip) and self.grad_clip > 0),
            f"train.grad_clip must be > 0 (or null = off), got {self.grad_clip}",
        )

    def _check_compute(self) -> None:
        _require(
            self.device in ("auto", "cpu", "cuda"),
            f"train.device must be auto, cpu or cuda, got {self.device!r}",
        )
        _require(
            self.dtype in COMPUTE_DTYPES,
            f"train.dtype must be one of {', '.join(COMPUTE_DTYPES)}, got {self.dtype!r}",
        )
        _require(
            str(self.compile).lower() in COMPILE_SETTINGS,
            f"train.compile must be auto, true or false, got {self.compile!r}",
        )
        self._check_cuda_graphs()

    def _check_saving(self) -> None:
        _require(self.log_every > 0, f"train.log_every must be > 0, got {self.log_every}")
        _require(
            math.isfinite(self.checkpoint_minutes) and self.checkpoint_minutes > 0,
            f"train.checkpoint_minutes must be > 0, got {self.checkpoint_minutes}",
        )
        _require(
            self.checkpoint_every is None or self.checkpoint_every > 0,
            f"train.checkpoint_every must be > 0 (or null for time-based only), got {self.checkpoint_every}",
        )
        _require(self.threads >= 0, f"train.threads must be >= 0, got {self.threads}")
        for f in self.snapshots:
            _require(
                math.isfinite(f) and 0 < f < 1,
                f"train.snapshots are fractions of training in (0, 1), got {f}; e.g. "
                "train.snapshots='[0.1,0.5]' (the end's weights are the run's own)",
            )
        _require(
            self.init_seeding in INIT_SEEDINGS,
            f"train.init_seeding must be one of {', '.join(INIT_SEEDINGS)}, got {self.init_seeding!r}",
        )

    def _check_dead_latents(self) -> None:
        _require(self.dead_tokens > 0, f"train.dead_tokens must be > 0, got {self.dead_tokens}")
        _require(
            math.isfinite(self.auxk_alpha) and 0 <= self.auxk_alpha <= 1,
            f"train.auxk_alpha must be in [0, 1] (0 = off), got {self.auxk_alpha}",
        )
        _require(
            self.resample_dead >= 0,
            f"train.resample_dead must be >= 0 steps (0 = off), got {self.resample_dead}",
        )
        _require(
            0 < self.resample_stop <= 1,
            f"train.resample_stop must be a fraction in (0, 1], got {self.resample_stop}",
        )


@dataclass
class LaunchConfig:
    """How ensembles are scheduled with Ray."""

    name: str = "local"
    address: str | None = None
    """Ray cluster address; None starts a local Ray instance in-process."""
    num_cpus: int | None = None
    """CPUs the local Ray instance may use (None = all)."""
    num_gpus: int | None = None
    """GPUs the local Ray instance may use (None = detect)."""
    cpus_per_ensemble: float = 0
    """CPUs each ensemble task asks Ray for; 0 = all local CPUs when training on CPU, 1 on GPU."""
    gpus_per_ensemble: Union[int, float, str] = "auto"  # noqa: UP007 (OmegaConf needs Union)
    """GPUs each ensemble task asks for when training on GPU: a number (fractions share a
    GPU) or ``auto``: each ensemble's share from its memory and modelled load
    (:mod:`sweep.packing`), so small ensembles share a GPU."""
    device_memory_gb: float = 0
    """Memory for the memory model, in GiB: of one GPU when training on GPUs (an ensemble
    plans for its share of it), per ensemble on the CPU; 0 = detect (the driver's GPU's free
    memory, or on a cluster the least free of any GPU node's, :mod:`sweep.gpuinfo`; half the
    memory this process may use on the CPU, a cgroup limit counted, shared by the ensembles
    running at once)."""
    max_retries: int = 2
    """Ray retries of a crashed ensemble task (each resumes from its last checkpoint)."""
    temp_dir: str | None = None
    """Ray's temp/session folder for a local instance (None = Ray's default)."""

    def check(self) -> None:
        _require(
            self.name in ("local", "cluster"),
            f"launch.name must be local or cluster, got {self.name!r}; choose it with "
            "launch=local or launch=cluster",
        )
        _require(
            self.num_cpus is None or self.num_cpus >= 1,
            f"launch.num_cpus must be >= 1 (or null: all), got {self.num_cpus}",
        )
        _require(
            self.num_gpus is None or self.num_gpus >= 0,
            f"launch.num_gpus must be >= 0 (or null: detect), got {self.num_gpus}",
        )
        _require(
            self.cpus_per_ensemble >= 0,
            f"launch.cpus_per_ensemble must be >= 0, got {self.cpus_per_ensemble}",
        )
        share = self.gpus_per_ensemble
        _require(
            share == "auto" or (not isinstance(share, str) and share > 0),
            f"launch.gpus_per_ensemble must be a number > 0 or auto, got {share}",
        )
        _require(
            isinstance(share, str) or share <= 1 or float(share).is_integer(),
            f"launch.gpus_per_ensemble above 1 must be a whole number of GPUs, got {share}",
        )
        _require(self.max_retries >= 0, f"launch.max_retries must be >= 0, got {self.max_retries}")
        _require(
            self.device_memory_gb >= 0,
            f"launch.device_memory_gb must be >= 0, got {self.device_memory_gb}",
        )
        self._check_temp_dir()

    def _check_temp_dir(self) -> None:
        """A local Ray's sockets lie in ``temp_dir``, under a session folder (refused before
        any work, not after the store is made, when they would not fit)."""
        if not self.temp_dir or self.address:
            return
        path = str(Path(self.temp_dir).absolute())
        room = SOCKET_PATH_MAX - len(RAY_SOCKET_TAIL)
        _require(
            len(path.encode()) <= room,
            f"launch.temp_dir {path} is too long for Ray's socket paths ({len(path.encode())} "
            f"bytes; at most {room}, as its sockets lie {len(RAY_SOCKET_TAIL)} bytes deeper); "
            "use a shorter folder",
        )


SOCKET_PATH_MAX = 107
"""The longest path of a Unix socket (Linux; Ray's own check)."""
RAY_SOCKET_TAIL = "/session_2026-12-05_20-52-43_123456_4194304/sockets/plasma_store"
"""Where a local Ray puts its longest socket under its temp folder (date, microseconds, pid)."""


MIN_LOGGER_TIMEOUT = 2.0
"""The shortest ``logger.timeout``: wandb's first start in a worker process takes ~1 s, and a
logger closed before its runs began wrote them empty (measured at 0.05 s)."""


@dataclass
class LoggerConfig:
    """Experiment tracking. ``none`` logs nothing; ``wandb`` logs every grid point as its own
    wandb run (grouped by sweep), best-effort: it never blocks or fails training."""

    name: str = "none"
    """``none`` or ``wandb``."""
    project: str = "sweep"
    """wandb project."""
    entity: str | None = None
    """wandb entity (user or team); None = the account's default."""
    mode: str = "auto"
    """``auto`` (online when an API key is configured, else offline), ``online``, ``offline`` or ``disabled``."""
    timeout: float = 30.0
    """Seconds any one backend call (init, finish) may take before it is abandoned; a logger's
    close waits while wandb makes progress, at most 4 x this in all (at least
    :data:`MIN_LOGGER_TIMEOUT`)."""
    queue_size: int = 1000
    """Curve events buffered for the background sender; when that many wait, new ones are
    dropped (training never blocks); a run's final metrics are always queued."""
    group: str | None = None
    """The wandb group of the sweep's runs; None = the sweep folder's name when the sweep
    began, then kept in config.yaml (a renamed sweep stays in one group; two sweeps in folders
    of the same name, logging to one project, share it unless this tells them apart)."""

    def check(self) -> None:
        _require(
            self.name in LOGGERS,
            f"logger.name must be one of {', '.join(LOGGERS)}, got {self.name!r}",
        )
        _require(
            self.mode in LOGGER_MODES,
            f"logger.mode must be one of {', '.join(LOGGER_MODES)}, got {self.mode!r}",
        )
        _require(
            self.timeout >= MIN_LOGGER_TIMEOUT,
            f"logger.timeout must be at least {MIN_LOGGER_TIMEOUT:g} seconds, got {self.timeout} "
            "(wandb takes about 1 s to start in each worker: a shorter limit loses its runs); "
            "leave it out for 30",
        )
        _require(self.queue_size > 0, f"logger.queue_size must be > 0, got {self.queue_size}")


@dataclass
class SweepConfig:
    """The whole sweep, as composed by Hydra."""

    data: DataConfig = MISSING
    sae: SAEConfig = MISSING
    grid: GridConfig = field(default_factory=GridConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    sweep_dir: str = MISSING
    """Folder holding the run folders, manifest, summary and resolved config."""
    progress: bool = True
    """Show a progress bar (disable for batch logs)."""

    def check(self) -> None:
        _require(
            bool(self.sweep_dir) and self.sweep_dir != MISSING,
            "sweep_dir is required: pass sweep_dir=outputs/my-sweep",
        )
        for part in (self.data, self.sae, self.grid, self.train, self.launch, self.logger):
            part.check()
        self.grid.check_for(self.sae)
        self._check_dead_latent_remedy()
        self._check_training_rows()

    def _check_training_rows(self) -> None:
        """A store this sweep makes (``data.rows``, ``data.rows_per_chunk``) leaves a batch
        after the held-out rows, and its chunks each hold one."""
        rows, held, batch = (
            getattr(self.data, "rows", None),
            self.data.eval_rows,
            self.train.batch_size,
        )
        _require(
            rows is None or rows - held >= batch,
            f"data.rows ({rows}) leaves {rows - held if rows else 0} rows after data.eval_rows={held}, "
            f"fewer than one batch (train.batch_size={batch}); raise data.rows or lower "
            "data.eval_rows",
        )
        per_chunk = getattr(self.data, "rows_per_chunk", None)  # (a store made here: its chunks)
        _require(
            per_chunk is None or per_chunk >= batch,
            f"train.batch_size={batch} is more than data.rows_per_chunk={per_chunk}: no chunk "
            "would hold a full batch (batches never span chunks); lower train.batch_size or "
            "raise data.rows_per_chunk",
        )

    def _check_dead_latent_remedy(self) -> None:
        """Resampling is for L1-penalised SAEs (AuxK for TopK-style ones)."""
        topk_style = self.sae.architecture().knob == "k"
        fix = "TopK-style SAEs use train.auxk_alpha" if topk_style else "set train.resample_dead=0"
        _require(
            self.train.resample_dead == 0 or self.sae.architecture().resamples,
            f"train.resample_dead applies to {_resampling()}, not sae={self.sae.name}; " + fix,
        )

    def learning_rates(self) -> list[float]:
        """The learning rates the sweep's runs train at: ``grid.lr``, else ``train.lr``."""
        return list(self.grid.lr) if self.grid.lr is not None else [self.train.lr]

    def inert_note(self) -> str | None:
        """A warning for settings that do nothing here (a warning, not an error: sweeps
        recorded with them must resume): a changed AuxK weight on an SAE that is not
        TopK-style, an L1 warm-up on one that is, a changed ``train.lr`` beside ``grid.lr``,
        a changed ``dead_tokens`` with no dead-latent remedy on."""
        arch, t = self.sae.architecture(), self.train
        topk_style, notes = arch.knob == "k", []
        if not topk_style and t.auxk_alpha != TrainConfig.auxk_alpha:
            notes.append(
                f"train.auxk_alpha={t.auxk_alpha:g} does nothing for sae={self.sae.name}: AuxK "
                f"is for TopK-style SAEs ({_topk_style()})"
                + ("; dead features: train.resample_dead" if arch.resamples else "")
            )
        if topk_style and t.l1_warmup != TrainConfig.l1_warmup:
            notes.append(
                f"train.l1_warmup={t.l1_warmup:g} does nothing for sae={self.sae.name}: it has "
                "no L1 coefficient (grid.k sets its sparsity)"
            )
        if self.grid.lr is not None and t.lr != TrainConfig.lr:
            notes.append(
                f"train.lr={t.lr:g} does nothing here: grid.lr sets each run's learning rate"
            )
        remedy = (topk_style and t.auxk_alpha > 0) or t.resample_dead > 0
        if not remedy and t.dead_tokens != TrainConfig.dead_tokens:
            notes.append(
                f"train.dead_tokens={t.dead_tokens:,} does nothing here: no dead-latent remedy "
                "is on (AuxK: train.auxk_alpha on TopK-style SAEs; resampling: "
                "train.resample_dead)"
            )
        return "; ".join(notes) or None


def _topk_style() -> str:
    from sweep.archs import REGISTRY

    return ", ".join(sorted(n for n, a in REGISTRY.items() if a.knob == "k"))


def _resampling() -> str:
    """The architectures whose dead latents can be resampled, as error messages name them."""
    from sweep.archs import REGISTRY

    names = sorted(n for n, a in REGISTRY.items() if a.resamples)
    return f"L1-penalised SAEs ({', '.join(names)})"


def register_configs() -> None:
    """Register schemas with Hydra's ConfigStore (call before composing)."""
    cs = ConfigStore.instance()
    cs.store(name="sweep_schema", node=SweepConfig)
    cs.store(group="data", name="synthetic_schema", node=SyntheticDataConfig)
    cs.store(group="data", name="chunks_schema", node=ChunksDataConfig)
    cs.store(group="data", name="harvest_schema", node=HarvestDataConfig)
    cs.store(name="harvest_schema", node=HarvestConfig)
    cs.store(group="sae", name="sae_schema", node=SAEConfig)
    cs.store(group="grid", name="grid_schema", node=GridConfig)
    cs.store(group="train", name="train_schema", node=TrainConfig)
    cs.store(group="launch", name="launch_schema", node=LaunchConfig)
    cs.store(group="logger", name="logger_schema", node=LoggerConfig)


def to_sweep_config(cfg: DictConfig) -> SweepConfig:
    """Convert a composed DictConfig to dataclasses once, validate it, and fill the grid's
    default sparsity values for its architecture (so config.yaml records them)."""
    out = _to_checked(cfg, SweepConfig, "sweep", "config")
    knob = out.sae.knob
    setattr(out.grid, knob, out.grid.values(knob))
    arch = out.sae.architecture()
    out.sae.recipe = arch.recipe or None  # the defaults, named
    out.sae.levels = list(arch.levels) if arch.nested else None  # (matryoshka's, [] too)
    return out


def _to_checked(cfg: DictConfig, schema: type[T], what: str, name: str) -> T:
    unknown = _unknown_field(cfg)
    if unknown:  # added with '+', which even a structured config takes (and would drop)
        command = "run" if what == "sweep" else what
        near = near_field(unknown, name, _group_schema(cfg, unknown))
        raise ConfigError(
            f"unknown config field '{unknown}'{near}; run "
            f"'sweep {command} --cfg job' to list the fields"
        )
    try:
        obj = OmegaConf.to_object(cfg)
    except Exception as err:  # omegaconf raises several types; all mean a bad value
        raise ConfigError(one_line(str(err))) from err
    if not isinstance(obj, schema):
        raise ConfigError(f"config is not a {what} config: compose it from sweep's '{name}'")
    _expand_home(obj)
    _absolute_sources(obj)
    _check_finite(obj)
    try:
        obj.check()
    except ConfigError as err:
        raise ConfigError(_with_fix(str(err), obj)) from None
    return obj


PATH_FIELDS = {"sweep_dir", "path", "temp_dir", "store_dir", "model", "dataset"}
"""Fields that name a file or folder: a leading ``~`` is the home folder, as in a shell (an
override quoted for the shell keeps it: ``sweep_dir='~/x'`` made a folder named ``~``)."""


def text_fields(schema: type) -> set[str]:
    """Dotted names of the fields of ``schema`` (and of every option of its groups) that
    hold text only: an override's ``1e-3`` there is meant as written."""
    return _fields_of(schema, lambda h: h is str or set(typing.get_args(h)) == {str, type(None)})


def bool_fields(schema: type) -> set[str]:
    """Dotted names of the fields of ``schema`` (and of its groups' options) that are bools."""
    return _fields_of(schema, lambda h: h is bool)


def _fields_of(schema: type, wanted: typing.Callable[[object], bool], prefix: str = "") -> set[str]:
    out: set[str] = set()
    for name, hint in typing.get_type_hints(schema).items():
        if dataclasses.is_dataclass(hint):
            for cls in (hint, *_subclasses(hint)):
                out |= _fields_of(cls, wanted, f"{prefix}{name}.")
        elif wanted(hint):
            out.add(f"{prefix}{name}")
    return out


def _subclasses(cls: type) -> list[type]:
    return [c for sub in cls.__subclasses__() for c in (sub, *_subclasses(sub))]


def _leaves(obj: object, prefix: str = "") -> Iterator[tuple[object, str, str]]:
    """``(config, field name, dotted name)`` of every field of ``obj``, and of the configs
    it holds, that is not a config itself."""
    for f in dataclasses.fields(obj):  # type: ignore[arg-type]
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            yield from _leaves(value, f"{prefix}{f.name}.")
        else:
            yield obj, f.name, f"{prefix}{f.name}"


def _expand_home(obj: object) -> None:
    """Expand ``~`` in every path field of ``obj`` and of the configs it holds."""
    for owner, name, _ in _leaves(obj):
        value = getattr(owner, name)
        if name in PATH_FIELDS and isinstance(value, str) and value.startswith("~"):
            setattr(owner, name, os.path.expanduser(value))


def local_ref(name: str, value: str) -> str:
    """A harvest source's ``model`` or ``dataset`` (``name``) as recorded: a local model
    folder or dataset as an absolute path, as the harvest records it, so config.yaml and
    spec.json name it from any working directory (a resume from elsewhere finds it); a hub
    name as it is."""
    from sweep.activations import lm, text

    if not value:  # (missing: the check names it)
        return value
    if name == "model":
        return lm.model_ref(value)
    return str(Path(value).resolve()) if text.is_local(value) else value


def _absolute_sources(obj: object) -> None:
    """:func:`local_ref` of the model and dataset of ``obj`` and the configs it holds."""
    for owner, name, _ in _leaves(obj):
        if isinstance(owner, HarvestSource) and name in ("model", "dataset"):
            setattr(owner, name, local_ref(name, getattr(owner, name)))


def _with_fix(message: str, cfg: object) -> str:
    """A check's message that names a field's bound but no fix (``train.seed must be >= 0, got
    -1``), with the fix: give that field such a value, or leave it out for its default (a
    field of ``cfg``'s that has one). (A message naming its fix, after ``;`` or as ``: pass
    ...`` or ``: give ...``, or not starting with a field's name, stays as it is.)"""
    key = message.split(" ", 1)[0]
    field = _field_named(cfg, key)
    if ";" in message or ": pass " in message or ": give " in message or field is None:
        return message
    such = "such values" if f"{key} values " in message else "such a value"
    required = field.default is MISSING and field.default_factory is dataclasses.MISSING
    default = "" if required else ", or leave it out for its default"
    return f"{message}; give {key} {such}{default}"


def _field_named(cfg: object, key: str) -> dataclasses.Field | None:
    """The dataclass field a dotted ``key`` names in ``cfg`` (``train.seed``), if any."""
    *groups, name = key.split(".")
    for group in groups:
        cfg = getattr(cfg, group, None)
    if not dataclasses.is_dataclass(cfg):
        return None
    return next((f for f in dataclasses.fields(cfg) if f.name == name), None)


def near_field(key: str, config_name: str = "config", within: type | None = None) -> str:
    """`` (did you mean 'x'?)`` for a mistyped field of ``sweep run`` (``harvest``: of
    ``sweep harvest``) close to one it has, else nothing. ``within``: the schema of the
    group it was given in; a ``data`` option's fields come first, another option's are
    named as that option's (``data.hok`` under data=synthetic: data=harvest's ``data.hook``)."""
    group, _, name = key.rpartition(".")
    if within in DATA_OPTIONS and group == "data":
        for option in sorted(DATA_OPTIONS, key=lambda o: o is not within):
            near = _closest(name, [f.name for f in dataclasses.fields(option)])
            if near and option is within:
                return f" (did you mean 'data.{near}'?)"
            if near:
                return f" (did you mean 'data.{near}' of data={_option_name(option)}?)"
        return ""
    known = _dotted(HarvestConfig if config_name == "harvest" else SweepConfig)
    groups = {k.rpartition(".")[0] for k in known}
    if group not in groups:  # a mistyped group too: its nearest
        near_group = _closest(group, sorted(groups), cutoff=0.6)
        group = near_group or group
    names = {k.rpartition(".")[2]: k for k in known if k.rpartition(".")[0] == group}
    near = " or ".join(f"'{names[n]}'" for n in _nearest(name, sorted(names)))
    return f" (did you mean {near}?)" if near else ""


def _closest(name: str, names: list[str], cutoff: float | None = None) -> str | None:
    """The one of ``names`` nearest ``name``, if near enough (a short name: one letter of
    two may differ, ``l2`` for ``l1``)."""
    near = _nearest(name, names, cutoff)
    return near[0] if near else None


def _nearest(name: str, names: list[str], cutoff: float | None = None) -> list[str]:
    """Those of ``names`` nearest ``name`` (several only when equally near: ``l2`` is as near
    ``l1`` as ``lr``), if near enough, in ``names``' order."""
    import difflib

    if cutoff is None:
        cutoff = 0.5 if len(name) <= 3 else 0.6

    scores = {n: difflib.SequenceMatcher(None, name, n).ratio() for n in names}
    best = max(scores.values(), default=0.0)
    return [n for n, score in scores.items() if best >= cutoff and score == best]


def _option_name(schema: type) -> str:
    """A ``data`` option's name (``chunks`` for :class:`ChunksDataConfig`)."""
    return schema.__name__.removesuffix("DataConfig").lower()


def _dotted(schema: type, prefix: str = "") -> list[str]:
    """Every field of ``schema`` as a dotted key, its groups' (each ``data`` option's) too."""
    hints, out = typing.get_type_hints(schema), []
    for f in dataclasses.fields(schema):
        kind = hints[f.name]
        kinds = DATA_OPTIONS if kind is DataConfig else (kind,)
        out.append(prefix + f.name)
        for k in kinds:
            if dataclasses.is_dataclass(k):
                out += _dotted(k, f"{prefix}{f.name}.")
    return sorted(set(out))


def _group_schema(cfg: DictConfig, key: str) -> type | None:
    """The dataclass of the group that holds dotted ``key`` in ``cfg`` (None: not one)."""
    node = cfg
    for part in key.split(".")[:-1]:
        node = node._get_node(part)
        if not isinstance(node, DictConfig):
            return None
    return OmegaConf.get_type(node)


def _unknown_field(cfg: DictConfig, prefix: str = "") -> str | None:
    """The first key of ``cfg`` that its dataclass does not have (dotted), if any."""
    schema = OmegaConf.get_type(cfg)
    if not dataclasses.is_dataclass(schema):
        return None
    names = {f.name for f in dataclasses.fields(schema)}
    for key in cfg:
        if key not in names:
            return f"{prefix}{key}"
        node = cfg._get_node(key)  # (not the value: an interpolation stays unresolved)
        if isinstance(node, DictConfig):
            inner = _unknown_field(node, f"{prefix}{key}.")
            if inner:
                return inner
    return None


def _check_finite(obj: object) -> None:
    """Refuse nan or inf in any number field (each field's own check says what range)."""
    for owner, name, dotted in _leaves(obj):
        value = getattr(owner, name)
        many = isinstance(value, (list, tuple))
        what = f"{dotted} values" if many else dotted
        for v in value if many else [value]:
            _require(
                not isinstance(v, float) or math.isfinite(v),
                f"{what} must be finite, got {v}; give a finite number",
            )


def one_line(message: str) -> str:
    """An OmegaConf error's message as one line, led by the field it names."""
    missing = re.search(r"missing mandatory value: ([\w.]+)", message)
    if missing:
        full = re.search(r"full_key: ([\w.]+)", message)  # data.model, not model
        key = full.group(1) if full else missing.group(1)
        example = "outputs/my-sweep" if key == "sweep_dir" else "..."
        return f"{key} is required: pass {key}={example}"
    lines = [ln.strip() for ln in message.strip().splitlines() if ln.strip()]
    keep = [ln for ln in lines if not ln.startswith(("full_key:", "object_type", "reference_type"))]
    key = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("full_key:")), "")
    head = keep[0] if keep else message
    return f"{key}: {head}" if key and key not in head else head


@dataclass
class HarvestConfig(HarvestSource):
    """``sweep harvest``: activations of ``hooks`` into chunk stores (one forward pass for all)."""

    hooks: list[str] = MISSING
    """transformer_lens hook names; with one hook ``store_dir`` is the store, else ``store_dir/<hook>/``."""
    store_dir: str = MISSING
    """Output folder (resumed when it holds an unfinished harvest with the same values)."""
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    """Ray resources for ``shards`` > 1."""
    progress: bool = True

    def check(self) -> None:
        self.check_source("")
        _require(len(self.hooks) > 0, "hooks is empty: pass hooks='[blocks.2.hook_resid_post]'")
        _require(
            len(set(self.hooks)) == len(self.hooks),
            f"hooks has duplicate names: {list(self.hooks)}",
        )
        _require(bool(self.store_dir), "store_dir is required: pass store_dir=/path/to/store")
        self.launch.check()


def to_harvest_config(cfg: DictConfig) -> HarvestConfig:
    """Convert a composed ``harvest`` DictConfig to a validated :class:`HarvestConfig`."""
    return _to_checked(cfg, HarvestConfig, "harvest", "harvest")
