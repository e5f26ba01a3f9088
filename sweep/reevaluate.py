"""Finished runs that lost only ``metrics.json`` are evaluated again from their weights.

``DONE`` vouches for a finished run's weights and ``cfg.json`` by checksum; when those verify
and only the metrics are missing or damaged (deleted by hand, a disk fault), training the run
again would take as long as the first time and end in the same weights. The worker instead
loads each member's final weights into an ensemble and finishes it as training would have
(:func:`sweep.finalize.finish_members`: metrics, feature density, ``DONE`` again; the weights
are rewritten with the same bytes).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from sweep.ensemble import Ensemble, hyper_of, stack
from sweep.finalize import finish_members
from sweep.optim import Adam

if TYPE_CHECKING:
    from sweep.worker import _Attempt

log = logging.getLogger(__name__)


def only_metrics_lost(at: _Attempt) -> bool:
    """Every member of the attempt's ensemble lost only its metrics."""
    return all(f.lost_only_metrics() for f in at.folders)


def evaluate_again(at: _Attempt) -> dict[str, str]:
    """Evaluate the members from their final weights and write their final files again;
    returns run_id -> done | diverged."""
    log.info(
        "ensemble %s: only metrics.json was lost; evaluating its runs again from their weights",
        at.job.ensemble.ensemble_id,
    )
    ens = _final_ensemble(at)
    diverged = [f.diverged_step() for f in at.folders]
    steps = [-1 if d is None else d for d in diverged]
    for f in at.folders:
        f.append_event({"event": "evaluated_again", "reason": "metrics.json lost"})
    return finish_members(
        ens, at.runs, at.folders, at.stream.total_steps, steps, at.eval_setting(), at.tracker(),
        at.timings,
    )  # fmt: skip


def _final_ensemble(at: _Attempt) -> Ensemble:
    """The members' final weights (parameters and the architecture's buffers) as an ensemble
    on the attempt's device (nothing to train: no optimiser state)."""
    saved = [f.weights() for f in at.folders]
    names = set(at.arch.buffers)
    params = stack([{k: v for k, v in w.items() if k not in names} for w in saved])
    device, t = at.device, at.job.train
    ens = Ensemble(
        {k: v.to(device) for k, v in params.items()},
        hyper_of([r.l1 for r in at.runs], [r.k for r in at.runs], device),
        Adam(t.lr, (t.betas[0], t.betas[1]), t.eps),
        arch=at.arch,
    )
    if names:
        buffers = stack([{k: w[k] for k in names} for w in saved])
        ens.buffers = {k: v.to(device) for k, v in buffers.items()}
    ens.release_training_state()  # (its fresh Adam moments)
    return ens
