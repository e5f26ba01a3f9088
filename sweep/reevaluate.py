"""Finished runs that lost only ``metrics.json`` are evaluated again from their weights.

``DONE`` vouches for a finished run's weights and ``cfg.json`` by checksum; when those verify
and only the metrics are missing or damaged (deleted by hand, a disk fault), training the run
again would take as long as the first time. The planner gives such runs ensembles of their
own; their worker loads each member's final weights and evaluates them as training would have
(:func:`sweep.finalize.finish_members`), writing the metrics, the feature density and ``DONE``
again — never the weights or ``cfg.json`` (:meth:`sweep.rundir.RunFolder.finish_again`).
``sweep evaluate`` does the same to every finished run it is given (metrics of a newer sweep,
say). A run's previous metrics are recorded in its events before anything is written.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from sweep.ensemble import Ensemble, hyper_of, stack
from sweep.finalize import finish_members
from sweep.optim import Adam
from sweep.rundir import DONE

if TYPE_CHECKING:
    from sweep.worker import _Attempt as Attempt

log = logging.getLogger(__name__)


def to_evaluate(at: Attempt) -> list[int] | None:
    """The members to evaluate from their final weights, not train: every verified one in a
    ``sweep evaluate`` ensemble, else :func:`lost_members`."""
    return verified_members(at) if at.job.ensemble.evaluate == "all" else lost_members(at)


def lost_members(at: Attempt) -> list[int] | None:
    """The members that lost only their metrics (their indices) when every other member is
    final — ``[]`` when all are (a retry after every result was written); None when any
    must be trained. Each member's weights are hashed once."""
    lost = []
    for i, folder in enumerate(at.folders):
        if not (folder.path / DONE).is_file():
            return None
        problem = folder.final_problem(deep=True)
        if folder.evaluated_for(problem):
            lost.append(i)
        elif problem is not None:
            return None
    return lost


def verified_members(at: Attempt) -> list[int]:
    """The members of a ``sweep evaluate`` ensemble whose final files still pass the cheap
    checks (the driver hashed their weights just before; one damaged since is warned about
    and left as it is)."""
    out = []
    for i, (run, folder) in enumerate(zip(at.runs, at.folders, strict=True)):
        problem = folder.unevaluable(deep=False)
        if problem is None:
            out.append(i)
        else:
            log.warning("run %s: %s; not evaluated", run.run_id, problem)
    return out


def evaluate_again(at: Attempt, members: list[int]) -> dict[str, str]:
    """Evaluate ``members`` from their final weights and write their metrics again (for the
    ensemble's ``evaluate`` reason); returns run_id -> done | diverged."""
    runs, folders = [at.runs[i] for i in members], [at.folders[i] for i in members]
    asked = at.job.ensemble.evaluate == "all"
    why = "as asked" if asked else "(their metrics.json was lost)"
    log.info(
        "ensemble %s: evaluating %s again from their weights %s",
        at.job.ensemble.ensemble_id, ", ".join(r.run_id for r in runs), why,
    )  # fmt: skip
    ens = _final_ensemble(at, members)
    diverged = [f.evaluated_step() for f in folders]
    return finish_members(
        ens, tuple(runs), folders, at.stream.total_steps, [-1 if d is None else d for d in diverged],
        at.eval_setting(), at.tracker(), at.timings,
        again="sweep evaluate" if asked else "metrics.json lost",
    )  # fmt: skip


def _final_ensemble(at: Attempt, members: list[int]) -> Ensemble:
    """Those members' final weights (parameters and the architecture's buffers) as an
    ensemble on the attempt's device (nothing to train: no optimiser state)."""
    saved = [at.folders[i].weights() for i in members]
    names = set(at.arch.buffers)
    params = stack([{k: v for k, v in w.items() if k not in names} for w in saved])
    device, t, runs = at.device, at.job.train, [at.runs[i] for i in members]
    ens = Ensemble(
        {k: v.to(device) for k, v in params.items()},
        hyper_of([r.l1 for r in runs], [r.k for r in runs], device),
        Adam(t.lr, (t.betas[0], t.betas[1]), t.eps),
        arch=at.arch,
    )
    if names:
        buffers = stack([{k: w[k] for k in names} for w in saved])
        ens.buffers = {k: v.to(device) for k, v in buffers.items()}
    ens.release_training_state()  # (its fresh Adam moments)
    return ens
