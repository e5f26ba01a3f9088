"""Train one ensemble on one device. Ray-free: the driver wraps it in a Ray task, tests call
it directly.

The worker restores itself at the top (from its members' checkpoints, or a fresh init), so a
first run, a retry and a resume are the same code path. It streams batches from the chunk
store, steps the ensemble, appends the training curve every ``log_every`` steps (one host
transfer for all members), checkpoints every ``checkpoint_every`` steps and at each chunk
boundary, and finally writes every member's weights, config, metrics and ``DONE``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save

from sweep import crossdict, metrics, rundir, sae
from sweep.activations.store import BatchStream, ChunkStore, Cursor
from sweep.config import LoggerConfig, TrainConfig
from sweep.ensemble import Ensemble, stack
from sweep.errors import SweepError
from sweep.grid import EnsembleSpec, RunSpec
from sweep.logger import RunLogger, make_logger, sweep_logger_config
from sweep.optim import Adam, AdamState

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EnsembleJob:
    """Everything one worker needs (plain, picklable values; never a DictConfig)."""

    ensemble: EnsembleSpec
    sweep_dir: str
    store_path: str
    normalize: bool
    eval_rows: int
    train: TrainConfig
    threads: int = 0
    """Torch CPU threads (0 = leave as is)."""
    extra_spec: dict = field(default_factory=dict)
    """Sweep-level settings recorded in every member's spec.json."""
    placement: dict = field(default_factory=dict)
    """Where this attempt runs (host, Ray node, GPU ids); written to placement.json."""
    logger: LoggerConfig | None = None
    """Experiment tracking; None = the ``logger`` section of SWEEP_DIR/config.yaml, if any."""


@dataclass
class EnsembleResult:
    ensemble_id: str
    states: dict[str, str]
    """run_id -> done | diverged | interrupted."""
    steps: int
    seconds: float


def resolve_device(name: str) -> torch.device:
    """``auto`` -> the (Ray-assigned, via CUDA_VISIBLE_DEVICES) GPU when present, else CPU."""
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise SweepError(
                "train.device=cuda but no CUDA device is visible; use train.device=auto or cpu"
            )
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _compute_dtype(train: TrainConfig, device: torch.device) -> torch.dtype | None:
    if train.dtype == "tf32" and device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    return torch.bfloat16 if train.dtype == "bfloat16" else None


def _init_member(run: RunSpec, train: TrainConfig, b_dec: torch.Tensor) -> sae.Params:
    g = torch.Generator().manual_seed(train.seed * 1_000_003 + run.seed)
    return sae.init_params(run.arch, run.width, run.dict_size, g, b_dec=b_dec)


def _member_tensors(ens: Ensemble, e: int) -> dict[str, torch.Tensor]:
    out = {f"param.{k}": v[e] for k, v in ens.params.items()}
    out.update(ens.state.member(e))
    return out


class _Trainer:
    """State of one ensemble in training (kept small: the loop lives in :func:`train_ensemble`)."""

    def __init__(self, job: EnsembleJob, device: torch.device) -> None:
        self.job, self.device = job, device
        self.runs = job.ensemble.members
        self.dirs = [rundir.run_dir(job.sweep_dir, r.run_id) for r in self.runs]
        self.store = ChunkStore(job.store_path)
        width = self.runs[0].width
        if self.store.width != width:
            raise SweepError(
                f"store {self.store.path} has width {self.store.width} but the runs expect {width}; "
                "use a fresh sweep_dir for a different store"
            )
        self.scale = self.store.scale(job.normalize)
        self.stream = BatchStream(
            self.store,
            job.train.batch_size,
            job.train.seed,
            job.train.epochs,
            job.eval_rows,
            self.scale,
            device,
        )

    def restore(self) -> tuple[Ensemble, Cursor, int]:
        """Members' newest valid checkpoints (all at one cursor), or a fresh init.

        Also sets ``self.diverged_at`` ((E,) step of divergence, -1 for healthy members).
        """
        t = self.job.train
        loaded, notes = rundir.common_checkpoint(self.dirs)
        found: list[rundir.Checkpoint | None] = loaded or [None] * len(self.dirs)
        for note in notes:
            action = f"resumed from step {found[0].step}" if found[0] else "restarted from scratch"
            log.warning("%s: %s; %s", self.job.ensemble.ensemble_id, note, action)
            for d in self.dirs:
                rundir.append_event(
                    d, {"event": "bad_checkpoint", "detail": note, "action": action}
                )
        mean = torch.tensor(self.store.manifest["stats"]["mean"], dtype=torch.float32) * self.scale
        members, states, active = [], [], []
        for run, ckpt in zip(self.runs, found, strict=True):
            if ckpt is None:
                members.append(_init_member(run, t, mean))
                states.append(None)
                active.append(True)
            else:
                members.append(
                    {k[6:]: v for k, v in ckpt.tensors.items() if k.startswith("param.")}
                )
                states.append({k: v for k, v in ckpt.tensors.items() if k.startswith("adam.")})
                active.append(bool(ckpt.meta["active"]))
        diverged = [int(c.meta.get("diverged_step", -1)) if c else -1 for c in found]
        self.diverged_at = torch.tensor(diverged, dtype=torch.long, device=self.device)
        params = {k: v.to(self.device) for k, v in stack(members).items()}
        state = AdamState.stack(states, list(params), self.device) if found[0] is not None else None
        ens = Ensemble(
            params,
            torch.tensor([r.l1 for r in self.runs], device=self.device),
            Adam(t.lr, (t.betas[0], t.betas[1]), t.eps),
            state=state,
            active=torch.tensor(active, device=self.device),
            autocast_dtype=_compute_dtype(t, self.device),
        )
        if found[0] is None:
            for d in self.dirs:
                rundir.truncate_curve(d, 0)  # a restart from scratch rewrites the curve
            return ens, Cursor(), 0
        meta = found[0].meta
        if meta.get("threads") and meta["threads"] != torch.get_num_threads():
            torch.set_num_threads(int(meta["threads"]))  # bit-exact resume needs the same count
        for d, ckpt in zip(self.dirs, found, strict=True):
            rundir.truncate_curve(d, ckpt.step)  # type: ignore[union-attr]
        return ens, Cursor(**meta["cursor"]), found[0].step

    def start(self) -> None:
        for run, d in zip(self.runs, self.dirs, strict=True):
            d.mkdir(parents=True, exist_ok=True)
            (d / rundir.FAILED).unlink(missing_ok=True)  # a retried run is no longer failed
            (d / rundir.INTERRUPTED).unlink(missing_ok=True)
            spec = {**run.as_dict(), "train": asdict(self.job.train), **self.job.extra_spec}
            spec["store"] = str(self.store.path)
            spec["total_steps"] = self.stream.total_steps
            rundir.atomic_write_json(d / rundir.SPEC, spec)
            placement = {
                **self.job.placement,
                "device": str(self.device),
                "threads": torch.get_num_threads(),
            }
            rundir.atomic_write_json(d / rundir.PLACEMENT, {**placement, "time": time.time()})

    def checkpoint(self, ens: Ensemble, cursor: Cursor, step: int) -> None:
        active, diverged = ens.active.tolist(), self.diverged_at.tolist()
        for e, d in enumerate(self.dirs):
            meta = {
                "cursor": cursor.as_dict(),
                "threads": torch.get_num_threads(),
                "active": active[e],
                "diverged_step": diverged[e],
            }
            rundir.save_checkpoint(d, rundir.Checkpoint(step, _member_tensors(ens, e), meta))

    def log_curve(self, parts: sae.LossParts, step: int, active: list[bool]) -> None:
        rows = (
            torch.stack([parts.loss, parts.mse, parts.sparsity, parts.l0, parts.fvu]).cpu().tolist()
        )  # (5, E)
        recs: dict[str, dict] = {}
        for e, d in enumerate(self.dirs):
            if active[e]:
                rec = {"step": step, "rows": step * self.job.train.batch_size}
                rec.update(
                    zip(("loss", "mse", "l1", "l0", "fvu"), (r[e] for r in rows), strict=True)
                )
                rundir.append_curve(d, [rec])
                recs[self.runs[e].run_id] = rec
        self.tracker().log(recs)

    def finalize(self, ens: Ensemble, step: int) -> dict[str, str]:
        diverged_at = self.diverged_at.tolist()
        x_eval = self.store.tail_rows(self.job.eval_rows).to(self.device).float() * self.scale
        gt = self.store.ground_truth()
        from sweep import lm_metrics  # LM metrics: harvested stores whose model loads here

        lm_eval = lm_metrics.LMEval.for_store(
            self.store, self.device, self.job.extra_spec.get("data", {}).get("lm_eval_tokens")
        )
        states = {}
        for e, (run, d) in enumerate(zip(self.runs, self.dirs, strict=True)):
            params = {k: v[e].detach().float().cpu() for k, v in ens.params.items()}
            m, freq = metrics.evaluate_with_frequency(
                {k: v.to(self.device) for k, v in params.items()}, x_eval
            )
            crossdict.save_density(d, freq, x_eval.shape[0])
            if gt is not None:
                m.update(metrics.ground_truth_metrics(params, gt))
            m.update(lm_metrics.member_metrics(lm_eval, params, self.cfg_json(run)))
            state = "diverged" if diverged_at[e] >= 0 else "done"
            m.update(
                {"state": state, "steps": step, "rows_trained": step * self.job.train.batch_size}
            )
            if state == "diverged":
                m["diverged_step"] = diverged_at[e]
                rundir.atomic_write_json(d / rundir.DIVERGED, {"step": diverged_at[e]})
            rundir.atomic_write_bytes(d / rundir.WEIGHTS, save(params))
            rundir.atomic_write_json(d / rundir.CFG, self.cfg_json(run))
            rundir.atomic_write_json(d / rundir.METRICS, m)
            rundir.atomic_write_json(d / rundir.DONE, {"state": state, "finished": time.time()})
            rundir.clear_checkpoints(d)
            states[run.run_id] = state
            self.tracker().summary(run.run_id, m)
        self.tracker().close()
        return states

    def tracker(self) -> RunLogger:
        """The experiment logger (made on first use; best-effort, never blocks training)."""
        if getattr(self, "_tracker", None) is None:
            cfg = self.job.logger or sweep_logger_config(self.job.sweep_dir)
            self._tracker = make_logger(cfg, self.job.sweep_dir)
            for run, d in zip(self.runs, self.dirs, strict=True):
                config = {
                    **run.as_dict(),
                    "ensemble_id": self.job.ensemble.ensemble_id,
                    "train": asdict(self.job.train),
                }
                self._tracker.start(run.run_id, d, config)
        return self._tracker

    def cfg_json(self, run: RunSpec) -> dict:
        return {
            "format": "sweep-sae",
            "version": 1,
            "architecture": run.arch,
            "d_in": run.width,
            "d_sae": run.dict_size,
            "act_scale": self.scale,
            "l1": run.l1,
            "dict_ratio": run.dict_ratio,
            "seed": run.seed,
            "run_id": run.run_id,
            "loss": "mean((x_hat - x)**2) + l1 * mean_batch(sum_features(codes))",
            "store": str(self.store.path),
            "provenance": self.store.provenance.get("source_info", {}),
            "dtype": "float32",
        }


def train_ensemble(
    job: EnsembleJob,
    progress: Callable[[int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> EnsembleResult:
    """Train (or continue) one ensemble to the end; returns each member's final state.

    ``progress(rows)`` is called with rows trained since its last call; ``should_stop()``
    is polled every step: when it returns True the worker checkpoints and returns with
    every member ``interrupted``.
    """
    t0 = time.perf_counter()
    if job.threads > 0:
        torch.set_num_threads(job.threads)
    device = resolve_device(job.train.device)
    tr = _Trainer(job, device)
    tr.start()
    ens, start, step = tr.restore()
    t, bs = job.train, job.train.batch_size
    reported, total = step, tr.stream.total_steps
    for cursor, x in tr.stream.batches(start):
        logging_step = (step + 1) % t.log_every == 0
        was_active = ens.active.clone()
        parts = ens.step(
            x, full=logging_step, lr_scale=t.lr_scale(step, total), l1_scale=t.l1_scale(step, total)
        )
        step += 1
        tr.diverged_at = torch.where(was_active & ~ens.active, step, tr.diverged_at)
        if logging_step:
            tr.log_curve(parts, step, ens.active.tolist())
            if progress:
                progress((step - reported) * bs)
                reported = step
        if step % t.checkpoint_every == 0 or cursor.batch == 0:
            tr.checkpoint(ens, cursor, step)
        if should_stop is not None and should_stop():
            tr.checkpoint(ens, cursor, step)
            for d in tr.dirs:  # tells a stopping driver this ensemble's state is safe on disk
                rundir.atomic_write_json(
                    d / rundir.INTERRUPTED, {"step": step, "time": time.time()}
                )
            tr.tracker().close()
            return EnsembleResult(
                job.ensemble.ensemble_id,
                dict.fromkeys(_ids(tr), "interrupted"),
                step,
                time.perf_counter() - t0,
            )
    if progress and step > reported:
        progress((step - reported) * bs)
    states = tr.finalize(ens, step)
    return EnsembleResult(job.ensemble.ensemble_id, states, step, time.perf_counter() - t0)


def _ids(tr: _Trainer) -> list[str]:
    return [r.run_id for r in tr.runs]


def run_state(folder: Path) -> str:
    """done | diverged | failed | partial | pending, from what the run folder holds."""
    if rundir.is_done(folder):
        return rundir.read_json(folder / rundir.DONE).get("state", "done")
    if (folder / rundir.FAILED).is_file():
        return "failed"
    if rundir.list_checkpoints(folder):
        return "partial"
    return "pending"
