"""Finish an ensemble: evaluate every member on the store's held-out rows and write each
run folder's final files (weights, ``cfg.json``, metrics, feature density, ``DONE``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from safetensors.torch import save

from sweep import lm_metrics, metrics, sae
from sweep.activations.store import ChunkStore
from sweep.ensemble import Ensemble
from sweep.grid import RunSpec
from sweep.logger import RunLogger
from sweep.rundir import FinalResult, RunFolder


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


def health_note(m: dict) -> str:
    """What a reader of the metrics must know: frozen weights of a diverged run, a dictionary
    whose features (nearly) all died ("" when there is nothing to say)."""
    if "diverged_step" in m:
        return (
            f"diverged at step {m['diverged_step']} (loss not finite); the weights and metrics "
            "are those frozen at that step"
        )
    dead, fvu = m.get("dead_fraction", 0.0), m.get("fvu", 0.0)
    if dead >= DEAD_DICTIONARY or fvu >= DEAD_DICTIONARY:
        return (
            f"dead dictionary: it explains {100 * max(0.0, 1 - fvu):.1f}% of the variance "
            f"(FVU {fvu:.3g}, L0 {m.get('l0', 0):.3g}, {100 * dead:.0f}% of features dead); "
            "lower l1 (or raise the learning rate)"
        )
    return ""


def _member_metrics(
    params: sae.Params,
    x_eval: torch.Tensor,
    gt: torch.Tensor | None,
    lm_eval: lm_metrics.LMEval | None,
    cfg: dict,
    device: torch.device,
) -> tuple[dict, torch.Tensor]:
    arch, k = cfg["architecture"], int(cfg.get("k") or 0)
    on_device = {name: v.to(device) for name, v in params.items()}
    m, freq = metrics.evaluate_with_frequency(on_device, x_eval, arch=arch, k=k)
    if gt is not None:
        m.update(metrics.ground_truth_metrics(params, gt, arch))
    m.update(lm_metrics.member_metrics(lm_eval, params, cfg))
    return m, freq


def _saved_tensors(ens: Ensemble, e: int) -> sae.Params:
    """Member ``e``'s weights as saved: its parameters and its architecture's buffers."""
    kept = {**ens.params, **{k: ens.buffers[k] for k in ens.arch.buffers}}
    return {k: v[e].detach().float().cpu() for k, v in kept.items()}


def finish_members(
    ens: Ensemble,
    runs: tuple[RunSpec, ...],
    folders: list[RunFolder],
    step: int,
    diverged_at: list[int],
    ev: EvalSetting,
    tracker: RunLogger,
) -> dict[str, str]:
    """Evaluate and finalise every member; returns run_id -> done | diverged."""
    x_eval = ev.store.tail_rows(ev.eval_rows).to(ev.device).float() * ev.scale
    gt = ev.store.ground_truth()
    lm_eval = lm_metrics.LMEval.for_store(ev.store, ev.device, ev.lm_eval_tokens)
    provenance = ev.store.provenance.get("source_info", {})
    states = {}
    for e, (run, folder) in enumerate(zip(runs, folders, strict=True)):
        params = _saved_tensors(ens, e)
        cfg = sae.run_cfg(run, ev.scale, str(ev.store.path), provenance, ens.arch)
        m, freq = _member_metrics(params, x_eval, gt, lm_eval, cfg, ev.device)
        diverged = diverged_at[e] if diverged_at[e] >= 0 else None
        state = "done" if diverged is None else "diverged"
        trained = step if diverged is None else diverged
        m.update({"state": state, "steps": trained, "rows_trained": trained * ev.batch_size})
        if diverged is not None:
            m["diverged_step"] = diverged
        note = health_note(m)
        if note:
            m["note"] = note
        folder.finish(
            FinalResult(save(params), density_bytes(freq, x_eval.shape[0]), cfg, m, diverged)
        )
        states[run.run_id] = state
        tracker.summary(run.run_id, m)
    for folder in folders:  # only now: a crash above leaves every member its end checkpoint
        folder.clear_checkpoints()
    tracker.close()
    return states
