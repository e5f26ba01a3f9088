"""The ensemble step as one function for ``torch.compile`` (``train.compile``).

Eager, a fast-path step on a GPU is ~100 kernel launches: five GEMMs, tens of elementwise
passes between them and one Adam launch per member. Here the same math — the hand-batched
gradients of :mod:`sweep.fastpath`, the per-member gradient clip, the freeze of a diverged
member, Adam over the stacked tensors (:func:`adam_stacked`), the decoder constraint and the
buffers' update — is one traced function: the GEMMs stay library calls, inductor fuses the
elementwise work around them, and Adam becomes one pass per parameter for all members with
per-member step counts and skip. The learning-rate and L1 scales enter as tensors, so a
schedule does not recompile it. Under a compute dtype (bf16) the weights' copies in that
dtype are buffers the step refills as it writes the new weights (:func:`refill`; on a GPU in
the same pass: 6-8% of the step at 768 x 24576 on an H200 against a cast at its start), each
the exact cast of the stored weight (tested after every step): a resumed run, whose copies
are cast from its checkpoint's weights, computes what the uninterrupted one did.

On a GPU the compiled step is replayed as CUDA graphs (``train.cuda_graphs``): its kernels
recorded once and launched as one, which is what a small ensemble's step is bound by. The
tensors it updates are marked static (fixed addresses, checked by inductor at every replay);
its outputs live in the graphs' memory until the next step.

Numerically this is the eager step up to rounding (fused passes round differently), so it
is tested against the eager path and the single-member reference within a tolerance. On the
CPU a compiled run resumes bit-exactly (tested); on an H200 (torch 2.11) it did not. The likely
cause, fixed since: a resumed ensemble held its tensors in its checkpoint's order (by name), a
fresh one in its architecture's, so the two traced different graphs, which inductor fuses and
tunes differently on a GPU; now every ensemble holds them by name
(:func:`sweep.optim.by_name`); a resumed CPU worker now hands inductor the very graphs, with
the same inputs' layout, that the uninterrupted one did (tests/test_compiled.py), where before
the fix they differed. Until a GPU confirms it (tests/test_gpu.py,
scripts/diagnose_compile.py), ``train.compile=auto`` leaves the step eager
(:func:`sweep.restore.use_compile`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch

from sweep import fastpath
from sweep.archs import Architecture, Hyper, Params
from sweep.errors import SweepError, first_line, out_of_memory
from sweep.optim import Adam, AdamState
from sweep.sae import LossParts
from sweep.update import adam_stacked, clip_members, track


@dataclass(frozen=True)
class StepSpec:
    """What a compiled step is specialised on (constant for an ensemble's life)."""

    arch: Architecture
    adam: Adam
    kmax: int
    grad_clip: float | None
    auxk: tuple[float, int] | None
    """(alpha, k_aux) when AuxK is on."""
    compute_dtype: torch.dtype | None
    dead_tokens: int | None
    """Rows without firing after which a latent is dead (None: not tracked)."""


def step(
    spec: StepSpec,
    params: Params,
    state: AdamState,
    buffers: Params,
    cast: Params,
    active_E: torch.Tensor,
    x_BD: torch.Tensor,
    hyper: Hyper,
    scales: torch.Tensor,
    dead_EF: torch.Tensor | None,
) -> LossParts:
    """One step of every active member, in place (``scales``: (2,) learning-rate and L1
    factors; ``cast``: the weights in the compute dtype, read and refilled); returns the (E,)
    loss parts."""
    hyper = {**hyper, "l1": hyper["l1"] * scales[1]}
    aux = None
    if spec.auxk is not None and dead_EF is not None:
        aux = fastpath.AuxSpec(spec.auxk[0], spec.auxk[1], dead_EF)
    grads, parts, codes = fastpath.grads(
        spec.arch, params, x_BD, hyper, spec.kmax, aux, True, None, spec.compute_dtype, cast
    )
    active_E &= clip_members(grads, spec.grad_clip) & torch.isfinite(parts.loss)
    lr = (hyper["lr"] if "lr" in hyper else spec.adam.lr) * scales[0]  # (E,) or ()
    for k in params:
        p, m, v = params[k], state.exp_avg[k], state.exp_avg_sq[k]
        adam_stacked(p, grads[k], m, v, state.step[k], active_E, lr, spec.adam)
    spec.arch.constrain(params, active_E)
    refill(cast, params)
    track(spec.arch, buffers, codes, active_E, spec.dead_tokens)
    return parts


def refill(cast: Params, params: Params) -> None:
    """Each weight's copy in the compute dtype, cast again from the weight just written: on
    the GPU in the pass that writes it (6-8% faster at 768 x 24576 on an H200 than a cast at
    the step's start); on the CPU as one foreach copy (inductor's C++ code fails to compile
    a copy_ there, ``KeyError: 'bufN'``: its outer-loop fusion asks where a node that only
    orders after the cast reads it; under torch 2.11 every bf16 step, under 2.13 a smaller
    function: tests/test_compiled.py; the same values either way)."""
    copies = list(cast.values())
    if copies and copies[0].device.type == "cpu":
        torch._foreach_copy_(copies, [params[k] for k in cast])
        return
    for k, w in cast.items():
        w.copy_(params[k])


RECOMPILE_LIMIT = 64
"""Compiled variants of :func:`step` one process may hold (up to two per ensemble: dead
latents known or not yet). Past it dynamo fails instead of silently running the step
uncompiled, which would change a run's numerics mid-way."""


def compile_step(spec: StepSpec, cuda_graphs: bool = False) -> Callable:
    """:func:`step` for ``spec``, compiled as one graph (a graph break fails instead of
    silently splitting it) with static shapes: a variant per dead-latent mask present or not.
    L0 is always computed (fused into a pass over the codes it is nearly free; a variant
    without it would be one more compile, mid-run). ``cuda_graphs``: replayed as CUDA graphs
    (``train.cuda_graphs``), failing rather than running without them; the tensors the step
    updates must be marked static (:meth:`sweep.ensemble.Ensemble.step` does).

    Inductor's deterministic mode is on for this function only: by default inductor picks
    among kernel configurations by timing them on the first call, and configurations sum
    reductions in different orders, so a run resumed on a fresh machine (an empty kernel
    cache) could differ in the last bits from the uninterrupted one. (It did not suffice on
    an H200 with torch 2.11: see the module's docstring.) On the CPU the step is compiled for
    this process's thread count (its C++ kernels split sums by thread), which the worker sets
    before the first step (from the checkpoint, when resuming)."""
    dynamo = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):  # newer and older torch
        if hasattr(dynamo, name):
            setattr(dynamo, name, max(getattr(dynamo, name), RECOMPILE_LIMIT))
    for name in ("fail_on_recompile_limit_hit", "fail_on_cache_limit_hit"):
        if hasattr(dynamo, name):
            setattr(dynamo, name, True)
    # The thread count, an option, is in the key of inductor's cache: under torch 2.11 a
    # CPU step compiled for one count was reused under another (other sums: found session 29)
    wanted = {"deterministic": True, "cpp.threads": torch.get_num_threads()}
    if cuda_graphs:  # partitioned, a graph's unsafe ops would run outside it, silently
        # (and its post-compile path skips cudagraph_or_error: pytorch issue 176611)
        wanted.update(
            {"triton.cudagraphs": True, "triton.cudagraph_or_error": True, "graph_partition": False}
        )
    fn = partial(step, spec)
    return torch.compile(fn, dynamic=False, fullgraph=True, options=_known(wanted))


def _known(options: dict[str, bool]) -> dict[str, bool]:
    """The inductor options this torch has (names differ across versions)."""
    out = {}
    for name, value in options.items():
        where, _, attr = name.rpartition(".")
        cfg = torch._inductor.config
        if where:
            cfg = getattr(cfg, where, None)
        if cfg is not None and hasattr(cfg, attr):
            out[name] = value
    return out


def call(fn: Callable, *args: object, graphs: bool = False) -> LossParts:
    """``fn(*args)`` for a compiled step; a compile failure (or the recompile limit), or with
    ``graphs`` a failure of its CUDA graphs, becomes one line naming the fix. A failed
    compile updated nothing (with one graph, compiling precedes running it), nor did a graph
    that failed to record (captured work does not run). Memory that ran out (also while
    inductor tuned kernels) is not such a failure: it propagates for the worker to name its
    own fix."""
    try:
        return fn(*args)
    except Exception as err:
        if out_of_memory(err) is not None:
            raise
        why = f"{type(err).__name__}: {first_line(err)[:300]}"
        if graphs and _raised_under(err, GRAPHING):
            raise SweepError(
                f"the compiled ensemble step as CUDA graphs failed ({why}); set "
                "train.cuda_graphs=false to run it without graphs, or train.compile=false "
                "to train with the eager step"
            ) from err
        if not (isinstance(err, _compile_errors()) or _raised_under(err, COMPILING)):
            raise
        fix = "train.compile=false to train with the eager step"
        if graphs:
            fix = f"train.cuda_graphs=false to run it without CUDA graphs, or {fix}"
        raise SweepError(f"torch.compile of the ensemble step failed ({why}); set {fix}") from err


def _compile_errors() -> tuple[type[BaseException], ...]:
    """What torch.compile raises when it cannot compile (the recompile limit's error is newer)."""
    exc = torch._dynamo.exc
    limit = getattr(exc, "FailOnRecompileLimitHit", None)
    return (exc.TorchDynamoException, *([limit] if limit else []))


COMPILING = "torch/_dynamo/convert_frame.py"
"""A frame on the compile path only (a compiled step's run never passes it): an error
raised under one is a compile failure whatever its type. Dynamo does not wrap all of its
own failures (torch 2.11 raises a bare AssertionError for a NamedTuple built in the graph)."""


GRAPHING = "torch/_inductor/cudagraph_trees.py"
"""Where inductor records and replays CUDA graphs."""


def _raised_under(err: BaseException, path: str) -> bool:
    """Whether a frame of ``err``'s traceback runs code of the file ``path`` ends with."""
    tb = err.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename.replace("\\", "/").endswith(path):
            return True
        tb = tb.tb_next
    return False


def forget_compiled() -> None:
    """Drop every compiled variant this process holds. A worker calls it before each
    ensemble: Ray reuses a process for many CPU ensembles (a GPU one gets a fresh process),
    and the old variants would count towards :data:`RECOMPILE_LIMIT` (inductor's on-disk
    cache keeps recompiling cheap). Their CUDA graphs go too, and with them the graphs' memory
    pool (held by every compiled variant's cache entry until then)."""
    torch._dynamo.reset()
