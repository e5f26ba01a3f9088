"""Harvest activations of transformer_lens hooks into chunk stores (resumable, shardable).

Layout of ``store_dir`` (with one hook it is the store itself; with several, each hook's
store is ``store_dir/<hook>/``)::

    harvest-params.json    values that define the harvest (a resume must use the same)
    harvest-tokens.npy     (contexts + eval contexts, context) int32: the token stream
    manifest.json, chunk_*.npy, chunk_*.json, lm_eval_tokens.npy   (in each store)

Rows are token positions in stream order (context ``c`` gives rows ``[c*rpc, (c+1)*rpc)``,
``rpc`` = positions per context after dropping BOS). Consecutive chunks form shuffle groups
of ``ceil(shuffle_rows / rows_per_chunk)`` chunks: a group's rows are harvested, permuted by
a generator seeded with ``(seed, group)`` and split into its chunks, so a chunk mixes rows of
many contexts and every chunk is defined by the settings alone. That makes a harvest
resumable (groups whose chunks all exist are skipped; a chunk counts only once its stats
sidecar is written, after the chunk itself) and shardable (shards take disjoint runs of
groups, write their own chunks into the same stores, and the manifest merges them). Every
hook of a group uses the same permutation, so row ``i`` of chunk ``k`` is the same token in
every store of one harvest.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sweep import launcher
from sweep.activations import lm, text
from sweep.activations.harvest_dir import (
    EVAL_TOKENS_FILE,
    PARAMS_FILE,
    TOKENS_FILE,
    check_dir,
    complete,
    complete_store,
    damaged,
    eval_tokens_problem,
    has_tokens,
    prepare_dir,
    record_stream,
    remove_chunks,
    removed_if_left_empty,
    reopen_damaged,
    rewritten,
    store_path,
    stream_intact,
    stream_record,
    writing,
)
from sweep.activations.layout import chunk_files
from sweep.activations.store import MANIFEST, ChunkStore, StoreWriter, write_npy
from sweep.config import HarvestConfig, HarvestSource, LaunchConfig
from sweep.devices import release_device_memory, torch_dtype
from sweep.errors import StoreError, SweepError
from sweep.io import atomic_write, atomic_write_json, check_disk_space
from sweep.progress import progress_bar

log = logging.getLogger(__name__)


# Settings that change what is written (batch size, device and shard count do not).
_DEFINING = (
    "model",
    "dataset",
    "split",
    "text_field",
    "rows",
    "context",
    "prepend_bos",
    "drop_bos",
    "rows_per_chunk",
    "dtype",
    "shuffle_rows",
    "seed",
    "model_dtype",
    "lm_eval_tokens",
)


@dataclass(frozen=True)
class HarvestPlan:
    """Where every row, chunk and shuffle group of a harvest comes from."""

    rows: int
    context: int
    prepend_bos: bool
    drop_bos: bool
    rows_per_chunk: int
    chunks_per_group: int
    eval_contexts: int

    @classmethod
    def of(cls, cfg: HarvestSource) -> HarvestPlan:
        per_group = max(1, math.ceil(cfg.shuffle_rows / cfg.rows_per_chunk))
        n_eval = math.ceil(cfg.lm_eval_tokens / cfg.context)
        return cls(
            cfg.rows,
            cfg.context,
            cfg.prepend_bos,
            cfg.drop_bos,
            cfg.rows_per_chunk,
            per_group,
            n_eval,
        )

    @property
    def first(self) -> int:
        """First stored position of a context (1 when the BOS position is dropped)."""
        return int(self.prepend_bos and self.drop_bos)

    @property
    def rows_per_context(self) -> int:
        return self.context - self.first

    @property
    def body(self) -> int:
        """Stream tokens per context (the context minus a prepended BOS)."""
        return self.context - int(self.prepend_bos)

    @property
    def n_contexts(self) -> int:
        return math.ceil(self.rows / self.rows_per_context)

    @property
    def n_chunks(self) -> int:
        return math.ceil(self.rows / self.rows_per_chunk)

    @property
    def n_groups(self) -> int:
        return math.ceil(self.n_chunks / self.chunks_per_group)

    def group_chunks(self, g: int) -> range:
        return range(g * self.chunks_per_group, min((g + 1) * self.chunks_per_group, self.n_chunks))

    def group_rows(self, g: int) -> tuple[int, int]:
        c = self.group_chunks(g)
        return c.start * self.rows_per_chunk, min(c.stop * self.rows_per_chunk, self.rows)

    def contexts_of(self, r0: int, r1: int) -> tuple[int, int]:
        """Contexts holding rows ``[r0, r1)``."""
        return r0 // self.rows_per_context, -(-r1 // self.rows_per_context)

    def shard_groups(self, shard: int, n_shards: int) -> range:
        return range(shard * self.n_groups // n_shards, (shard + 1) * self.n_groups // n_shards)


@dataclass
class ShardResult:
    """What one shard did (returned by Ray tasks to the driver)."""

    groups: tuple[int, int]
    widths: dict[str, int]
    rows_written: int = 0
    forward_s: float = 0.0
    write_s: float = 0.0
    tokens: int = 0


def harvest_params(cfg: HarvestConfig) -> dict:
    """The values that define a harvest (recorded in harvest-params.json and the manifest)."""
    params = {k: getattr(cfg, k) for k in _DEFINING}
    params["model"] = _model_ref(cfg)
    local = text.is_local(cfg.dataset)  # absolute even once removed (tokens need it no more)
    params["dataset"] = str(Path(cfg.dataset).expanduser().resolve()) if local else cfg.dataset
    params["hooks"] = list(cfg.hooks)
    return params


def run_harvest(
    cfg: HarvestConfig, model: Any = None, in_process: bool = True
) -> dict[str, ChunkStore]:
    """Harvest (or finish harvesting) ``cfg.hooks`` into their stores; returns them by hook.

    ``model``: an already built bridge (its tokenizer is used); default loads ``cfg.model``.
    A harvest already complete with the same settings is returned without loading anything.
    ``in_process=False``: even one shard harvests in a Ray task (its process, and the CUDA
    context it made, end with it).
    """
    return harvest_with_stats(cfg, model, in_process)[0]


def harvest_with_stats(
    cfg: HarvestConfig, model: Any = None, in_process: bool = True
) -> tuple[dict[str, ChunkStore], list[ShardResult]]:
    """:func:`run_harvest`, also returning what each shard did (timings; [] if already complete)."""
    cfg = _absolute(cfg)
    params = harvest_params(cfg)
    root = check_dir(cfg, params)
    plan = HarvestPlan.of(cfg)
    if _intact(cfg, params):  # read-only is fine
        _mend_eval_tokens(cfg, plan, root)
        log.info("harvest in %s is complete; reusing it", root)
        return {h: ChunkStore(store_path(cfg, h)) for h in cfg.hooks}, []
    with removed_if_left_empty(root), writing(root):
        check_dir(cfg, params)  # (the settings of a harvest that ended since the first check)
        remake = lambda: _remade_stream(cfg, plan, root)  # noqa: E731
        if complete(cfg, params) and not reopen_damaged(cfg, plan, root, remake):
            _mend_eval_tokens(cfg, plan, root, locked=True)
            log.info("harvest in %s was completed by another harvest; reusing it", root)
            return {h: ChunkStore(store_path(cfg, h)) for h in cfg.hooks}, []
        prepare_dir(cfg, root)
        there = sum(len(chunk_files(store_path(cfg, h))) for h in cfg.hooks)
        if there:
            total = plan.n_chunks * len(cfg.hooks)
            log.info("continuing the harvest in %s: %d of %d chunks are there", root, there, total)
        results = _harvest(cfg, plan, params, root, model, in_process)
        _log_timing(results)
        return _finalize(cfg, plan, params, results), results


def _intact(cfg: HarvestConfig, params: dict) -> bool:
    """Whether store_dir holds this harvest, complete, no chunk lost or changed (reads only)."""
    return complete(cfg, params) and not any(damaged(store_path(cfg, h)) for h in cfg.hooks)


def _mend_eval_tokens(
    cfg: HarvestConfig, plan: HarvestPlan, root: Path, locked: bool = False
) -> None:
    """A complete harvest's LM-eval tokens changed or lost since are written again from its
    token stream (store_dir writable, the stream intact; ``locked``: the caller holds
    store_dir), else warned of: its chunks are fine, and sweeps on it skip the LM metrics,
    with the reason."""
    bad = {h: p for h in cfg.hooks if (p := eval_tokens_problem(store_path(cfg, h)))}
    if not bad:
        return
    hook, problem = next(iter(bad.items()))
    folders = [root, *(store_path(cfg, h) for h in bad)]
    if stream_intact(cfg, plan, root) is not True or not all(
        os.access(f, os.W_OK) for f in folders
    ):
        log.warning(
            "harvest store %s: its LM-eval tokens %s, and %s holds no intact token stream %s to "
            "write them again from, or is read-only: sweeps on it skip their LM metrics",
            store_path(cfg, hook),
            problem,
            root,
            TOKENS_FILE,
        )
        return
    with nullcontext() if locked else writing(root):
        tokens = _eval_tokens(root, plan)
        for hook, problem in bad.items():
            log.warning(
                "harvest store %s: its LM-eval tokens %s; writing them again",
                store_path(cfg, hook),
                problem,
            )
            atomic_write(store_path(cfg, hook) / EVAL_TOKENS_FILE, lambda f: write_npy(f, tokens))


def _eval_tokens(root: Path, plan: HarvestPlan) -> np.ndarray:
    """The LM-eval tokens: the token stream's contexts after the harvested ones."""
    return np.ascontiguousarray(np.load(root / TOKENS_FILE, mmap_mode="r")[plan.n_contexts :])


def _harvest(
    cfg: HarvestConfig, plan: HarvestPlan, params: dict, root: Path, model: Any, in_process: bool
) -> list[ShardResult]:
    """Check the hooks, write the token stream (once), harvest every group not complete."""
    docs = (
        None
        if has_tokens(cfg, plan, root)
        else text.iter_documents(cfg.dataset, cfg.split, cfg.text_field)
    )
    if model is not None or (cfg.shards == 1 and in_process):
        loaded = model is None
        model = model if not loaded else lm.load_model(cfg.model, cfg.device, cfg.model_dtype)
        check_model(model, cfg)  # before the token stream fixes the harvest's settings
        # the model's own tokenizer, as shards use (the bridge's copy may have added tokens)
        tokenizer = _tokenizer(cfg, docs) if loaded else model.tokenizer
        _token_stream(cfg, plan, root, params, docs, tokenizer)
        results = [harvest_shard(cfg, plan, range(plan.n_groups), model)]
        if loaded:  # a sweep's driver harvests, then trains: its model must leave the GPU
            del model
            release_device_memory()
    else:
        if docs is not None:  # a new harvest: its hooks are checked before settings are fixed
            _run_tasks(cfg, lambda _gpus: {0: (cfg,)}, _check_task)
        _token_stream(cfg, plan, root, params, docs, _tokenizer(cfg, docs))
        results = _run_shards(cfg, plan)
    return results


def _model_ref(cfg: HarvestConfig) -> str:
    """:func:`lm.model_ref`, also for a relative model folder (no ``./``) since removed: the
    harvest in store_dir recorded it as an absolute path, which its name alone cannot tell."""
    ref = lm.model_ref(cfg.model)
    gone = str(Path(cfg.model).expanduser().resolve())
    if ref != cfg.model or ref == gone:
        return ref
    try:
        recorded = json.loads((Path(cfg.store_dir).expanduser() / PARAMS_FILE).read_text())
    except (OSError, ValueError):
        return ref
    return gone if isinstance(recorded, dict) and recorded.get("model") == gone else ref


def _tokenizer(cfg: HarvestConfig, docs: Iterator[str] | None) -> Any:
    """The tokenizer saved with ``cfg.model`` (None when the token stream is already written).

    Not the bridge's copy: transformer_lens gives a tokenizer without BOS or EOS an added
    ``<|endoftext|>`` token, so tokens would depend on whether one shard or several harvest.
    """
    return lm.load_tokenizer(cfg.model) if docs is not None else None


def _absolute(cfg: HarvestConfig) -> HarvestConfig:
    """``cfg`` with its store_dir and a local model as absolute paths (shard tasks may run in
    another working directory, on another node of a shared filesystem)."""
    return replace(
        cfg,
        store_dir=str(Path(cfg.store_dir).expanduser().absolute()),
        model=_model_ref(cfg),
    )


def _token_stream(
    cfg: HarvestConfig,
    plan: HarvestPlan,
    root: Path,
    params: dict,
    docs: Iterator[str] | None,
    tokenizer: Any,
) -> None:
    """Write the token stream (harvest + eval contexts); ``docs`` None: it is already there."""
    if docs is None:
        return
    tokens = _contexts(cfg, plan, docs, tokenizer)
    atomic_write_json(root / PARAMS_FILE, params)
    _recorded_shuffle(root, shuffle_fingerprint(plan))
    digest = write_npy(_Discard(), tokens)  # (the file's sha256, before it is written)
    _check_same_stream(cfg, root, digest)
    atomic_write(root / TOKENS_FILE, lambda f: write_npy(f, tokens))
    record_stream(root, tokens_sha256=digest)


def _contexts(
    cfg: HarvestConfig, plan: HarvestPlan, docs: Iterator[str], tokenizer: Any
) -> np.ndarray:
    """The token stream's contexts (harvest + eval) from ``docs``; too little text refused."""
    try:
        return text.token_contexts(
            docs, tokenizer, plan.n_contexts + plan.eval_contexts, cfg.context, cfg.prepend_bos
        )
    except text.NotEnoughText as err:
        raise StoreError(_too_short(cfg, plan, err.available_tokens)) from err


def _remade_stream(cfg: HarvestConfig, plan: HarvestPlan, root: Path) -> str | None:
    """A complete harvest's token stream, damaged or lost, made again from its text where
    that gives the very stream the harvest began with (its sha256 recorded): what harvesting
    its lost chunks again needs. None once written; else why it cannot be."""
    want = stream_record(root).get("tokens_sha256")
    if want is None:
        return "no record of it: harvested by an older sweep"
    try:
        docs = text.iter_documents(cfg.dataset, cfg.split, cfg.text_field)
        tokens = _contexts(cfg, plan, docs, _tokenizer(cfg, docs))
    except SweepError as err:
        return str(err).split(";")[0]
    if write_npy(_Discard(), tokens) != want:
        return f"{cfg.dataset} or the tokenizer changed since"
    atomic_write(root / TOKENS_FILE, lambda f: write_npy(f, tokens))
    log.warning("token stream %s made again from %s, as it was", root / TOKENS_FILE, cfg.dataset)
    return None


class _Discard:
    def write(self, data: object) -> None:
        pass


def _check_same_stream(cfg: HarvestConfig, root: Path, digest: str) -> None:
    """A token stream made again (the old one damaged) must be the one the chunks already
    written were harvested from: refused if the dataset (or tokenizer) changed since."""
    want = stream_record(root).get("tokens_sha256")
    if want is None or not any(chunk_files(store_path(cfg, h)) for h in cfg.hooks):
        return
    if digest != want:
        raise StoreError(
            f"the token stream made again from {cfg.dataset} differs from the one the harvest "
            f"in {root} began with (its dataset or tokenizer changed since); restore them, or "
            "harvest into a new store_dir"
        )


def _too_short(cfg: HarvestConfig, plan: HarvestPlan, available: int) -> str:
    if available == 0:
        return f"dataset {cfg.dataset} is empty (no text to tokenise); pass a dataset with text (text_field={cfg.text_field})"
    max_rows = max(0, available // plan.body - plan.eval_contexts) * plan.rows_per_context
    held = f" after lm_eval_tokens={cfg.lm_eval_tokens} held out" if plan.eval_contexts else ""
    return (
        f"rows={cfg.rows} is more than dataset {cfg.dataset} can provide: its {available} tokens give at most "
        f"{max_rows} rows at context={cfg.context}{held}; "
        + (f"lower rows to {max_rows}" if max_rows else "lower lm_eval_tokens")
        + " or use more text"
    )


def check_model(model: Any, cfg: HarvestConfig) -> None:
    """The hooks exist and give a row per token (a forward pass of one dummy context)."""
    lm.check_hooks(model, cfg.hooks, cfg.model)
    n_ctx = getattr(model.cfg, "n_ctx", None)
    if n_ctx is not None and cfg.context > n_ctx:
        raise SweepError(
            f"context={cfg.context} is longer than model {cfg.model} takes ({n_ctx} tokens); "
            f"set context to at most {n_ctx}"
        )
    acts = _probe(model, cfg.context, cfg.hooks)
    _check_per_token(model, cfg, acts)
    size = getattr(torch, cfg.dtype).itemsize
    writes = {store_path(cfg, h): cfg.rows * int(a.shape[-1]) * size for h, a in acts.items()}
    check_disk_space(
        writes, "lower rows, free space, or pass store_dir=<a folder on a larger disk>"
    )


def _probe(model: Any, context: int, hooks: list[str]) -> dict[str, torch.Tensor]:
    """The hooks' activations on one dummy context of ``context`` tokens."""
    device = next(model.parameters()).device
    return lm.capture(model, torch.zeros((1, context), dtype=torch.long, device=device), hooks)


def _check_per_token(model: Any, cfg: HarvestConfig, acts: dict[str, torch.Tensor]) -> None:
    """A hook's rows follow the context length, their width does not: the probe at another
    length refuses a hook whose second dimension only matched the context
    (``hook_pattern``, (batch, head, query, key), with as many heads as positions)."""
    other = cfg.context - 1  # (>= 1: the config refuses a context below 2)
    for h, a in _probe(model, other, cfg.hooks).items():  # (lm.capture checks the rows)
        if a.shape[-1] != acts[h].shape[-1]:
            raise SweepError(
                f"hook '{h}' does not give one row per token (its shape follows the context "
                "otherwise); choose a per-token hook such as blocks.N.hook_resid_post"
            )


def _check_task(cfg: HarvestConfig) -> None:
    check_model(lm.load_model(cfg.model, cfg.device, cfg.model_dtype), cfg)


def harvest_shard(
    cfg: HarvestConfig, plan: HarvestPlan, groups: range, model: Any = None
) -> ShardResult:
    """Harvest the groups in ``groups`` (skipping complete ones); writes overlap the next forward."""
    if model is None:
        model = lm.load_model(cfg.model, cfg.device, cfg.model_dtype)
        lm.check_hooks(model, cfg.hooks, cfg.model)
    device = next(model.parameters()).device
    tokens = np.load(Path(cfg.store_dir).expanduser() / TOKENS_FILE, mmap_mode="r")
    probe = lm.capture(
        model, torch.from_numpy(np.array(tokens[:1], dtype=np.int64)).to(device), cfg.hooks
    )
    res = ShardResult((groups.start, groups.stop), {h: int(a.shape[-1]) for h, a in probe.items()})
    writers = {
        h: StoreWriter(store_path(cfg, h), res.widths[h], cfg.dtype, cfg.rows_per_chunk)
        for h in cfg.hooks
    }
    bar = progress_bar(
        total=len(groups), desc="harvest", unit="group", disable=not cfg.progress, leave=False
    )
    unfinished = {h for h in cfg.hooks if not (store_path(cfg, h) / MANIFEST).exists()}
    otherwise = bool(unfinished) and _shuffles_otherwise(cfg, plan)  # (a finished store's
    # lost chunks are held to its manifest instead: its other chunks are never rewritten)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="harvest-write") as pool:
        pending: Future | None = None
        for g in groups:
            missing = {
                h: [c for c in plan.group_chunks(g) if not w.has_chunk(c)]
                for h, w in writers.items()
            }
            if any(missing.values()) and otherwise:
                whole = list(plan.group_chunks(g))
                missing = {h: whole if h in unfinished else m for h, m in missing.items()}
            if any(missing.values()):
                bufs = _fill_group(cfg, plan, g, model, tokens, res, device)
                if pending is not None:
                    res.write_s += pending.result()
                pending = pool.submit(_write_group, plan, g, writers, bufs, missing)
            bar.update(1)
        if pending is not None:
            res.write_s += pending.result()
    bar.close()
    return res


def _group_seed(seed: int, group: int) -> int:
    return int(np.random.SeedSequence([seed, group]).generate_state(1, dtype=np.uint64)[0] >> 1)


def _group_perm(n: int, seed: int, group: int) -> torch.Tensor:
    """The shuffle of group ``group``'s ``n`` rows: shuffled row j is source row perm[j]."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(_group_seed(seed, group)))


def shuffle_fingerprint(plan: HarvestPlan) -> str:
    """How this torch shuffles a group (``randperm``'s algorithm may change between
    versions): a hash of the first group's permutation under a fixed seed."""
    r0, r1 = plan.group_rows(0)
    return hashlib.sha256(_group_perm(r1 - r0, 0, 0).numpy().tobytes()).hexdigest()[:16]


def _recorded_shuffle(root: Path, mine: str) -> str:
    """The fingerprint of the torch that began this harvest (its ``harvest-stream.json``);
    one that began before it was recorded is taken as this torch's, ``mine`` (and recorded
    now)."""
    recorded = stream_record(root).get("randperm")
    if isinstance(recorded, str):
        return recorded
    record_stream(root, randperm=mine, torch=torch.__version__)
    return mine


def _shuffles_otherwise(cfg: HarvestConfig, plan: HarvestPlan) -> bool:
    """Whether this shard's torch shuffles a group otherwise than the one that began the
    harvest: a group it finds partly written is then written whole again in an unfinished
    store (its missing chunks alone, shuffled otherwise, would repeat some rows and lose
    others)."""
    root, mine = Path(cfg.store_dir).expanduser(), shuffle_fingerprint(plan)
    if _recorded_shuffle(root, mine) == mine:
        return False
    log.warning(
        "torch %s shuffles a harvest group's rows otherwise than the torch that began the "
        "harvest in %s: a group found partly written is harvested again whole",
        torch.__version__, root,
    )  # fmt: skip
    return True


def _fill_group(
    cfg: HarvestConfig,
    plan: HarvestPlan,
    g: int,
    model: Any,
    tokens: np.ndarray,
    res: ShardResult,
    device: torch.device,
) -> dict[str, torch.Tensor]:
    """Group ``g``'s rows of every hook, already in shuffled order: each (n, d) in the store dtype."""
    r0, r1 = plan.group_rows(g)
    n, rpc = r1 - r0, plan.rows_per_context
    perm = _group_perm(n, cfg.seed, g)  # (n,)
    dest = torch.empty_like(perm)
    dest[perm] = torch.arange(n)  # source row i lands at shuffled position dest[i]
    dtype = torch_dtype(cfg.dtype)
    bufs = {h: torch.empty(n, res.widths[h], dtype=dtype) for h in cfg.hooks}
    c0, c1 = plan.contexts_of(r0, r1)
    for cb in range(c0, c1, cfg.batch_contexts):
        ce = min(cb + cfg.batch_contexts, c1)
        lo, hi = max(r0, cb * rpc), min(r1, ce * rpc)  # rows of this batch inside the group
        t = time.perf_counter()
        toks = torch.from_numpy(np.array(tokens[cb:ce], dtype=np.int64)).to(device)  # (b, P)
        acts = lm.capture(model, toks, cfg.hooks)
        rows = {}
        for h, a in acts.items():
            a = a[:, plan.first :].reshape(-1, a.shape[-1])  # (b, P, d) -> (b*rpc, d)
            a = a[lo - cb * rpc : hi - cb * rpc]  # (hi-lo, d)
            _check_range(a, dtype, h, cfg)
            rows[h] = a.to(dtype).cpu()
        res.forward_s += time.perf_counter() - t
        res.tokens += toks.numel()
        idx = dest[lo - r0 : hi - r0]
        for h, x in rows.items():
            bufs[h][idx] = x
    return bufs


def _check_range(a: torch.Tensor, dtype: torch.dtype, hook: str, cfg: HarvestConfig) -> None:
    """Refuse activations that are not finite (the model's own overflow: float16 weights
    reach inf where a wider dtype does not) or beyond the store dtype's range (float16's is
    65504: a model's residual stream can reach more), which would be stored as inf. One
    reduction over each batch: the chunk would be refused anyway, but only once its group
    (a million rows) had gone through the model, and naming neither hook nor fix."""
    top = float(a.abs().amax()) if a.numel() else 0.0  # (NaN where any is)
    recorded = f"the harvest in {cfg.store_dir} is recorded with"
    if not math.isfinite(top):
        fix = (
            "harvest with model_dtype=bfloat16 (or float32)"
            if cfg.model_dtype == "float16"
            else "check the model's weights"
        )
        raise StoreError(
            f"{hook} gives {'NaN' if math.isnan(top) else 'inf'} values with model_dtype="
            f"{cfg.model_dtype}: {fix}, into a new store_dir ({recorded} this model_dtype)"
        )
    if dtype == torch.float16 and a.dtype != torch.float16 and top > torch.finfo(dtype).max:
        raise StoreError(
            f"{hook} reaches {top:.4g}, beyond float16's largest value "
            f"{torch.finfo(dtype).max:g}: harvest with dtype=bfloat16 (or float32) into a "
            f"new store_dir ({recorded} float16)"
        )


def _write_group(
    plan: HarvestPlan,
    g: int,
    writers: dict[str, StoreWriter],
    bufs: dict[str, torch.Tensor],
    missing: dict[str, list[int]],
) -> float:
    """Write group ``g``'s missing chunks (each atomically); returns the seconds it took."""
    t = time.perf_counter()
    R = plan.rows_per_chunk
    for h, w in writers.items():
        for k, c in enumerate(plan.group_chunks(g)):
            if c in missing[h]:
                w.write_chunk(c, bufs[h][k * R : (k + 1) * R])  # (<=R, d)
    return time.perf_counter() - t


def _finalize(
    cfg: HarvestConfig, plan: HarvestPlan, params: dict, results: list[ShardResult]
) -> dict[str, ChunkStore]:
    """Check every chunk is there, save the LM-eval tokens, write each store's manifest."""
    root = Path(cfg.store_dir).expanduser()
    eval_tokens = _eval_tokens(root, plan)
    held_out = write_npy(_Discard(), eval_tokens)  # (the file's sha256)
    differ = {}
    for h in cfg.hooks:
        path = store_path(cfg, h)
        writer = StoreWriter(path, results[0].widths[h], cfg.dtype, cfg.rows_per_chunk)
        missing = [c for c in range(plan.n_chunks) if not writer.has_chunk(c)]
        if missing:
            raise StoreError(
                f"harvest into {path} is missing {len(missing)} chunk(s); re-run the same command to finish it"
            )
        if complete_store(path, params):  # repaired: its manifest (identity) stays
            writer.wait()
            if eval_tokens_problem(path):
                atomic_write(path / EVAL_TOKENS_FILE, lambda f: write_npy(f, eval_tokens))
            differ[h] = [
                i for i, _ in rewritten(path, json.loads((path / MANIFEST).read_text())["chunks"])
            ]
            remove_chunks(path, differ[h])  # the store as it was before the repair
            continue
        atomic_write(path / EVAL_TOKENS_FILE, lambda f: write_npy(f, eval_tokens))
        writer.finalize(plan.n_chunks, provenance(cfg, plan, params, h, results, held_out))
        log.info("harvested %s: %d rows of width %d into %s", h, cfg.rows, writer.width, path)
    bad = {h: ids for h, ids in differ.items() if ids}
    if bad:
        where = "; ".join(
            f"{store_path(cfg, h)}: {', '.join(map(str, ids[:5]))}" for h, ids in bad.items()
        )
        raise StoreError(
            f"chunks harvested again differ from the lost ones ({where}); they were removed "
            "again (other hardware or settings: device, model_dtype, batch_contexts?): repair "
            "the store where it was made, or harvest into a new store_dir"
        )
    return {h: ChunkStore(store_path(cfg, h)) for h in cfg.hooks}


def provenance(
    cfg: HarvestConfig,
    plan: HarvestPlan,
    params: dict,
    hook: str,
    results: list[ShardResult],
    held_out_sha256: str,
) -> dict:
    """What the manifest records: source, token ranges, shards, the LM-eval tokens (their
    file's sha256 ``held_out_sha256``), and ``source_info`` for run folders."""
    info = {
        "source": "harvest",
        "model": params["model"],
        "hook": hook,
        "dataset": params["dataset"],
        "split": cfg.split,
        "context": cfg.context,
        "prepend_bos": cfg.prepend_bos,
        "drop_bos": cfg.drop_bos,
        "model_dtype": cfg.model_dtype,
        "dtype": cfg.dtype,
    }
    end = plan.n_contexts * plan.body
    shards = []
    for r in sorted(results, key=lambda r: r.groups):
        if r.groups[1] > r.groups[0]:
            rows = (plan.group_rows(r.groups[0])[0], plan.group_rows(r.groups[1] - 1)[1])
            c0, c1 = plan.contexts_of(*rows)
            shards.append(
                {
                    "groups": list(r.groups),
                    "rows": list(rows),
                    "token_range": [c0 * plan.body, c1 * plan.body],
                }
            )
    return {
        **info,
        "params": params,
        "rows_per_context": plan.rows_per_context,
        "contexts": plan.n_contexts,
        "token_range": [0, end],
        "shuffle": {"chunks_per_group": plan.chunks_per_group, "seed": cfg.seed},
        "shards": shards,
        "lm_eval": {
            "file": EVAL_TOKENS_FILE,
            "sha256": held_out_sha256,
            "contexts": plan.eval_contexts,
            "token_range": [end, end + plan.eval_contexts * plan.body],
        },
        "source_info": info,
    }


def _log_timing(results: list[ShardResult]) -> None:
    fwd, wr = sum(r.forward_s for r in results), sum(r.write_s for r in results)
    toks = sum(r.tokens for r in results)
    if toks:
        log.info(
            "harvest: %d tokens, model forward %.1fs (%.0f tok/s per shard), writing %.1fs (overlapped)",
            toks,
            fwd,
            toks / max(fwd, 1e-9),
            wr,
        )


# ---- shards on Ray -------------------------------------------------------------------


def _shard_task(cfg: HarvestConfig, plan: HarvestPlan, groups: range) -> ShardResult:
    return harvest_shard(cfg, plan, groups)


def _run_shards(cfg: HarvestConfig, plan: HarvestPlan) -> list[ShardResult]:
    """One Ray task per shard (a GPU each when harvesting on CUDA); results in completion order."""
    quiet = replace(cfg, progress=False)

    def jobs(gpus: float) -> dict:
        n = min(cfg.shards or max(1, int(gpus)), plan.n_groups)
        return {s: (quiet, plan, plan.shard_groups(s, n)) for s in range(n)}

    return _run_tasks(cfg, jobs, _shard_task)


def _run_tasks(cfg: HarvestConfig, jobs: Callable[[float], dict], task: Callable) -> list:
    """``task`` on Ray for each job (``jobs``: by key, made from the cluster's GPU count),
    a GPU each when harvesting on CUDA; their values in completion order. A task's bad-input
    error (e.g. a hook the model has no per-token activation for) is raised as it is."""
    import ray

    with launcher.ray_session(cfg.launch):
        gpus = ray.cluster_resources().get("GPU", 0)
        on_gpu = cfg.device == "cuda" or (cfg.device == "auto" and gpus > 0)
        if on_gpu and not gpus:  # Ray would wait forever for a GPU
            raise StoreError(
                "device=cuda but the Ray cluster has no GPUs; harvest with device=cpu, or on "
                "a cluster whose nodes have GPUs"
            )
        cpus = cfg.launch.cpus_per_ensemble or 1
        refs = launcher.submit(task, jobs(gpus), cpus, 1 if on_gpu else 0, cfg.launch.max_retries)
        done = list(launcher.drain(refs))
    refused = [f.cause for f in done if isinstance(f.cause, SweepError)]
    if refused:
        raise refused[0]
    failures = [f.error for f in done if f.error is not None]
    if failures:
        raise SweepError(
            f"{len(failures)} harvest task(s) failed ({failures[0]}); re-run the same command to continue"
        )
    return [f.value for f in done]


# ---- data=harvest ---------------------------------------------------------------------


def ensure_harvest_store(
    data: Any,
    path: str | Path,
    launch: LaunchConfig,
    progress: bool = True,
    in_process: bool = True,
) -> ChunkStore:
    """The store of a ``data=harvest`` sweep: harvested into ``path`` unless already complete
    with the same settings (``in_process=False``: one shard harvests in a Ray task, as
    :func:`run_harvest` says)."""
    cfg = _sweep_harvest(data, path, launch, progress)
    with _named_as_data_path():
        return run_harvest(cfg, in_process=in_process)[data.hook]


def harvested_store(data: Any, path: str | Path, launch: LaunchConfig) -> ChunkStore | None:
    """The complete store a ``data=harvest`` sweep would reuse, or None if it is not harvested
    yet; refused as :func:`ensure_harvest_store` refuses (reads only)."""
    cfg = _sweep_harvest(data, path, launch, progress=False)
    params = harvest_params(cfg)
    with _named_as_data_path():
        check_dir(cfg, params)
    if not complete(cfg, params) or damaged(store_path(cfg, data.hook)):
        return None  # (a run harvests it, or its damaged chunks, first)
    return ChunkStore(store_path(cfg, data.hook))


@contextmanager
def _named_as_data_path() -> Iterator[None]:
    """A sweep's own harvest (``data=harvest``) names the fields its user sets: the folder
    ``data.path`` where ``sweep harvest`` says ``store_dir``, and ``data.model_dtype=...``
    where it says ``model_dtype=...`` (every harvest field given a value)."""
    try:
        yield
    except SweepError as err:
        names = "|".join(f.name for f in fields(HarvestSource))
        said = re.sub(rf"(?<![\w./-])({names})=", r"data.\1=", str(err))  # (not in paths)
        said = said.replace("store_dir", "data.path")
        if said == str(err) or type(err).__init__ is not SweepError.__init__:
            raise
        raise type(err)(said) from err


def _sweep_harvest(
    data: Any, path: str | Path, launch: LaunchConfig, progress: bool
) -> HarvestConfig:
    values = {f.name: getattr(data, f.name) for f in fields(HarvestSource)}
    return HarvestConfig(
        **values, hooks=[data.hook], store_dir=str(path), launch=launch, progress=progress
    )
