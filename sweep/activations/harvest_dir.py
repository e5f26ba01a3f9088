"""What a harvest's ``store_dir`` holds, read and repaired: its settings file and token
stream, whether its stores are complete, chunks torn or lost since they were written, and
the leftovers of writes killed midway. (The harvesting itself is :mod:`.harvest`.)"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from sweep.activations import lm
from sweep.activations.layout import (
    HARVEST_PARAMS,
    chunk_files,
    hook_folder,
    hook_stores,
    store_manifest,
)
from sweep.activations.store import MANIFEST, ChunkStore, chunk_name
from sweep.config import HarvestConfig
from sweep.errors import StoreError, could_not_read
from sweep.io import (
    GONE,
    NPY_DAMAGED,
    atomic_write_json,
    begun,
    ensure_writable,
    flock_held,
    json_dict,
    not_leftover,
    remove_stale_temps,
)

if TYPE_CHECKING:
    from sweep.activations.harvest import HarvestPlan

log = logging.getLogger(__name__)

PARAMS_FILE = HARVEST_PARAMS
TOKENS_FILE = "harvest-tokens.npy"
EVAL_TOKENS_FILE = "lm_eval_tokens.npy"
"""Each store's held-out token contexts for its LM metrics (its manifest's
``provenance.lm_eval`` records the file and, since it is recorded, its sha256)."""
STREAM_FILE = "harvest-stream.json"
"""What the harvest began with beyond its settings: ``tokens_sha256`` (its token stream, so a
damaged one is found and one made again from a changed dataset is refused) and ``randperm``
(how its torch shuffles a group, :func:`sweep.activations.harvest.shuffle_fingerprint`)."""


def stream_record(root: Path) -> dict:
    """:data:`STREAM_FILE`'s contents ({} when missing or damaged; an error reading it is
    raised: rewritten from {}, it would lose the stream's checksum for good)."""
    return json_dict(root / STREAM_FILE, strict=True)


def record_stream(root: Path, **facts: str) -> None:
    atomic_write_json(root / STREAM_FILE, {**stream_record(root), **facts})


def tokens_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()


def store_path(cfg: HarvestConfig, hook: str) -> Path:
    root = Path(cfg.store_dir).expanduser()
    return root if len(cfg.hooks) == 1 else hook_folder(root, hook)


def reopen_damaged(
    cfg: HarvestConfig, plan: HarvestPlan, root: Path, remake: Callable[[], str | None]
) -> bool:
    """Whether a complete harvest lost chunks (missing, truncated, or rewritten with other
    bits: hours of work on a real model that need not be redone). Once the repair can run
    (store_dir writable, the model folder there, and the token stream — on disk, or made again
    by ``remake`` from the text, the very stream recorded; it says why not — else nothing is
    touched), those chunks are removed, so the harvest resumes and writes just them again;
    the manifests stay, and the harvest's finalize holds the new chunks to them."""
    lost = {h: damaged(store_path(cfg, h)) for h in cfg.hooks}
    if not any(lost.values()):
        return False
    ensure_writable(root, "store_dir")
    lm.check_model_folder(cfg.model)
    if not has_tokens(cfg, plan, root) and (why := remake()):
        first = next(p for bad in lost.values() for p in bad.values())
        raise StoreError(
            f"harvest in {root} lost chunks ({first}) and its token stream {TOKENS_FILE}, "
            f"which cannot be made again as it was ({why}), so neither can they; restore "
            "them, or harvest into a new store_dir"
        )
    for hook, bad in lost.items():
        if bad:
            path = store_path(cfg, hook)
            log.warning(
                "harvest store %s has %d damaged chunk(s) (%s); harvesting them again",
                path,
                len(bad),
                next(iter(bad.values())),
            )
            remove_chunks(path, bad)
    return True


def eval_tokens_problem(path: Path) -> str | None:
    """What is wrong with a complete store's LM-eval tokens — missing, unreadable, or other
    bits than its manifest records (a store harvested before that record: readable is
    enough) — or None (also for a store not harvested, or one whose manifest is damaged:
    :class:`ChunkStore` says so)."""
    try:
        lm_eval = json.loads((path / MANIFEST).read_text())["provenance"]["lm_eval"]
        f = path / lm_eval["file"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not npy_readable(f):
        return f"{f.name} is missing or unreadable"
    if lm_eval.get("sha256") and tokens_digest(f) != lm_eval["sha256"]:
        return f"{f.name} holds other bits than the manifest records"
    return None


def npy_readable(path: Path) -> bool:
    try:
        np.load(path, mmap_mode="r", allow_pickle=False)
    except (*NPY_DAMAGED, OSError):
        return False
    return True


def remove_chunks(path: Path, indices: Iterable[int]) -> None:
    for i in indices:
        for part in (path / chunk_name(i), (path / chunk_name(i)).with_suffix(".json")):
            part.unlink(missing_ok=True)


def damaged(path: Path) -> dict[int, str]:
    """Chunks of a complete store that are missing, truncated, or whose stats file records
    other bits than the manifest (harvested again elsewhere): index -> the problem."""
    try:
        store = ChunkStore(path, check_files=False)
    except StoreError:
        return {}  # a damaged manifest: ChunkStore says so, in one line
    bad = store.damaged_chunks()
    for i in range(len(store.chunks)):  # a repair killed before a chunk's stats file
        if i not in bad and _stats(path, i) is None:
            bad[i] = f"{chunk_name(i)}'s stats file is missing or damaged"
    for i, sha in rewritten(path, store.chunks):
        bad.setdefault(i, f"{chunk_name(i)} holds other bits than the manifest records ({sha})")
    return bad


def _stats(path: Path, index: int) -> dict | None:
    """Chunk ``index``'s stats file, or None when it is missing or damaged (another error
    reading it is raised: the chunk may be fine)."""
    try:
        stats = json.loads((path / chunk_name(index)).with_suffix(".json").read_text())
    except (FileNotFoundError, ValueError):
        return None
    return stats if isinstance(stats, dict) else None


def rewritten(path: Path, entries: list[dict]) -> list[tuple[int, str]]:
    """Chunks whose stats file records another sha256 than their manifest entry (both
    recorded; stores written before chunk checksums have none)."""
    out = []
    for i, entry in enumerate(entries):
        sha = (_stats(path, i) or {}).get("sha256")
        if sha is not None and "sha256" in entry and sha != entry["sha256"]:
            out.append((i, sha[:12]))
    return out


class Busy(StoreError):
    """Another harvest holds store_dir (whatever is there is its)."""


@contextmanager
def writing(root: Path) -> Iterator[None]:
    """Hold store_dir (made if needed) for one harvest: another harvest into it (a second
    ``sweep harvest``, or sweeps sharing a ``data.path``) is refused in one line while this
    one runs, rather than both harvesting it and each removing the other's writes. An
    ``fcntl.flock`` of the folder itself, so the kernel releases it when the process dies; a
    file system without flock (some Lustre mounts) is not locked."""
    ensure_writable(root, "store_dir")

    def refuse() -> None:
        raise Busy(
            f"another harvest is writing store_dir {root} now; wait until it ends, then run "
            "this again (it reuses that harvest, or continues it if it was stopped)"
        )

    with flock_held(root, busy=refuse):
        yield


def prepare_dir(cfg: HarvestConfig, root: Path) -> None:
    """Make sure store_dir (checked by :func:`check_dir`) can be written; drop the temp files
    of writes killed midway (no shard runs yet)."""
    ensure_writable(root, "store_dir")
    for folder in [root, *(store_path(cfg, h) for h in cfg.hooks)]:
        if folder.is_dir():
            remove_stale_temps(folder)
            _drop_torn_chunks(folder)


def _drop_torn_chunks(folder: Path) -> None:
    """Chunks of an unfinished harvest whose file no longer reads as a whole array (damaged
    since it was written): removed, so resuming writes them again."""
    for index, f in chunk_files(folder).items():
        try:
            np.load(f, mmap_mode="r", allow_pickle=False)
            if f.with_suffix(".json").exists() and _stats(folder, index) is None:
                raise ValueError("its stats file is damaged")
        except NPY_DAMAGED as err:
            log.warning("chunk %s is truncated or corrupt (%s); harvesting it again", f, err)
            remove_chunks(folder, [index])


def check_dir(cfg: HarvestConfig, params: dict) -> Path:
    """Refuse a store_dir holding something else (reads only)."""
    root = Path(cfg.store_dir).expanduser()
    marker = root / PARAMS_FILE
    if marker.is_file():
        try:
            old = json.loads(marker.read_text())
            if not isinstance(old, dict):
                raise ValueError(f"it holds a {type(old).__name__}, not the settings")
        except OSError as err:  # (proves nothing about the file, nor the chunks beside it)
            raise StoreError(could_not_read(marker, err)) from err
        except ValueError as err:
            raise StoreError(
                f"{marker} is unreadable ({err}); delete store_dir {root} and harvest again"
            ) from err
        diff = sorted(k for k in set(old) | set(params) if old.get(k) != params.get(k))
        if diff:
            shown = "; ".join(f"{k} {_short(old.get(k))} -> {_short(params.get(k))}" for k in diff)
            raise StoreError(
                f"store_dir {root} holds a harvest made with different settings ({shown}); "
                f"{_one_of_its_hooks(root, diff, params)}use the same values to resume it, or "
                "another store_dir"
            )
    elif root.exists() and not root.is_dir():
        raise StoreError(f"store_dir {root} is a file; choose a new folder (or an empty one)")
    elif store_manifest(root):  # (one hook's store of a harvest of several, say)
        raise StoreError(
            f"store_dir {root} is a chunk store, not a harvest's folder; train on it with "
            f"data=chunks data.path={root}, or choose an empty or new folder"
        )
    elif begun(root):
        raise StoreError(
            f"store_dir {root} is a non-empty folder that is not a harvest; choose an empty or new folder"
        )
    return root


def _one_of_its_hooks(root: Path, diff: list[str], params: dict) -> str:
    """Where a harvest of several hooks differs from the one asked for only in its hooks, all
    of them among its own: the store to train on instead (else nothing)."""
    stores, hooks = hook_stores(root), params.get("hooks")
    if diff != ["hooks"] or not isinstance(hooks, list) or not set(hooks) <= set(stores):
        return ""
    path = stores[hooks[0]]
    return f"its store of {hooks[0]} trains as data=chunks data.path={path}; "


def _short(value: object, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


@contextmanager
def removed_if_left_empty(root: Path) -> Iterator[None]:
    """A store_dir made by a harvest that then fails before writing anything (a refused hook,
    too little text) is removed again: a refused command leaves nothing behind."""
    top = None  # the outermost folder it makes (store_dir=a/b/c with no a: a)
    here = root.absolute()
    for folder in (here, *here.parents):
        if folder.exists():
            break
        top = folder
    try:
        yield
    except Busy:
        raise  # (the folder is the other harvest's, even before it writes a file)
    except BaseException:
        if top is not None and top.is_dir() and not _holds_files(top):
            shutil.rmtree(top, ignore_errors=True)
        raise


def _holds_files(folder: Path) -> bool:
    """Whether anything but folders and write leftovers is under ``folder``."""
    return any(not p.is_dir() and not_leftover(p) for p in folder.rglob("*"))


def complete(cfg: HarvestConfig, params: dict) -> bool:
    return all(complete_store(store_path(cfg, h), params) for h in cfg.hooks)


def has_tokens(cfg: HarvestConfig, plan: HarvestPlan, root: Path) -> bool:
    """Whether a resumed harvest's token stream is already on disk (and intact)."""
    intact = stream_intact(cfg, plan, root)
    if intact is False:
        log.warning("token stream %s is damaged; making it again", root / TOKENS_FILE)
    return bool(intact)


def stream_intact(cfg: HarvestConfig, plan: HarvestPlan, root: Path) -> bool | None:
    """Whether the token stream on disk is this harvest's, intact: None where there is none
    (or one of another shape), False where it is damaged."""
    path = root / TOKENS_FILE
    if not (path.is_file() and (root / PARAMS_FILE).is_file()):
        return None
    want = stream_record(root).get("tokens_sha256")
    try:
        shape = np.load(path, mmap_mode="r").shape
        intact = want is None or tokens_digest(path) == want
    except (*NPY_DAMAGED, *GONE):  # (an error reading it is raised)
        return False
    if intact and shape != (plan.n_contexts + plan.eval_contexts, cfg.context):
        return None
    return intact


def complete_store(path: Path, params: dict) -> bool:
    """``path`` holds a manifest of this harvest (a complete store, here being repaired)."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (*GONE, ValueError):  # (an error reading it is raised: no redo)
        return False
    return manifest.get("provenance", {}).get("params") == params
