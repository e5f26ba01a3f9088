"""Export finished runs in SAELens's on-disk format.

Each run becomes ``OUT_DIR/<run_id>/`` with ``sae_weights.safetensors`` (``W_enc (d_in,
d_sae)``, ``b_enc (d_sae,)``, ``W_dec (d_sae, d_in)``, ``b_dec (d_in,)``, plus ``threshold
(d_sae,)`` for JumpReLU forms) and ``cfg.json`` for a SAELens 6 SAE, so
``sae_lens.SAE.load_from_disk(path)`` opens it. Architectures map to SAELens's as
``Architecture.saelens`` says: untied/tied -> ``standard``, topk -> ``topk`` (with ``k``),
jumprelu -> ``jumprelu``, batchtopk and matryoshka -> ``jumprelu`` with the learned threshold
on every feature (as SAELens itself saves a trained (Matryoshka) BatchTopK SAE for inference),
gated -> ``gated`` (``b_enc`` written as SAELens's ``b_gate``, with ``r_mag`` and ``b_mag``).

SAELens computes ``act((x - b_dec) @ W_enc + b_enc) @ W_dec + b_dec`` on raw activations,
which is our SAE with the training scale folded in (:class:`sweep.sae.SAE`; thresholds act
on pre-activations, which folding leaves unchanged), so ``normalize_activations`` is
``none`` and the codes equal the training codes exactly.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from safetensors.torch import save

from sweep import archs
from sweep.errors import SweepError
from sweep.io import atomic_write_bytes, atomic_write_json, ensure_writable, read_json
from sweep.rundir import DONE, RUNS, RunFolder, RunState, snapshot_problem
from sweep.sae import PER_HEAD_HOOKS, SAE, read_run
from sweep.sweepdir import MANIFEST, REPORT, STORE, RunRecord, SweepFolder, within_sweep

log = logging.getLogger(__name__)

FORMATS = ("saelens",)
SAELENS_WEIGHTS = "sae_weights.safetensors"
SAELENS_CFG = "cfg.json"
EXPORTED_FROM = "sweep"
"""``metadata.exported_from`` of our exports (a folder holding one may be exported into again)."""
SAELENS_FORMAT_VERSION = "6.0.0"
"""The SAELens config format written (6.x: model facts live under ``metadata``)."""


def _provenance(cfg: dict) -> dict:
    """Model / hook facts from the store's provenance (a harvested store's ``source_info``:
    model, hook, dataset, context, prepend_bos), else ``synthetic``."""
    prov = cfg.get("provenance") or {}
    model = prov.get("model_name") or prov.get("model")
    hook = prov.get("hook_name") or prov.get("hook")
    return {
        "model_name": model or "synthetic",
        "hook_name": hook or "synthetic",
        "hook_head_index": prov.get("hook_head_index"),
        "context_size": prov.get("context_size") or prov.get("context"),
        "prepend_bos": prov.get("prepend_bos", True),
        "dataset_path": prov.get("dataset_path") or prov.get("dataset"),
        "model_from_pretrained_kwargs": prov.get("model_from_pretrained_kwargs") or {},
    }


def saelens_cfg(cfg: dict, extra: dict | None = None, origin: dict | None = None) -> dict:
    """SAELens 6 ``cfg.json`` for one of our runs (its sweep ``cfg.json`` in; ``extra``: the
    architecture's own fields, e.g. TopK's ``k``; ``origin``: which sweep trained it,
    :func:`_origin`)."""
    arch = archs.get(cfg.get("architecture", "untied"))
    return {
        "architecture": arch.saelens,
        **(extra or {}),
        "d_in": int(cfg["d_in"]),
        "d_sae": int(cfg["d_sae"]),
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": _reshape(cfg),
        "metadata": {
            "sae_lens_version": SAELENS_FORMAT_VERSION,
            "sae_lens_training_version": None,
            **_provenance(cfg),
            "neuronpedia_id": None,
            "exported_from": EXPORTED_FROM,
            "sweep_run_id": cfg.get("run_id"),
            **_sparsity(arch, cfg),
            "dict_ratio": cfg.get("dict_ratio"),
            "seed": cfg.get("seed"),
            "training_architecture": cfg.get("architecture"),
            **{k: cfg[k] for k in ("matryoshka_widths", "lr") if k in cfg},  # (matryoshka; grid.lr)
            "act_scale_folded": cfg.get("act_scale", 1.0),
            **(origin or {}),
        },
    }


def _reshape(cfg: dict) -> str:
    """``hook_z`` for an SAE of a per-head hook (trained on its (heads x d_head) rows
    flattened): SAELens then flattens the hook's (..., heads, d_head) activations as the
    harvest did, and gives its output back in that shape."""
    hook = _provenance(cfg)["hook_name"]
    return "hook_z" if hook.rsplit(".", 1)[-1] in PER_HEAD_HOOKS else "none"


def _sparsity(arch: archs.Architecture, cfg: dict) -> dict:
    """The run's sparsity setting under SAELens's training-config name: ``k``, or the L0
    (JumpReLU) or L1 coefficient in SAELens's units — its MSE sums over dimensions where ours
    averages, so its coefficient is ours times ``d_in`` — beside ours (``sweep_l1``)."""
    if arch.knob == "k":
        return {"k": cfg.get("k")}
    l1 = cfg.get("l1")
    name = "l0_coefficient" if arch.l0_penalty else "l1_coefficient"
    theirs = None if l1 is None else float(f"{l1 * int(cfg['d_in']):.12g}")  # (not 0.576...01)
    return {name: theirs, "sweep_l1": l1}


def _origin(run_folder: Path) -> dict:
    """Where a run comes from, for the export's metadata: its sweep folder (where it is now;
    ``trained_in`` where it was trained, when the sweep was moved since), the store it was
    trained on and the training seed (runs of two sweeps may share a run id)."""
    spec = RunFolder(run_folder).spec()
    train = spec.get("train") if isinstance(spec.get("train"), dict) else {}
    here, recorded = str(run_folder.resolve().parent.parent), spec.get("sweep_dir")
    moved = isinstance(recorded, str) and bool(recorded) and os.path.realpath(recorded) != here
    return {
        "sweep_dir": here,
        **({"trained_in": recorded} if moved else {}),
        "store_id": spec.get("store_id"),
        "train_seed": train.get("seed"),
    }


def _places(origin: dict) -> set[str]:
    """Where an export's sweep is or was (its metadata's ``sweep_dir`` and ``trained_in``)."""
    return {
        os.path.realpath(p)
        for k in ("sweep_dir", "trained_in")
        if isinstance(p := origin.get(k), str)
    }


def _same_training(meta: dict, origin: dict) -> bool:
    """Whether an earlier export's store and training seed are the run's, where both say (a
    sweep trained later where a moved one was is another sweep)."""
    return all(
        meta.get(k) is None or meta.get(k) == origin.get(k) for k in ("store_id", "train_seed")
    )


def export_run(run_folder: str | Path, out: str | Path) -> Path:
    """Write one finished run folder in SAELens format into ``out`` (created; a previous
    export of the same sweep there is replaced, anything else there is refused)."""
    run_folder = Path(run_folder)
    _check_run(run_folder)
    origin = _origin(run_folder)
    _check_target(Path(out), origin)
    return _write(read_run(run_folder), out, origin)


def _check_run(folder: Path, deep: bool = True) -> None:
    """A run may be exported: finished, intact (``deep``: weights hashed), not diverged."""
    run = RunFolder(folder)
    if not (folder / DONE).is_file():
        raise SweepError(
            f"run {folder.name} is not finished (no DONE in {folder}); let the sweep finish or pick a finished run"
        )
    problem = run.final_problem(deep)
    if problem is not None:
        raise SweepError(f"run {folder.name}: {problem}; {run.fix_for(problem)}")
    if run.state() is RunState.DIVERGED:
        raise SweepError(
            f"run {folder.name} diverged (its weights are frozen at a non-finite loss or gradient); "
            "it is not exported: pick another run"
        )


def _check_target(out: Path, origin: dict) -> None:
    """``out`` may be written: absent, empty, or a previous export of the same sweep (nothing
    else is replaced)."""
    if not out.exists():
        return
    if not out.is_dir():
        raise SweepError(f"export target {out} is a file; choose another OUT_DIR")
    names = {p.name for p in out.iterdir() if not p.name.endswith(".tmp")}
    if not names:
        return
    meta = _export_metadata(out)
    exported = meta.get("exported_from") == EXPORTED_FROM
    foreign = names - {SAELENS_WEIGHTS, SAELENS_CFG} if exported else names
    if foreign:
        raise SweepError(
            f"export target {out} exists and holds files not written by 'sweep export' "
            f"({', '.join(sorted(foreign)[:3])}); choose another OUT_DIR or empty it"
        )
    earlier = _places(meta)  # (none: an export from before they were recorded)
    if earlier and not (earlier & _places(origin) and _same_training(meta, origin)):
        raise SweepError(
            f"export target {out} holds run {out.name} of another sweep ({meta.get('sweep_dir')}); "
            "choose another OUT_DIR (one per sweep) or empty it"
        )


def _export_metadata(out: Path) -> dict:
    """The ``metadata`` of an earlier export's ``cfg.json`` in ``out`` ({} if none is readable)."""
    try:
        meta = read_json(out / SAELENS_CFG).get("metadata")
    except (OSError, ValueError, AttributeError):
        return {}
    return meta if isinstance(meta, dict) else {}


def is_snapshot(out: Path) -> bool:
    """Whether an export folder holds a run's snapshot (``--snapshots``), not its final SAE."""
    return _export_metadata(out).get("snapshot_step") is not None


def _write(model: SAE, out: str | Path, origin: dict) -> Path:
    out = ensure_writable(out, "export folder")
    weights = {
        "W_enc": model.W_enc.detach().float().contiguous(),  # (d_in, d_sae)
        "b_enc": model.b_enc.detach().float().contiguous(),  # (d_sae,)
        "W_dec": model.W_dec.detach().float().contiguous(),  # (d_sae, d_in)
        "b_dec": model.b_dec.detach().float().contiguous(),  # (d_in,)
    }
    saved = {**dict(model.named_buffers()), "b_enc": model.b_enc.detach()}
    tensors, fields = model.arch.saelens_form(saved, model.k)
    weights.update({k: v.contiguous() for k, v in tensors.items()})
    for ours, theirs in model.arch.saelens_renamed.items():  # (Gated's b_enc is its b_gate)
        weights[theirs] = weights.pop(ours)
    # cfg.json first, which marks the folder as an export (one killed midway is replaced by
    # the next). An earlier export of this run keeps its weights until the new ones are
    # whole (a write that fails leaves them as they were); another run's go first, so the
    # folder never pairs this run's cfg.json with them
    if _export_metadata(out).get("sweep_run_id") != model.cfg.get("run_id"):
        (out / SAELENS_WEIGHTS).unlink(missing_ok=True)
    atomic_write_json(out / SAELENS_CFG, saelens_cfg(model.cfg, fields, origin))
    atomic_write_bytes(out / SAELENS_WEIGHTS, save(weights))
    return out


def _finished(
    sweep_dir: str | Path, states: dict, finished_only: bool, notes: dict[str, str]
) -> list[str]:
    """Every done run; unfinished ones are an error unless ``finished_only`` (then a warning,
    with what is wrong with a damaged one: its ``notes`` entry)."""
    chosen = [r for r, s in states.items() if s == "done"]
    diverged = [r for r, s in states.items() if s == "diverged"]
    waiting = [r for r, s in states.items() if not s.final]
    if waiting and (not chosen or not finished_only):
        raise SweepError(_waiting_problem(sweep_dir, states, waiting, notes, len(chosen)))
    if not chosen:
        raise SweepError(f"every run in {sweep_dir} diverged; there is nothing to export")
    for what, ids in (("unfinished", waiting), ("diverged (not exported)", diverged)):
        if ids:
            named = (f"{r} ({notes[r]})" if r in notes else r for r in ids)
            log.warning("skipped %d %s run(s): %s", len(ids), what, ", ".join(named))
    return chosen


def _refuse_unread(records: list[RunRecord], finished_only: bool) -> None:
    """A run a file of which could not be read is neither finished nor damaged: its note
    (what, and to mend the cause) is the error, unless ``finished_only`` (skipped, warned)."""
    unread = [r for r in records if r.unread]
    if unread and not finished_only:
        done = sum(r.state == "done" for r in records)
        rest = f" (or pass --finished to export the {done} finished runs)" if done else ""
        raise SweepError(f"{unread[0].note}{rest}")


def _waiting_problem(
    sweep_dir: str | Path, states: dict, waiting: list[str], notes: dict[str, str], done: int
) -> str:
    """Why runs stop the export: failed ones, else damaged ones (their ``notes``), else
    unfinished ones; and what to do (``--finished`` only where ``done`` runs are finished)."""
    failed = [r for r in waiting if states[r] == "failed"]
    damaged = [r for r in waiting if r in notes and r not in failed]
    ids = failed or damaged or waiting
    if not failed and not damaged and not done:
        return (
            f"{sweep_dir} has no finished runs to export yet ({len(waiting)} of {len(states)} "
            "runs not finished); wait for the sweep, or re-run it, and check 'sweep status'"
        )
    named = [f"{r}: {notes[r]}" if damaged and not failed else r for r in ids[:3]]
    shown = ", ".join(named) + (", ..." if len(ids) > 3 else "")
    what, fix = (
        ("failed", "re-run the sweep to train them again")
        if failed
        else ("are damaged", "re-run the sweep")
        if damaged
        else ("are not finished", "wait for the sweep")
    )
    rest = f", or pass --finished to export the {done} finished runs" if done else ""
    return f"{len(ids)} of {len(states)} runs in {sweep_dir} {what} ({shown}); {fix}{rest}"


def _check_out_dir(name: str | Path) -> None:
    """OUT_DIR is a folder of exports: named (not ""), not a file, not a sweep or a store."""
    if not str(name).strip():  # (Path("") would be the current folder)
        raise SweepError("OUT_DIR is empty; name the folder to export into (e.g. exported/)")
    out_dir = Path(name)
    if out_dir.exists() and not out_dir.is_dir():
        raise SweepError(f"export folder {out_dir} is a file, not a folder; choose another OUT_DIR")
    if (out_dir / MANIFEST).is_file():  # a sweep's or a chunk store's
        raise SweepError(
            f"export folder {out_dir} is a sweep folder or a chunk store; choose another "
            "OUT_DIR (a new folder)"
        )
    within = within_sweep(out_dir)
    if within is not None and within[1] in (RUNS, REPORT, STORE):
        owner, part = within
        raise SweepError(
            f"export folder {out_dir} is inside the {part}/ folder of the sweep {owner}, which "
            f"sweep writes; choose an OUT_DIR outside it (e.g. {owner / 'exported'})"
        )


def export_sweep(
    sweep_dir: str | Path,
    out_dir: str | Path,
    runs: list[str] | None = None,
    to: str = "saelens",
    finished_only: bool = False,
    snapshots: bool = False,
) -> list[Path]:
    """Export chosen runs (default: every run, which must all be finished unless
    ``finished_only``) into ``out_dir/<run_id>/``; diverged runs are skipped, with a warning.
    With ``snapshots``, each exported run's snapshots (``train.snapshots``) too, into
    ``out_dir/<run_id>-step<N>/`` (their metadata's ``snapshot_step`` is N).

    A named run that is unknown or not finished is an error (nothing is written then).
    """
    if to not in FORMATS:
        raise SweepError(f"unknown export format {to!r}; use one of: {', '.join(FORMATS)}")
    _check_out_dir(out_dir)
    folder = SweepFolder(sweep_dir)
    # every run's weights hashed once: here when all are exported (one failing its hash is
    # unfinished), else only the named ones, by _check_run
    records = folder.read_runs(deep=not runs)
    states = {r.run_id: r.state for r in records}
    notes = {r.run_id: r.note for r in records if r.note}
    known = list(states)
    if runs:
        unknown = [r for r in runs if r not in known]
        if unknown:
            raise SweepError(
                f"no run {', '.join(unknown)} in {sweep_dir}; see 'sweep status {sweep_dir}' for run ids"
            )
        chosen = list(dict.fromkeys(runs))  # (a run named twice is exported once)
    else:
        _refuse_unread(records, finished_only)
        chosen = _finished(sweep_dir, states, finished_only, notes)
    todo = []  # (source folder, target, origin): every run and target checked first
    for rid in chosen:
        run = folder.run(rid)
        _check_run(run.path, deep=bool(runs))
        origin = _origin(run.path)
        todo.append((run.path, Path(out_dir) / rid, origin))
        for step, snap in run.snapshots() if snapshots else []:
            if problem := snapshot_problem(snap):
                raise SweepError(f"run {rid}'s snapshot of step {step} ({snap}): {problem}")
            todo.append(
                (snap, Path(out_dir) / f"{rid}-step{step}", {**origin, "snapshot_step": step})
            )
    for _, out, origin in todo:
        _check_target(out, origin)
    for _, out, _ in todo:  # (made, if absent: an empty folder is a target as good)
        ensure_writable(out, "export folder")
    paths = [_write(read_run(source), out, origin) for source, out, origin in todo]
    log.debug("exported %d run(s) to %s", len(paths), out_dir)
    return paths
