"""Finish an ensemble: evaluate every member on the store's held-out rows and write each
run folder's final files (weights, ``cfg.json``, metrics, feature density, ``DONE``)."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from safetensors.torch import save

from sweep import archs, lm_metrics, metrics, sae
from sweep.activations.store import ChunkStore
from sweep.devices import release_device_memory
from sweep.ensemble import Ensemble
from sweep.errors import StoreError, first_line
from sweep.grid import RunSpec
from sweep.logger import RunLogger
from sweep.rundir import FinalResult, RunFolder

log = logging.getLogger(__name__)


@dataclass
class EvalSetting:
    """Where and on what the members are judged."""

    store: ChunkStore
    scale: float
    """The store's activation scale (training space = raw x scale)."""
    device: torch.device
    eval_rows: int
    batch_size: int
    lm_eval_tokens: int | None = None
    """Tokens for LM metrics on harvested stores (None = the store's default)."""


def density_bytes(freq_F: torch.Tensor, eval_rows: int) -> bytes:
    """``feature_density.safetensors`` content for a run."""
    return save(metrics.density_tensors(freq_F), metadata={"eval_rows": str(eval_rows)})


DEAD_DICTIONARY = 0.99
"""A dictionary is reported as dead when at least this fraction of its features never fire,
or when it leaves at least this fraction of the variance unexplained (FVU)."""
WORSE_THAN_MEAN = 1.1
"""A dictionary whose FVU is above this reconstructs the held-out rows worse than their mean
does (a dead one, which keeps only ``b_dec`` near the mean, stays near 1): training went wrong,
as a too-high learning rate makes it do without a loss that is ever infinite."""


def health_note(
    m: dict, arch: str = "untied", l1: float | None = None, lr_axis: bool = False
) -> str:
    """What a reader of the metrics must know: frozen weights of a diverged run, a dictionary
    that reconstructs worse than the mean, one whose features (nearly) all died ("" when there
    is nothing to say); with the fix that fits architecture ``arch`` and the run's ``l1``
    (``lr_axis``: its learning rate is a ``grid.lr`` value, which a lower one is)."""
    note = _health(m, arch, l1)
    return note.replace("lower train.lr", "lower its grid.lr value") if lr_axis else note


def _health(m: dict, arch: str, l1: float | None) -> str:
    if "diverged_step" in m:
        return (
            f"diverged at step {m['diverged_step']} (loss or gradient not finite); the weights "
            "and metrics are those frozen before it"
        )
    dead, fvu, l0 = m.get("dead_fraction", 0.0), m.get("fvu", 0.0), m.get("l0", 0)
    penalised = archs.get(arch).knob == "l1" and bool(l1)
    if fvu > WORSE_THAN_MEAN:
        fix = (  # (its output is about b_dec, off the mean: a lower lr leaves it further off)
            "almost no latent fires: l1 is too strong here; lower l1"
            if penalised and l0 < 1
            else "training went wrong; lower train.lr"
        )
        return (
            f"reconstructs worse than the held-out rows' mean (FVU {fvu:.3g}, L0 {l0:.3g}): {fix}"
        )
    if dead >= DEAD_DICTIONARY or fvu >= DEAD_DICTIONARY:
        died, what = f"{100 * dead:.0f}% of features dead", "dead dictionary"
        if dead < DEAD_DICTIONARY and l0 < 1:  # (most fire, but on almost no row)
            died = f"almost no latent fires: {died}, the others rarely"
        elif dead < DEAD_DICTIONARY:  # (its latents fire, to no use)
            what = "useless dictionary"
        return f"{what}: {_explained(fvu)}L0 {l0:.3g}, {died}); {_revive(arch, l1)}"
    return ""


def _revive(arch: str, l1: float | None) -> str:
    """What brings a dead dictionary of architecture ``arch`` (trained at ``l1``) back."""
    a = archs.get(arch)
    if a.knob == "k":  # (k latents fire per row whatever: the step size killed the rest)
        return (
            "lower train.lr; AuxK (train.auxk_alpha > 0) revives latents once silent for "
            "train.dead_tokens rows: lower train.dead_tokens for it to act sooner"
        )
    if l1 == 0:
        return (
            "l1 is 0, so no penalty killed them: train with data.normalize=true if it was off "
            "(the defaults are set for rows of norm sqrt(width)), or lower train.lr"
        )
    # (not "raise the learning rate": synthetic width 16, ratio 8, l1 10-30, 4 epochs of 16k
    # rows: lr 3e-3 left 31-40% of latents dead, 3e-2 66-83%)
    return "lower l1 (its L0 coefficient)" if a.l0_penalty else "lower l1"


def _explained(fvu: float) -> str:
    """The health note's words on the variance explained (FVU is NaN when the rows don't vary)."""
    if math.isnan(fvu):
        return "(no FVU: the held-out rows do not vary; "
    return f"it explains {100 * max(0.0, 1 - fvu):.1f}% of the variance (FVU {fvu:.3g}, "


def _metrics_of_members(
    ens: Ensemble, cfgs: list[dict], x_eval: torch.Tensor, gt: torch.Tensor | None
) -> list[tuple[dict, torch.Tensor]]:
    """Every member judged on the held-out rows in one pass on the ensemble's device
    (:func:`sweep.metrics.evaluate_members`), plus ground-truth recovery there."""
    judged = [
        metrics.Judged(
            _member_tensors(ens, e, x_eval.device),
            c["architecture"],
            int(c.get("k") or 0),
            tuple(c.get("matryoshka_widths", [])[:-1]),  # (its inner levels)
        )
        for e, c in enumerate(cfgs)
    ]
    out = metrics.evaluate_members(judged, x_eval, scale=float(cfgs[0]["act_scale"]))
    if gt is not None:
        gt_dev = gt.to(x_eval.device)
        for (m, _), j in zip(out, judged, strict=True):
            m.update(metrics.ground_truth_metrics(j.params, gt_dev, j.arch))
    return out


def _lm_metrics(
    lm_eval: lm_metrics.LMEval | None,
    skipped: str | None,
    ens: Ensemble,
    cfgs: list[dict],
    device: torch.device,
) -> tuple[list[dict], str | None]:
    """Every member's LM metrics (from views of its weights on ``device``) and why some are
    missing: best-effort, a failure (e.g. out of memory beside the ensemble) is logged with
    its traceback and never costs the finished results; groups done before it are kept."""
    out: list[dict] = [{} for _ in cfgs]
    if lm_eval is None:
        return out, skipped
    params = [_member_tensors(ens, e, device) for e in range(len(cfgs))]
    try:
        for group in lm_metrics.groups_of(params):
            got = lm_metrics.members_metrics(lm_eval, [params[i] for i in group],
                                             [cfgs[i] for i in group])  # fmt: skip
            for i, m in zip(group, got, strict=True):
                out[i] = m
    except Exception as err:  # noqa: BLE001
        log.warning("LM metrics failed; the runs finish without them", exc_info=True)
        skipped = f"LM metrics failed ({type(err).__name__}: {first_line(err)[:300]})"
    if skipped:  # outside the handler: its traceback no longer holds the group's tensors
        release_device_memory()
    return out, skipped


def _member_tensors(ens: Ensemble, e: int, device: torch.device) -> sae.Params:
    """Member ``e``'s parameters and architecture buffers, float32 on ``device``."""
    kept = {**ens.params, **{k: ens.buffers[k] for k in ens.arch.buffers}}
    return {k: v[e].detach().float().to(device) for k, v in kept.items()}


def run_cfgs(
    runs: Sequence[RunSpec], store: ChunkStore, scale: float, arch: archs.Architecture
) -> list[dict]:
    """Each run's ``cfg.json`` (:func:`sweep.sae.run_cfg`), trained on ``store`` at ``scale``."""
    provenance = store.provenance.get("source_info", {})
    return [sae.run_cfg(r, scale, str(store.path), provenance, arch) for r in runs]


def saved_tensors(ens: Ensemble, e: int) -> sae.Params:
    """Member ``e``'s weights as saved: its parameters and its architecture's buffers."""
    return _member_tensors(ens, e, torch.device("cpu"))


def _add_outcome(m: dict, step: int, diverged: int | None, batch_size: int, cfg: dict) -> None:
    """A member's state, steps and rows trained, and its health note, into its metrics."""
    state = "done" if diverged is None else "diverged"
    trained = step if diverged is None else diverged - 1  # (the step that diverged: no update)
    m.update({"state": state, "steps": trained, "rows_trained": trained * batch_size})
    if diverged is not None:
        m["diverged_step"] = diverged
    note = health_note(m, cfg["architecture"], cfg.get("l1"), cfg.get("lr") is not None)
    if note:
        m["note"] = note


def _ground_truth(store: ChunkStore) -> torch.Tensor | None:
    """The store's ground truth; one lost or changed since the store was verified costs the
    ground-truth metrics only (warned about), never the finished results."""
    try:
        return store.ground_truth()
    except StoreError as err:
        log.warning("ground-truth metrics skipped: %s", err)
        return None


def finish_members(
    ens: Ensemble,
    runs: tuple[RunSpec, ...],
    folders: list[RunFolder],
    step: int,
    diverged_at: list[int],
    ev: EvalSetting,
    tracker: RunLogger,
    timings: dict[str, float] | None = None,
    before_final: Callable[[], None] | None = None,
    again: str = "",
) -> dict[str, str]:
    """Evaluate and finalise every member; returns run_id -> done | diverged. ``timings``
    gets ``write``: the seconds spent writing the final files. ``before_final`` is called
    after the evaluation, before the first final file (the worker waits there for the end
    checkpoint it writes meanwhile). ``again``: why finished runs are evaluated again (their
    weights and ``cfg.json`` are kept as they are: :meth:`RunFolder.finish_again`)."""
    x_eval = ev.store.tail_rows(ev.eval_rows).to(ev.device).float() * ev.scale
    gt = _ground_truth(ev.store)
    lm_eval, lm_skipped = lm_metrics.LMEval.prepare(ev.store, ev.device, ev.lm_eval_tokens)
    if lm_skipped:
        log.warning("LM metrics skipped: %s", lm_skipped)
    states, cfgs = {}, run_cfgs(runs, ev.store, ev.scale, ens.arch)
    judged = _metrics_of_members(ens, cfgs, x_eval, gt)
    lm, lm_skipped = _lm_metrics(lm_eval, lm_skipped, ens, cfgs, x_eval.device)
    if before_final is not None:
        before_final()
    for e, (run, folder, cfg) in enumerate(zip(runs, folders, cfgs, strict=True)):
        m, freq = judged[e]
        m.update(lm[e])
        if lm_skipped:
            m["lm_metrics_skipped"] = lm_skipped
            folder.append_event({"event": "lm_metrics_skipped", "reason": lm_skipped})
        diverged = diverged_at[e] if diverged_at[e] >= 0 else None
        _add_outcome(m, step, diverged, ev.batch_size, cfg)
        t0 = time.perf_counter()
        density = density_bytes(freq, x_eval.shape[0])
        if again:
            folder.finish_again(density, m, again)
        else:
            weights = save(saved_tensors(ens, e))
            folder.finish(FinalResult(weights, density, cfg, m, diverged))
        if timings is not None:
            timings["write"] = timings.get("write", 0.0) + time.perf_counter() - t0
        states[run.run_id] = m["state"]
        tracker.summary(run.run_id, m)
    for folder in folders:  # only now: a crash above leaves every member its end checkpoint
        folder.clear_checkpoints()
    tracker.close()
    return states
