"""Pure planning: what a sweep still has to train, grouped into ensembles. No Ray.

Planning reads the run folders: final runs (done, diverged) are skipped, the runs of an
ensemble that checkpointed continue, the rest start fresh. It also refuses a config that
would mix incomparable runs in one sweep folder.

Where a run continues from is not decided here: the worker picks the newest step at which
every member of its ensemble has a checkpoint that verifies, and says so loudly when that
is older than a member's newest (:mod:`sweep.restore`). Planning only keeps together what
must stay together: the pending runs of a previous ensemble in which any run has a
checkpoint file form one resumed group (they share one data cursor). Groups are never
merged with each other nor with fresh runs: the worker picks ONE common step, so joining
ensembles whose newest verified steps differ (which file names cannot tell: a newest
checkpoint may be damaged) would drag the newer one back, and a fresh member would force a
restart. No packing is lost: a previous ensemble already fit the member budget. Nor is a
group split when a member lacks a checkpoint (killed before its first save): the worker
restarts them all, loudly, so every run trains in the composition it started in and a
resumed sweep stays bit-identical to an uninterrupted one (on a GPU, in bfloat16 or
compiled, members are equal only up to float order across compositions; in float32 on the
CPU their bits do not depend on it: :func:`composition_is_exact`). Only a member budget
that shrank since splits a group; a part never resumes from an older step than the whole would. A run with checkpoints but no
recorded ensemble (a lost manifest) resumes alone; previous ensembles without any
checkpoint keep their composition too (they start from scratch as they were planned), and
only runs never planned are grouped afresh, by shape.

Ensemble ids are stable for a given sweep state and claim no step: fresh ones are
``r<ratio>-e<k>`` (numbered in grid order); a previous ensemble's pending runs keep its id
(``<id>.<i>`` if now split); a group whose id cannot be kept (runs with checkpoints but no
recorded ensemble, an id finished runs keep, an ambiguous record) is numbered
``r<ratio>-e<k>-resume``.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
import shlex
from collections.abc import Callable, Collection
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NamedTuple

from omegaconf import OmegaConf

from sweep import archs, checkpoints, grid, rundir
from sweep.activations.store import ChunkStore
from sweep.config import ConfigError, SweepConfig, local_ref
from sweep.errors import RunDirError, SweepError
from sweep.grid import EnsembleSpec, RunSpec
from sweep.io import cpu_count, hashing_map, json_number
from sweep.rundir import RunFolder
from sweep.sweepdir import CONFIG, SweepFolder

log = logging.getLogger(__name__)

# Config fields that define what every run trains on: changing one under an existing
# sweep_dir would mix incomparable runs (or make a resumed run a hybrid), so it is refused.
# Every field of these groups is one or the other (a test keeps the lists complete).
DEFINING = {
    "data": None,  # every field of the data group except data.path (a store moved elsewhere)
    "sae": None,
    "train": (
        "batch_size", "lr", "betas", "eps", "epochs", "lr_warmup", "lr_decay", "l1_warmup",
        "seed", "dtype", "dead_tokens", "auxk_alpha", "resample_dead", "resample_stop",
        "grad_clip", "init_seeding",
    ),
}  # fmt: skip
FREE = {
    "data": ("path",),
    # where, how often and how: the math of a step (up to rounding) and the batches are the same
    "train": (
        "device",
        "log_every",
        "checkpoint_minutes",
        "checkpoint_every",
        "snapshots",
        "threads",
        "compile",
        "cuda_graphs",
    ),
}


@dataclass
class SweepPlan:
    runs: list[RunSpec]
    """Every grid point."""
    skipped: list[str]
    """Runs already final (done or diverged)."""
    ensembles: list[EnsembleSpec]
    """What to train, larger dict ratios first."""

    def ensemble_of(self) -> dict[str, str]:
        return {m.run_id: e.ensemble_id for e in self.ensembles for m in e.members}


def _flat(d: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        out.update(_flat(v, key + ".") if isinstance(v, dict) else {key: v})
    return out


LEGACY = {
    "sae.init_decoder_norm": None,
    "sae.levels": None,
    "train.grad_clip": None,
    "train.dead_tokens": 10_000_000,
    "train.auxk_alpha": 0.03125,  # (no TopK-style sweeps existed: AuxK never applied)
    "train.resample_dead": 0,
    "train.resample_stop": 0.5,
    "train.init_seeding": "shared",
}
"""What a defining field meant before it existed, for sweeps recorded by earlier versions."""


LEGACY_RECIPE = {"jumprelu": "log"}
"""The recipe a sweep trained with when its config.yaml names none (recorded before recipes
existed, or for JumpReLU before ``linear``): the architecture's only behaviour then. A config
names its recipe since (:func:`sweep.config.to_sweep_config`), so resuming such a sweep with a
new default is refused with the recipe to pass."""


def legacy_recipe(arch: str) -> str | None:
    recipes = archs.REGISTRY[arch].recipes if arch in archs.REGISTRY else ()
    return LEGACY_RECIPE.get(arch, recipes[0] if recipes else None)


def with_legacy(saved: dict) -> dict:
    """A sweep's saved config with every defining field it lacks set to :data:`LEGACY`, and
    its recipe named."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in saved.items()}
    for key, value in LEGACY.items():
        group, name = key.split(".", 1)
        if isinstance(out.get(group), dict):
            out[group].setdefault(name, value)
    sae = out.get("sae")
    if isinstance(sae, dict):
        name = str(sae.get("name"))
        if sae.get("recipe") is None or not legacy_recipe(name):  # (tied recorded "unit")
            sae["recipe"] = legacy_recipe(name)
    return out


def _inert(config: dict) -> set[str]:
    """Defining fields that do nothing in ``config``: a change to one changes no run (it is
    warned about, :meth:`sweep.config.SweepConfig.inert_note`, and must not lock the sweep)."""
    inert, train = set(), config.get("train", {})
    if _lr_of(config) is not None:
        inert.add("train.lr")  # each run's learning rate is its grid.lr value
    arch = archs.REGISTRY.get(config.get("sae", {}).get("name"))
    topk_style = arch is not None and arch.knob == "k"
    if arch is not None and not topk_style:
        inert.add("train.auxk_alpha")  # AuxK is for TopK-style SAEs
    if topk_style:
        inert.add("train.l1_warmup")  # no L1 coefficient to warm up
    if not train.get("resample_dead"):
        inert.add("train.resample_stop")  # resampling is off
    auxk = topk_style and train.get("auxk_alpha", LEGACY["train.auxk_alpha"]) != 0
    if arch is not None and not auxk and not train.get("resample_dead"):
        inert.add("train.dead_tokens")  # no dead-latent remedy reads it
    return inert


class Difference(NamedTuple):
    """A run-defining field (or a group's choice, e.g. ``sae``) the sweep recorded otherwise."""

    key: str
    before: object
    after: object

    def __str__(self) -> str:
        return f"{self.key} {_as_given(self.before)} -> {_as_given(self.after)}"

    def override(self) -> str:
        """The command-line override that restores the recorded value (quoted for Hydra where
        a text needs it, then for a shell)."""
        return shlex.quote(f"{self.key}={_as_given(self.before, quoted=True)}")


def _as_given(value: object, quoted: bool = False) -> str:
    """A config value as a command line gives it (``null``, ``true``, ``[0.9,0.999]``);
    ``quoted``: a text Hydra would not read back as that text (``my data (v2).txt``,
    ``a,b``, ``true``, ``123``) in Hydra's quotes."""
    if isinstance(value, list):
        return f"[{','.join(_as_given(v, quoted) for v in value)}]"
    if value is None or isinstance(value, bool):
        return "null" if value is None else str(value).lower()
    if quoted and isinstance(value, str) and not _plain_text(value):
        return "'" + value.replace("'", "\\'") + "'"  # (Hydra: a backslash escapes quotes)
    return str(value)


def _plain_text(text: str) -> bool:
    """Whether Hydra reads ``text`` unquoted as this very text."""
    if not re.fullmatch(r"[A-Za-z_/~][\w./~@+-]*", text):
        return False
    return text.lower() not in ("true", "false", "null", "nan", "inf")


def _defining(key: str) -> bool:
    """Whether the field ``key`` (``group.name``) defines the runs (:data:`DEFINING`, less
    :data:`FREE`)."""
    group, name = key.split(".", 1)
    fields = DEFINING[group]
    return (fields is None or name in fields) and name not in FREE.get(group, ())


def _differences(old: dict, new: dict) -> list[Difference]:
    diffs, inert = [], _inert(old) & _inert(new)
    for group in DEFINING:
        a, b = _flat(old.get(group, {}), f"{group}."), _flat(new.get(group, {}), f"{group}.")
        if a.get(f"{group}.name") != b.get(f"{group}.name") and f"{group}.name" in a:
            diffs.append(Difference(group, a[f"{group}.name"], b.get(f"{group}.name")))
            continue  # another choice of the group: its fields differ as a matter of course
        for key in sorted(set(a) | set(b)):
            defining = _defining(key) and key not in inert
            unresolved = key == "train.dtype" and b.get(key) == "auto"  # checked once resolved
            before, after = a.get(key, LEGACY.get(key)), b.get(key)
            if defining and not unresolved and not _same(key, before, after):
                diffs.append(Difference(key, before, after))
    return diffs


def _same(key: str, before: object, after: object) -> bool:
    """Whether a recorded value and another are the same setting: for a local model or
    dataset, the same place (older versions recorded them as given: relative, resolved
    against the working folder; a relative one and the absolute path it was resolved to,
    wherever that was, are the same)."""
    if before == after:
        return True
    if key not in ("data.model", "data.dataset"):
        return False
    if not isinstance(before, str) or not isinstance(after, str) or not before or not after:
        return False
    name = key.split(".")[1]
    if local_ref(name, before) == local_ref(name, after):
        return True
    return _resolved_to(before, after) or _resolved_to(after, before)


def _resolved_to(relative: str, absolute: str) -> bool:
    """Whether ``absolute`` ends with the parts of the relative path ``relative``."""
    rel, full = Path(os.path.normpath(relative)).parts, Path(absolute).parts
    return not os.path.isabs(relative) and os.path.isabs(absolute) and full[-len(rel) :] == rel


def _restoring(diffs: list[Difference], old: dict) -> list[str]:
    """The overrides that restore ``diffs``: another choice of a group (``sae=untied``) comes
    with the recorded fields of that choice that its defaults do not give."""
    out = []
    for d in diffs:
        out.append(d.override())
        recorded = old.get(d.key)
        if d.key in DEFINING and isinstance(recorded, dict):
            out += [o.override() for o in _off_defaults(d.key, recorded)]
    return out


def _off_defaults(group: str, recorded: dict) -> list[Difference]:
    """The run-defining fields of a recorded group choice that differ from its defaults (all
    of them when its defaults cannot be composed: a group file of a ``--config-dir``)."""
    from sweep.cli import compose  # (the CLI's composition, with its config groups)

    try:
        composed = compose(["sweep_dir=/", f"{group}={recorded.get('name')}"])
        defaults = _flat(OmegaConf.to_container(composed[group], resolve=True), f"{group}.")  # type: ignore[arg-type]
    except ConfigError:
        defaults = {}
    out = []
    for key, value in sorted(_flat(recorded, f"{group}.").items()):
        if _defining(key) and key != f"{group}.name" and defaults.get(key, object()) != value:
            out.append(Difference(key, value, defaults.get(key)))
    return out


def check_compatible(folder: SweepFolder, cfg: SweepConfig) -> None:
    """Refuse a config whose run-defining fields differ from the sweep already in ``folder``
    (its config.yaml; when that was deleted, what its started runs recorded), naming the
    overrides that restore them."""
    new: dict = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[assignment]
    saved, old = folder.load_config(), None
    fix = f", or `sweep resume {folder.path}` without overriding those fields"
    if saved is not None:
        old = with_legacy(saved)
        _check_saved(folder, old)
    elif (recorded := folder.first_spec()) is not None:  # config.yaml was deleted
        old, new = _as_config(recorded, new)
        fix = ""
    _check_lr_axis(folder, old, new)
    diffs = [] if old is None else _differences(old, new)
    if diffs:
        restore = " ".join(_restoring(diffs, old))  # type: ignore[arg-type]
        raise RunDirError(
            f"sweep_dir {folder.path} holds a sweep with different settings "
            f"({'; '.join(map(str, diffs))}); use a new sweep_dir or restore those values "
            f"({restore}){fix}"
        )


def _lr_of(config: dict) -> object:
    """A config's ``grid.lr`` (None: no lr axis)."""
    return (config.get("grid") or {}).get("lr")


def _check_lr_axis(folder: SweepFolder, old: dict | None, new: dict) -> None:
    """A sweep keeps the lr axis it was made with (or without): its run ids name their
    learning rate, or do not."""
    if old is None:
        return
    had, has = (_lr_of(c) is not None for c in (old, new))
    if had != has:
        fix = "give grid.lr" if had else "drop grid.lr (every run trains at train.lr)"
        raise RunDirError(
            f"sweep_dir {folder.path} holds a sweep {'with' if had else 'without'} a learning "
            f"rate axis (grid.lr), so its run ids {'name' if had else 'do not name'} one; "
            f"use a new sweep_dir, or {fix}"
        )


def _check_saved(folder: SweepFolder, saved: dict) -> None:
    """Refuse a config.yaml that disagrees with what the sweep's started runs recorded: it was
    edited or damaged (a file cut short reads as an old sweep's, its lost fields as LEGACY)."""
    recorded = folder.first_spec()
    diffs = [] if recorded is None else _differences(*_as_config(recorded, saved))
    had, has = recorded is not None and recorded.get("lr") is not None, _lr_of(saved) is not None
    if recorded is not None and had != has:  # (grid is no defining group: asked apart)
        specs = folder.recorded_specs().values() if had else []
        rates = sorted({sp["lr"] for sp in specs if sp.get("lr") is not None})
        diffs.append(Difference("grid.lr", rates or None, _lr_of(saved)))
    if diffs:
        raise RunDirError(
            f"{folder.path / CONFIG} disagrees with what the sweep's runs recorded (recorded -> "
            f"config.yaml: {'; '.join(map(str, diffs))}): it was edited or damaged; restore it (every run's spec.json "
            "holds the recorded values)"
        )


def _as_config(spec: dict, new: dict) -> tuple[dict, dict]:
    """A run's ``spec.json`` and a config, as the groups :func:`_differences` compares: the
    run's train group, its data group's fields, and its sae group (all of it where the run
    recorded it, else its name and recipe)."""
    sae = spec.get("sae_settings") or {"name": spec.get("sae"), "recipe": spec.get("recipe")}
    old = with_legacy({"data": spec.get("data", {}), "train": spec.get("train", {}), "sae": sae})
    old["grid"] = {"lr": None if spec.get("lr") is None else [spec["lr"]]}  # (axis or not)
    if "sae_settings" not in spec:  # recorded before it: only what the run names is known
        old["sae"] = {k: old["sae"][k] for k in ("name", "recipe")}
    data, new_sae = new.get("data", {}), new.get("sae", {})
    return old, {
        **new,
        "data": {k: data.get(k) for k in old["data"]},
        "sae": {k: new_sae.get(k) for k in old["sae"]},
    }


def recorded_dtype(folder: SweepFolder) -> str | None:
    """The compute dtype the sweep's runs train with: config.yaml's, else (it was deleted) a
    started run's."""
    saved = folder.load_config()
    if saved is not None:
        return saved.get("train", {}).get("dtype")
    return (folder.first_spec() or {}).get("train", {}).get("dtype")


MAX_THREADS_PER_CPU = 8
"""Torch threads per CPU core beyond which a local sweep is refused (more is a typo, e.g.
launch.num_cpus=100000: its threads crash the worker); above 1 it is warned about."""


def check_temp_dir(temp_dir: str | None) -> None:
    """``launch.temp_dir`` can hold Ray's session folder (made now if absent, as Ray would)."""
    if not temp_dir:
        return
    path = Path(temp_dir).absolute()
    try:
        path.mkdir(parents=True, exist_ok=True)
        usable = os.access(path, os.W_OK | os.X_OK)
    except OSError as err:
        raise SweepError(
            f"launch.temp_dir {temp_dir} cannot be used for Ray's session "
            f"({err.strerror or err}); choose a short folder you can write, e.g. /tmp/ray-$USER"
        ) from err
    if not usable:
        raise SweepError(
            f"launch.temp_dir {temp_dir} is not writable; choose a short folder you can write, "
            "e.g. /tmp/ray-$USER"
        )


def _threads_asked(cfg: SweepConfig) -> int:
    """Torch threads per ensemble that settings given (not defaults) ask for, as the launcher
    will set them (on a GPU: train.threads or launch.cpus_per_ensemble or 1); 0 when none
    is given (the default uses the CPUs this process may run on: warned about, if more)."""
    t, lc = cfg.train, cfg.launch
    if not (t.threads or lc.cpus_per_ensemble or lc.num_cpus):
        return 0
    if t.device == "cuda":
        return t.threads or int(lc.cpus_per_ensemble or 1)
    return t.threads or int(lc.cpus_per_ensemble or lc.num_cpus or 1)


def check_local_hardware(cfg: SweepConfig) -> None:
    """``train.device=cuda`` on a local Ray instance needs a GPU here, and its ensembles no
    more CPUs than it has (checked before any work; a cluster's nodes are checked once Ray
    is up, :class:`sweep.launcher.Resources`)."""
    if cfg.launch.address:
        return
    have = cfg.launch.num_cpus or os.cpu_count() or 1  # (Ray counts no more than the OS)
    if cfg.launch.cpus_per_ensemble > have:
        raise SweepError(
            f"launch.cpus_per_ensemble={cfg.launch.cpus_per_ensemble:g} but this machine's Ray "
            f"instance has {have:g} CPUs: ask for less (Ray would wait for such a node forever)"
        )
    threads = _threads_asked(cfg)
    cores = cpu_count()
    if threads > MAX_THREADS_PER_CPU * cores:
        raise SweepError(
            f"each ensemble would run {threads} torch threads on this machine's {cores} CPUs "
            "(from launch.num_cpus, launch.cpus_per_ensemble or train.threads): more than "
            f"{MAX_THREADS_PER_CPU} per CPU trains no faster and can exhaust the system's "
            "threads; leave them unset to use every CPU once"
        )
    if cfg.train.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise SweepError(
                "train.device=cuda but no CUDA device is visible on this machine; use "
                "train.device=auto or cpu (or launch=cluster to train on GPU nodes)"
            )


def _same_settings(store: ChunkStore) -> str:
    """Why a store of the same settings may hold other bits."""
    if store.provenance.get("source") == "synthetic":
        return (
            "same settings, different contents: synthetic data made again on another kind of "
            "CPU or GPU can differ bit-wise"
        )
    return "same settings, different contents"


def _the_other_store(recorded: object, here: Path) -> str:
    """Where the store the runs were trained on is to be found."""
    if isinstance(recorded, str) and Path(recorded).resolve() != here.resolve():
        return f"point data.path at {recorded}"
    return f"put the store they were trained on back at {here}"


def check_recorded_sizes(folder: SweepFolder, ratios: list[float], width: int) -> None:
    """Refuse a dict ratio that gives the dictionary size of another ratio this sweep has
    runs of (planned or started): it would train the same dictionaries again under other
    names, and the report pair them as each other's next ratio."""
    points = folder.manifest().get("runs")
    recorded = [*(points.values() if isinstance(points, dict) else ()),
                *folder.recorded_specs().values()]  # fmt: skip
    sizes: dict[int, set[float]] = {}  # (a sweep before this check may have two ratios)
    for p in recorded:
        ratio, size = (p.get("dict_ratio"), p.get("dict_size")) if isinstance(p, dict) else (0, 0)
        if json_number(ratio) and type(size) is int:
            sizes.setdefault(size, set()).add(float(ratio))
    for r in ratios:
        size = grid.dict_size(r, width)
        if r not in sizes.get(size, {r}):
            use = min(sizes[size])
            raise SweepError(
                f"grid.dict_ratio {r:g} gives dict size {size} at width {width}, as ratio "
                f"{use:g} of this sweep's runs does: it would train them again under other "
                f"names; use {use:g}"
            )


def check_store(folder: SweepFolder, store: ChunkStore) -> None:
    """Refuse a store other than the one the sweep's runs were trained on (by identity, a
    content hash; sweeps recorded before store identities are compared by width only)."""
    recorded = folder.manifest().get("store")
    if isinstance(recorded, dict) and recorded.get("id") not in (None, *store.identities):
        new = store.facts()
        diffs = [
            f"{k} {recorded.get(k)!r} -> {new[k]!r}"
            for k in ("width", "dtype", "total_rows")
            if recorded.get(k) != new[k]
        ]
        old_src, new_src = recorded.get("source", {}), new["source"]
        diffs += [
            f"{k} {old_src.get(k)!r} -> {new_src.get(k)!r}"
            for k in sorted(set(old_src) | set(new_src))
            if old_src.get(k) != new_src.get(k)
        ]
        raise SweepError(
            f"store {store.path} is not the store the runs in {folder.path} were trained on "
            f"({'; '.join(diffs) or _same_settings(store)}); use a new sweep_dir "
            f"for this store, or {_the_other_store(recorded.get('path'), store.path)}"
        )
    if recorded is None:  # the manifest was deleted: what the started runs recorded
        ids = {s.get("store_id") for s in folder.recorded_specs().values()} - {None}
        if ids - store.identities:
            raise SweepError(
                f"store {store.path} is not the store the runs in {folder.path} were trained on "
                f"(their spec.json record store {', '.join(sorted(ids))}, this one is "
                f"{store.identity}); use a new sweep_dir for this store, or point data.path at "
                "the store they name"
            )
    width = folder.recorded_width()
    if width is not None and width != store.width:
        raise SweepError(
            f"store {store.path} has width {store.width} but the runs in {folder.path} were trained on "
            f"width {width}; use a new sweep_dir for this store"
        )


def resume_groups(
    folder: SweepFolder, todo: list[RunSpec], previous: dict[str, str] | None = None
) -> tuple[list[list[RunSpec]], list[list[RunSpec]], list[RunSpec]]:
    """Pending runs grouped as they were planned: one group per previous ensemble in which any
    run has a checkpoint file (all its pending runs: one lacking a checkpoint makes the worker
    restart them together, loudly, in the composition they had); the previous ensembles that
    never checkpointed (they start from scratch, in the composition an uninterrupted sweep
    trains them in); and the runs never planned. No step is chosen here. (``previous``:
    :meth:`SweepFolder.previous_ensembles`, if the caller has it.)"""
    previous = folder.previous_ensembles() if previous is None else previous
    groups: dict[str, list[RunSpec]] = {}
    for r in todo:  # unrecorded runs alone: merging could move one back
        groups.setdefault(previous.get(r.run_id, f"unrecorded:{r.run_id}"), []).append(r)
    resumed: list[list[RunSpec]] = []
    kept: list[list[RunSpec]] = []
    fresh: list[RunSpec] = []
    for key, members in groups.items():
        if any(checkpoints.list_checkpoints(folder.run(r.run_id).path) for r in members):
            resumed.append(members)
        elif not key.startswith("unrecorded:"):
            kept.append(members)
        else:
            fresh += members
    order = {r.run_id: i for i, r in enumerate(todo)}
    return resumed, kept, sorted(fresh, key=lambda r: order[r.run_id])  # grid order


FINAL, EVALUATE, TRAIN = "final", "evaluate", "train"


def verdicts(folder: SweepFolder, runs: list[RunSpec], tidy: bool = True) -> dict[str, str]:
    """Each run's :func:`verdict`, their final files checked on threads first (weights hashed
    unless remembered): a file that could not be read raises before anything is said or
    written of any run."""
    folders = [folder.run(r.run_id) for r in runs]
    problems = hashing_map(lambda run: final_check(run, tidy), folders)
    return {f.run_id: verdict(f, p, tidy) for f, p in zip(folders, problems, strict=True)}


def final_check(run: RunFolder, tidy: bool = True) -> str | None:
    """Why a run's final files cannot be trusted, or None (they verify, or it never finished);
    ``tidy``: a verification found by hashing is remembered (:meth:`RunFolder.final_problem`)."""
    if (run.path / rundir.DONE).is_file():
        return run.final_problem(deep=True, remember=tidy)
    return run.unvouched()


def verdict(run: RunFolder, problem: str | None, tidy: bool = True) -> str:
    """What a run of the grid needs, given its :func:`final_check`: nothing (:data:`FINAL`:
    finished, its results verify), evaluating again from its verified weights
    (:data:`EVALUATE`: it lost only ``metrics.json``), or training (:data:`TRAIN`; a damaged
    finished one is warned about and recorded in its events). ``tidy=False`` writes nothing
    (a preview)."""
    if problem is None:
        if not (run.path / rundir.DONE).is_file():
            return TRAIN  # (never finished)
        if tidy:
            run.clear_checkpoints()  # left when its ensemble stopped while finishing
        return FINAL
    again = EVALUATE if run.evaluated_for(problem) else TRAIN
    said = "evaluating it again from its weights" if again == EVALUATE else "training it again"
    log.warning("run %s: %s; %s", run.run_id, problem, said)
    if tidy:
        action = "evaluate" if again == EVALUATE else "retrain"
        run.append_event({"event": "damaged_result", "detail": problem, "action": action})
    return again


def expand_grid(cfg: SweepConfig, width: int) -> list[RunSpec]:
    """Every grid point of ``cfg`` at this width; a sparsity value that does not fit a
    dictionary size (k larger than the dictionary) is refused, as are dict ratios that give
    no latent or the same dictionary size as another ratio (duplicate runs)."""
    _check_sizes(cfg.grid.dict_ratio, width)
    knob = cfg.sae.knob
    g = cfg.grid
    runs = grid.expand(g.values(knob), g.dict_ratio, g.seeds, width, cfg.sae.name, knob, g.lr)
    arch = cfg.sae.architecture()
    for r in runs:
        problem = arch.check_hyper(r.k if knob == "k" else r.l1, r.dict_size)
        if problem:
            raise SweepError(
                f"{problem} (dict ratio {r.dict_ratio:g} x width {width}); {_fix(knob)}"
            )
        problem = arch.check_levels(r.dict_size)
        if problem:
            raise SweepError(f"{problem} (dict ratio {r.dict_ratio:g} x width {width})")
    return runs


MAX_DICT = 2**31 - 1
"""The most latents a dictionary may have (the largest SAEs trained: ~16M; a tensor dimension
beyond this is out of reach of many kernels)."""


def _check_sizes(ratios: list[float], width: int) -> None:
    """Each dict ratio gives its own dictionary size of at least one latent."""
    seen: dict[int, float] = {}
    for r in ratios:
        if not r * width <= MAX_DICT:  # (inf too)
            raise SweepError(
                f"grid.dict_ratio {r:g} x width {width} gives {r * width:.3g} latents, more "
                f"than {MAX_DICT:,}; use dict ratios <= {MAX_DICT // width:,}"
            )
        size = round(r * width)
        if size < 1:
            raise SweepError(
                f"grid.dict_ratio {r:g} x width {width} rounds to 0 latents; "
                f"use dict ratios >= {1 / width:.3g}"
            )
        if size in seen:
            raise SweepError(
                f"grid.dict_ratio {seen[size]:g} and {r:g} both give dict size {size} at width "
                f"{width}: they would train the same runs twice; drop one"
            )
        seen[size] = r


AUXK_BUFFERS = 4
"""(B, F) buffers AuxK adds: pre-activations, masked copy, auxiliary codes, their gradient."""


def batch_buffers(cfg: SweepConfig, width: int, dict_size: int) -> float:
    """(B, F) buffers per member the runs' step holds at this size: the architecture's, plus
    AuxK's (TopK family, ``train.auxk_alpha`` > 0)."""
    auxk = cfg.sae.knob == "k" and cfg.train.auxk_alpha > 0
    return cfg.sae.architecture().batch_buffers_at(width, dict_size) + (AUXK_BUFFERS if auxk else 0)


def _fix(knob: str) -> str:
    return "lower grid.k or raise grid.dict_ratio" if knob == "k" else f"change grid.{knob}"


def _warn_left_behind(
    folder: SweepFolder,
    groups: list[list[RunSpec]],
    pending: set[str],
    cfg: SweepConfig,
    previous: dict[str, str],
    exact: bool,
) -> None:
    """A resumed ensemble whose unfinished members are no longer in the grid resumes without
    them: say so, and how to keep them together (``previous``: run -> the ensemble it last
    trained in). Unless ``exact`` (:func:`composition_is_exact`) that costs bit-identity."""
    for group in groups:
        ens = previous.get(group[0].run_id)
        gone = sorted(
            rid
            for rid, e in previous.items()
            if e == ens and rid not in pending and not folder.run(rid).is_done()
        )
        if ens is None or not gone:
            continue
        (log.info if exact else log.warning)(
            "runs %s trained as one ensemble with %s, which the grid no longer holds: they "
            "resume without it%s; %s to resume them together",
            ", ".join(r.run_id for r in group),
            ", ".join(gone),
            _cost(exact),
            _put_back(folder, gone[0], cfg),
        )


def _put_back(folder: SweepFolder, run_id: str, cfg: SweepConfig) -> str:
    """What puts ``run_id``'s grid point back into the grid (the setting that dropped it)."""
    spec = folder.manifest().get("runs", {}).get(run_id) or folder.run(run_id).spec()
    knob = cfg.sae.knob
    seed, value = spec.get("seed"), spec.get(knob)
    if isinstance(seed, int) and seed >= cfg.grid.seeds:
        return f"set grid.seeds={seed + 1} or more"
    if value is not None and value not in cfg.grid.values(knob):
        return f"put grid.{knob} value {value:g} back"
    if spec.get("dict_ratio") not in (None, *cfg.grid.dict_ratio):
        return f"put grid.dict_ratio value {spec['dict_ratio']:g} back"
    if spec.get("lr") is not None and spec["lr"] not in (cfg.grid.lr or []):
        return f"put grid.lr value {spec['lr']:g} back"
    return "put its grid point back"


def _cost(exact: bool) -> str:
    """What resuming in another composition costs, as the end of a clause."""
    if exact:
        return ", bit-identical all the same (float32 on the CPU)"
    return " and will not be bit-identical to an uninterrupted sweep"


def composition_is_exact(cfg: SweepConfig, on_gpu: bool) -> bool:
    """Whether a run trains to the same weights whatever ensemble it is in: float32 on the
    CPU with MKL in strict mode (``sweep/__init__.py``; per-member sums, :mod:`sweep.sums`;
    tests/test_archs.py); not on a GPU, in bfloat16 or compiled (their kernels depend on the
    member count), nor with another BLAS or an ``MKL_CBWR`` of the user's without STRICT."""
    import torch

    t = cfg.train
    strict = torch.backends.mkl.is_available() and "STRICT" in os.environ.get("MKL_CBWR", "")
    cpu_fp32 = t.dtype in ("auto", "float32", "tf32") and str(t.compile).lower() != "true"
    return not on_gpu and cpu_fp32 and strict


def _split_loudly(
    parts: list[EnsembleSpec],
    learned: dict[float, int],
    cfg: SweepConfig,
    on_gpu: bool,
    exact: bool,
) -> list[EnsembleSpec]:
    """A resumed ensemble's parts: more than one only when the member budget shrank (a smaller
    device share, a newer memory model, ``grid.max_members``, or a limit learned from an
    out-of-memory ensemble): say so, what it costs (nothing when ``exact``: see
    :func:`composition_is_exact`) and what keeps them together."""
    if len(parts) > 1:
        most = max(len(e.members) for e in parts)
        if parts[0].dict_ratio in learned:
            keep = (
                "the limit was learned when an ensemble of this ratio ran out of GPU memory; "
                "grid.max_members overrides it"
            )
        elif cfg.grid.max_members == most or (not on_gpu and most == grid.CPU_MAX_MEMBERS):
            keep = "a larger grid.max_members keeps them together"
        elif on_gpu:
            keep = "a larger launch.gpus_per_ensemble keeps them together"
        else:
            keep = "a larger launch.device_memory_gb keeps them together"
        (log.info if exact else log.warning)(
            "runs %s trained as one ensemble, but the memory budget now holds at most %d "
            "members: they resume in %d ensembles%s; %s",
            ", ".join(m.run_id for e in parts for m in e.members),
            most,
            len(parts),
            _cost(exact),
            keep,
        )
    return parts


def learned_limits(cfg: SweepConfig, folder: SweepFolder, ratios: set[float]) -> dict[float, int]:
    """The most members per ensemble this sweep learned for each dict ratio when an ensemble
    of it ran out of GPU memory (:meth:`SweepFolder.member_limits`); none when
    ``grid.max_members`` is set (it overrides them)."""
    if cfg.grid.max_members > 0:
        return {}
    learned = {r: n for r, n in folder.member_limits().items() if r in ratios}
    for ratio in sorted(learned, reverse=True):
        log.info(
            "dict ratio %g: at most %d member(s) per ensemble (a larger one ran out of GPU "
            "memory in this sweep; grid.max_members overrides)",
            ratio,
            learned[ratio],
        )
    return learned


def plan(
    cfg: SweepConfig,
    width: int,
    device_bytes: float,
    on_gpu: bool,
    slots: int = 1,
    tidy: bool = True,
) -> SweepPlan:
    """Which runs still need training, grouped into ensembles: each previous ensemble's
    pending runs together (resumed first), the fresh runs by shape — split further while
    fewer ensembles than ``slots`` (ensembles the cluster runs at once) would leave devices
    idle; finished runs that lost only their metrics in ensembles of their own (``-eval``,
    evaluated, not trained). ``tidy=False``: nothing in the sweep folder is touched
    (:func:`verdicts`)."""
    folder = SweepFolder(cfg.sweep_dir)
    runs = expand_grid(cfg, width)
    needs = verdicts(folder, runs, tidy)
    final = [r for r in runs if needs[r.run_id] == FINAL]
    lost = [r for r in runs if needs[r.run_id] == EVALUATE]  # (ensembles of their own)
    todo = [r for r in runs if needs[r.run_id] == TRAIN]
    pending = {r.run_id for r in todo}
    previous = folder.previous_ensembles()
    groups, kept, fresh = resume_groups(folder, todo, previous)
    exact = composition_is_exact(cfg, on_gpu)
    _warn_left_behind(folder, groups, pending, cfg, previous, exact)
    learned = learned_limits(cfg, folder, {r.dict_ratio for r in todo})
    ensembles_of = grouper(cfg, width, device_bytes, on_gpu, learned)

    # ids other recorded runs keep (finished, or out of the grid): never given to another
    # ensemble, or such a run, trained again later, would be grouped with strangers
    taken = {e for rid, e in previous.items() if rid not in pending}
    reserved = taken | set(previous.values())
    split = [_split_loudly(ensembles_of(g), learned, cfg, on_gpu, exact) for g in groups]
    resumed = _as_before(split, previous, taken, reserved)
    planned = _as_before([ensembles_of(g) for g in kept], previous, taken, reserved)
    new = grid.spread(ensembles_of(fresh), slots - len(resumed) - len(planned))
    ensembles = resumed + planned + grid.renumber(new, tag="", taken=reserved)
    evaluated = grid.renumber(ensembles_of(lost), tag="-eval", taken=reserved)
    ensembles += [replace(e, evaluate="lost") for e in evaluated]
    ensembles.sort(key=lambda e: -e.dict_ratio)  # stable: resumed before fresh of a ratio
    return SweepPlan(runs, [r.run_id for r in final], ensembles)


def grouper(
    cfg: SweepConfig, width: int, device_bytes: float, on_gpu: bool, learned: dict[float, int]
) -> Callable[[list[RunSpec]], list[EnsembleSpec]]:
    """Runs -> ensembles by dict ratio, each of at most the members the device's budget holds
    (and at most the ``learned`` limit of its ratio)."""

    def budget(ratio: float) -> int:
        size = grid.dict_size(ratio, width)
        fit = grid.member_budget(
            width,
            size,
            cfg.train.batch_size,
            cfg.train.dtype,
            device_bytes,
            on_gpu,
            cfg.grid.max_members,
            batch_buffers(cfg, width, size),
            _fixed_share(cfg, on_gpu),
        )
        return min(fit, learned.get(ratio, fit))

    def ensembles_of(group: list[RunSpec]) -> list[EnsembleSpec]:
        return grid.group(group, {ratio: budget(ratio) for ratio in {r.dict_ratio for r in group}})

    return ensembles_of


def _fixed_share(cfg: SweepConfig, on_gpu: bool) -> float:
    """The fraction of a GPU ``launch.gpus_per_ensemble`` fixes (1 for auto, whole GPUs, CPUs)."""
    share = cfg.launch.gpus_per_ensemble
    return min(1.0, float(share)) if on_gpu and share != "auto" else 1.0


def _as_before(
    groups: list[list[EnsembleSpec]], previous: dict[str, str], taken: set[str], reserved: set[str]
) -> list[EnsembleSpec]:
    """Each previous ensemble's pending runs (one group: its parts) under the id they trained
    under, ``<id>.<i>`` when the budget now splits them, so one id names one group of runs in
    the logs and spec.json across re-runs. A group whose id is not one plain recorded id, or
    is one other runs keep (``taken``), is numbered afresh with ``-resume``. ``reserved``
    (every recorded id) gains the ids handed out."""
    out, afresh = [], []
    for parts in groups:
        key = previous.get(parts[0].members[0].run_id, "")
        if not key or "#" in key or key in taken:
            afresh += parts
            continue
        ids = [key] if len(parts) == 1 else _free_ids(key, len(parts), reserved)
        out += [replace(p, ensemble_id=i) for p, i in zip(parts, ids, strict=True)]
    out += grid.renumber(afresh, tag="-resume", taken=reserved)
    reserved |= {e.ensemble_id for e in out}
    return out


def _free_ids(base: str, n: int, taken: Collection[str]) -> list[str]:
    """The first ``n`` ids ``<base>.<i>`` not in ``taken``."""
    ids = (f"{base}.{i}" for i in itertools.count())
    return list(itertools.islice((i for i in ids if i not in taken), n))


def halves(ens: EnsembleSpec, taken: Collection[str] = ()) -> list[EnsembleSpec]:
    """``ens`` split in two near-equal ensembles, as a plan capped at half its members would
    group them: for an ensemble that ran out of GPU memory. Their ids are ``<id>.<i>``, the
    first two numbers not in ``taken`` (ids other runs keep or train under)."""
    size = -(-len(ens.members) // 2)
    parts = grid.group(list(ens.members), {ens.dict_ratio: size})
    ids = _free_ids(ens.ensemble_id, len(parts), taken)
    return [
        replace(p, ensemble_id=i, evaluate=ens.evaluate) for p, i in zip(parts, ids, strict=True)
    ]
