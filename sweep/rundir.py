"""One run folder: its file names, its state, and every write to it.

``SWEEP_DIR/runs/<run_id>/`` holds one grid point:

- ``spec.json``        every hyperparameter of the point (written at start)
- ``placement.json``   where the latest attempt trains (host, Ray node, GPU ids, device, time)
- ``metrics.jsonl``    training curve; ``events.jsonl`` things a user should know
- ``checkpoint-<step>.safetensors``  while training (see :mod:`sweep.checkpoints`)
- ``interrupted.json`` the run checkpointed because the sweep was stopped
- ``FAILED``           the run's ensemble failed after its retries (the reason)
- ``sae.safetensors``, ``cfg.json``, ``metrics.json``, ``feature_density.safetensors``,
  ``diverged.json``    final results
- ``DONE``             written last: the folder is final only when it exists
- ``verified.json``    the final weights' file as it was when they last matched ``DONE``'s
  checksum (written by the worker that finished the run or a driver that hashed them): while
  that file is unchanged, they are not hashed again
- ``snapshots/step-<N>/``  ``sae.safetensors`` and ``cfg.json`` as they were after step N
  (``train.snapshots``; ``cfg.json`` written last, with ``snapshot_step`` and the weights'
  ``weights_sha256``)

A run moves through :class:`RunState`::

    pending -> running -> partial (checkpointed) -> interrupted (stopped by a signal)
            -> done | diverged (final) ;  failed (after retries; a re-run trains it again)

``running`` needs a live driver and is decided by :mod:`sweep.sweepdir`; the rest is read
from the folder alone by :meth:`RunFolder.state`.
"""

from __future__ import annotations

import contextlib
import enum
import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from sweep import checkpoints, jsonl
from sweep.errors import MEND, RunDirError, SweepError
from sweep.io import (
    append_text,
    atomic_write_bytes,
    atomic_write_json,
    file_sha256,
    file_stamp,
    flock_held,
    fsync_file,
    json_bytes,
    json_dict,
    read_error,
    read_json,
    remove_stale_temps,
    unreadable,
)

log = logging.getLogger(__name__)

DONE = "DONE"
SPEC = "spec.json"
CFG = "cfg.json"
WEIGHTS = "sae.safetensors"
METRICS = "metrics.json"
CURVE = "metrics.jsonl"
DENSITY = "feature_density.safetensors"
DIVERGED = "diverged.json"
SNAPSHOTS = "snapshots"
SNAPSHOT_SHA256 = "weights_sha256"
"""The key of a snapshot's ``cfg.json`` holding its weights' checksum (:func:`snapshot_problem`)."""
FAILED = "FAILED"
INTERRUPTED = "interrupted.json"
PLACEMENT = "placement.json"
EVENTS = "events.jsonl"
REDONE_EVENTS = ("resampled", "snapshot")
"""Events a training step records (at its ``step``): dropped, with the curve, past the step a
run resumes from, since redoing the step records them again."""
VERIFIED = "verified.json"
TRACKER = "logger.json"
RUNS = "runs"
METRICS_LOST = f"{METRICS} is missing or damaged"
MMCS_RUN = "mmcs_next_ratio_run"
MMCS_KEYS = ("mmcs_next_ratio", MMCS_RUN, "mmcs_seeds")
"""The cross-dictionary values ``sweep report`` writes into finished runs' ``metrics.json``."""
MMCS_OVER = "mmcs_over"
"""Their stamp: :meth:`sweep.sweepdir.SweepFolder.finished_digest` when they were computed.
Once another run finishes they may be wrong (a new next ratio, a new seed), so readers drop
them until the next report."""
MATRIX_RUNS = 24
"""At most this many runs of one dict ratio in its MMCS matrix (``mmcs.csv``, the heatmap):
its pairs grow with the square of the runs (one pair of 8192-atom dictionaries takes ~2 s on
2 CPU cores; 36 runs a ratio were 630 pairs), and a heatmap of more is unreadable. Above it the
matrix covers the first seed's runs, thinned evenly over the knob values; the per-run values
(``mmcs_seeds``, ``mmcs_next_ratio``) are computed for every run whatever this says."""
MEASURES = ("fvu", "l0")
"""Metrics every finished run records."""
TEXT_METRICS = frozenset({"state", "note", "lm_metrics_skipped", MMCS_RUN, MMCS_OVER})
"""The entries of ``metrics.json`` that are text; every other is a number (NaN included:
the FVU of rows that do not vary), or null where there is none (an MMCS of one seed)."""
LOADER_KEYS = frozenset({"architecture", "d_in", "d_sae", "act_scale"})
"""What a final ``cfg.json`` holds for :func:`sweep.sae.load_run` (a run missing one is not final)."""


class RunState(str, enum.Enum):
    """Where a run is in its lifecycle (compares equal to its name as a string)."""

    PENDING = "pending"
    RUNNING = "running"
    PARTIAL = "partial"
    INTERRUPTED = "interrupted"
    DONE = "done"
    DIVERGED = "diverged"
    FAILED = "failed"

    __str__ = str.__str__
    __format__ = str.__format__

    @property
    def final(self) -> bool:
        """Trained to the end (a re-run skips it)."""
        return self in (RunState.DONE, RunState.DIVERGED)

    @property
    def resumable(self) -> bool:
        """Has a checkpoint to continue from."""
        return self in (RunState.PARTIAL, RunState.INTERRUPTED, RunState.RUNNING)


def run_dir(sweep_dir: str | Path, run_id: str) -> Path:
    return Path(sweep_dir) / RUNS / run_id


def snapshot_problem(folder: Path) -> str | None:
    """Why a snapshot folder's weights cannot be trusted (they fail the checksum its
    ``cfg.json`` holds), or None (as well where the folder is no snapshot, or one written
    before snapshots had checksums)."""
    try:
        cfg = json.loads((folder / CFG).read_text())
    except (OSError, ValueError):
        return None  # (not ours to judge here: the loader says what is wrong with it)
    if not isinstance(cfg, dict) or cfg.get("snapshot_step") is None:
        return None
    want = cfg.get(SNAPSHOT_SHA256)
    if not isinstance(want, str):
        return None
    try:
        if file_sha256(folder / WEIGHTS) == want:
            return None
    except OSError as err:
        return f"its {WEIGHTS} cannot be read ({err.strerror or err}); check the folder's files"
    return (
        f"its {WEIGHTS} fails its checksum (damaged since it was written); remove the "
        "snapshot's folder: the run's final weights and its other snapshots do not depend on it"
    )


FINAL_STATES = tuple(s.value for s in RunState if s.final)
"""The states of a run trained to the end (``done``, ``diverged``), as text (summary rows'):
each has a dictionary (a diverged run's: frozen at its last finite step)."""


@dataclass(frozen=True)
class RunFolder:
    """A run folder: reads tolerate missing files; writes are atomic and intent-level."""

    path: Path

    @classmethod
    def of(cls, sweep_dir: str | Path, run_id: str) -> RunFolder:
        return cls(run_dir(sweep_dir, run_id))

    @property
    def run_id(self) -> str:
        return self.path.name

    # ------------------------------------------------------------------------- reads

    def _json(self, name: str, quiet: bool = False, strict: bool = False) -> dict:
        """``name`` as a dict; {} when missing, and (with a warning, unless ``quiet``: the
        caller says what is wrong) when unreadable (``strict``: only when damaged; an error
        reading it is raised)."""
        path = self.path / name
        if not path.is_file():
            return {}
        try:
            value = read_json(path)
        except (OSError, ValueError) as err:
            if strict and unreadable(err):
                raise
            if not quiet:
                _warn_unreadable(path, err)
            return {}
        return value if isinstance(value, dict) else {}

    def is_done(self, deep: bool = False, remember: bool = False) -> bool:
        """``DONE`` is there and what it vouches for is intact (see :meth:`final_problem`)."""
        return (self.path / DONE).is_file() and self.final_problem(deep, remember) is None

    def final_problem(self, deep: bool = False, remember: bool = False) -> str | None:
        """Why this final run can't be trusted, or None. Cheap checks: ``DONE`` and
        ``metrics.json`` parse, the weights have the recorded size; ``deep``: the weights match
        their checksum too (:meth:`_weights_match`; ``remember`` a match found by hashing)."""
        done = self._final_json(DONE)  # (what is wrong is the answer)
        if done.get("state") not in FINAL_STATES:
            return f"{DONE} is damaged"
        weights = self.path / WEIGHTS
        if not weights.is_file():
            return f"{WEIGHTS} is missing"
        if "weights_bytes" in done and weights.stat().st_size != done["weights_bytes"]:
            return f"{WEIGHTS} has {weights.stat().st_size} bytes, {DONE} recorded {done['weights_bytes']}"
        cfg = self._final_json(CFG)
        if not LOADER_KEYS <= cfg.keys():
            return f"{CFG} is missing or damaged"
        if "cfg_sha256" in done and done["cfg_sha256"] != self._final_sha256(CFG):
            return f"{CFG} fails its checksum"
        if deep and "weights_sha256" in done:
            if not self._weights_match(done["weights_sha256"], remember):
                return f"{WEIGHTS} fails its checksum"
        if deep and "weights_sha256" not in done:  # finished by a version without checksums
            try:
                self.weights()
            except RunDirError:  # (could not be read: proves nothing)
                raise
            except Exception as err:
                return f"{WEIGHTS} is unreadable ({type(err).__name__})"
        if not _sound_metrics(self._final_json(METRICS)):
            return METRICS_LOST  # (last: everything else verified)
        return None

    def _final_json(self, name: str) -> dict:
        """A final file as a dict ({} when missing or damaged: what is wrong is the caller's
        answer); one that could not be read is one line, never taken for damaged (a damaged
        finished run is trained again, over its results)."""
        try:
            return self._json(name, quiet=True, strict=True)
        except OSError as err:
            raise self._unreadable(name, err) from err

    def _weights_match(self, sha256: str, remember: bool) -> bool:
        """Whether the final weights hash to ``sha256``: hashed, unless their file is as it was
        when they last did (:data:`VERIFIED`, or earlier in this process); ``remember``: a
        match found by hashing is recorded there (only a writer of the folder: a driver or a
        worker)."""
        try:
            stamp = file_stamp(self.path / WEIGHTS)  # (before hashing: a change after is seen)
        except OSError as err:
            raise self._unreadable(WEIGHTS, err) from err
        if self._json(VERIFIED, quiet=True) == _verified(sha256, stamp):
            return True
        seen = (str((self.path / WEIGHTS).absolute()), sha256, *stamp)
        if seen not in _HASHED:
            _HASHED[seen] = self._final_sha256(WEIGHTS) == sha256
        if not _HASHED[seen]:
            return False
        if remember:
            self._remember_verified(sha256, stamp)
        return True

    def _remember_verified(self, sha256: str, stamp: list[int]) -> None:
        """Write :data:`VERIFIED` (not written, a full disk say: the weights are hashed again
        next time, and nothing else is lost)."""
        try:
            atomic_write_json(self.path / VERIFIED, _verified(sha256, stamp))
        except OSError as err:
            log.debug("run %s: %s not written (%s)", self.run_id, VERIFIED, err)

    def _final_sha256(self, name: str) -> str:
        try:
            return file_sha256(self.path / name)
        except OSError as err:
            raise self._unreadable(name, err) from err

    def _unreadable(self, name: str, err: OSError) -> RunDirError:
        return RunDirError(
            f"run {self.run_id}: could not read {name} ({type(err).__name__}: {err}); its "
            f"results are kept as they are: {MEND}"
        )

    def vouched(self) -> bool:
        """``DONE`` holds the checksums of the weights and ``cfg.json`` (a version before them
        wrote none)."""
        return {"weights_sha256", "cfg_sha256"} <= self._final_json(DONE).keys()

    def evaluated_step(self) -> int | None:
        """Of a run evaluated again from its weights (see :meth:`unevaluable`): the step at
        which it diverged (its weights hold the steps before it), else None."""
        if self._final_json(DONE).get("state") != RunState.DIVERGED.value:
            return None
        return self.diverged_step()

    def evaluable(self) -> bool:
        """A run whose :meth:`final_problem` is :data:`METRICS_LOST` can be evaluated again
        from its weights: ``DONE`` vouches for them by checksum, and a diverged run's step is
        readable (reads no weights)."""
        return self.vouched() and not self._step_unknown()

    def evaluated_for(self, problem: str | None) -> bool:
        """Whether a finished run with this :meth:`final_problem` is evaluated again from its
        weights, not trained: only ``metrics.json`` is lost, and it is :meth:`evaluable`."""
        return problem == METRICS_LOST and self.evaluable()

    def fix_for(self, problem: str) -> str:
        """What mends a finished run with this :meth:`final_problem`."""
        if self.evaluated_for(problem):
            return "'sweep evaluate' of its sweep (or re-running it) evaluates it again from its weights"
        return "re-run its sweep to train it again"

    def _step_unknown(self) -> bool:
        """``DONE`` says the run diverged, but ``diverged.json`` (its step) is unreadable."""
        diverged = self._json(DONE, quiet=True).get("state") == RunState.DIVERGED.value
        return diverged and self.diverged_step() is None

    def unevaluable(self, deep: bool = True, remember: bool = False) -> str | None:
        """Why this run cannot be evaluated again from its final weights (``sweep evaluate``),
        or None: it is finished, its weights (hashed, if ``deep``) and ``cfg.json`` verify
        against the checksums in ``DONE`` (a run finished before checksums: its weights load),
        and a diverged run's step is readable; its metrics may be lost, when ``DONE`` vouches
        for the rest. ``remember``: as :meth:`final_problem`."""
        if not (self.path / DONE).is_file():
            return self.unvouched() or f"not finished ({self.state().value})"
        problem = self.final_problem(deep, remember)
        if problem not in (None, METRICS_LOST):
            return f"damaged ({problem})"
        if problem == METRICS_LOST and not self.vouched():  # (else its weights loaded: deep)
            return (
                f"{METRICS_LOST}, and {DONE} holds no checksums of its weights (an older sweep's)"
            )
        if self._step_unknown():
            return f"diverged, and {DIVERGED} (the step it froze at) is missing or damaged"
        return None

    def unvouched(self) -> str | None:
        """Why final files with no ``DONE`` are not trusted (``DONE`` was deleted: the weights
        are there and no checkpoint continues the run), or None."""
        if (self.path / DONE).is_file() or not self.has_weights():
            return None
        if checkpoints.list_checkpoints(self.path):
            return None  # stopped while finishing: it finishes again from its end checkpoint
        return f"{DONE}, which vouches for {WEIGHTS}, is missing"

    def state(self, deep: bool = False) -> RunState:
        """The state recorded on disk (never ``running``: that needs the sweep's lock). A run
        whose final files are damaged counts as not finished (``deep``: weights hashed too)."""
        if self.is_done(deep):
            return RunState(self._json(DONE)["state"])
        if (self.path / FAILED).is_file():
            return RunState.FAILED
        if checkpoints.list_checkpoints(self.path):
            interrupted = (self.path / INTERRUPTED).is_file()
            return RunState.INTERRUPTED if interrupted else RunState.PARTIAL
        return RunState.PENDING

    def spec(self) -> dict:
        return self._json(SPEC)

    def cfg(self) -> dict:
        return self._json(CFG)

    def metrics(self) -> dict:
        """Final metrics (``metrics.json``); {} before the run is final."""
        return self.recorded_metrics() if self.is_done() else {}

    def recorded_metrics(self) -> dict:
        """``metrics.json`` as it is (for a caller that has just found the run final)."""
        return self._json(METRICS)

    def finished_stamp(self) -> str:
        """Changes whenever the run is re-finished (invalidates values cached from it)."""
        return str(self._json(DONE).get("finished", ""))

    def weights_stamp(self) -> str:
        """Changes whenever the final weights do: their checksum in ``DONE`` (an older run's
        without one: its finish time). ``sweep evaluate`` re-finishes a run, not its weights."""
        done = self._json(DONE)
        return str(done.get("weights_sha256") or done.get("finished", ""))

    def diverged_step(self) -> int | None:
        """The step at which a diverged run froze (``diverged.json``: the first whose loss or
        gradient was not finite, which updated nothing), or None."""
        step = self._final_json(DIVERGED).get("step")
        return int(step) if isinstance(step, int) else None

    def failure(self) -> str:
        return str(self._json(FAILED).get("reason", "")) if (self.path / FAILED).is_file() else ""

    def started_at(self) -> float:
        """When the latest attempt started (0 if never)."""
        return float(self._json(PLACEMENT).get("time", 0))

    def interrupted_at(self) -> float:
        """When the run last checkpointed for a stop (0 if never)."""
        return float(self._json(INTERRUPTED).get("time", 0))

    def interrupted_step(self) -> int | None:
        """The step the run last checkpointed at for a stop (None: never, or unknown)."""
        step = self._json(INTERRUPTED).get("step")
        return step if isinstance(step, int) else None

    def last_curve(self) -> dict:
        """The latest training-curve record, read from the file's end ({} before any)."""
        return jsonl.last(self.path / CURVE)

    def curve(self, most: int | None = None) -> list[dict]:
        """Training-curve records (``most``: about that many, evenly spaced, first and last
        kept); a torn or damaged line (power loss, full disk) is skipped."""
        path = self.path / CURVE
        return jsonl.records(path) if most is None else jsonl.thinned(path, most)

    def has_weights(self) -> bool:
        return (self.path / WEIGHTS).is_file()

    def weights(self) -> dict:
        """The final weights (training space): {name: tensor}; a damaged file is one line."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(self.path / WEIGHTS))
        except (SafetensorError, OSError) as err:
            real = read_error(self.path / WEIGHTS, err) if isinstance(err, OSError) else None
            if real is not None:  # (safetensors says FileNotFoundError for any failed open)
                raise self._unreadable(WEIGHTS, real) from err
            raise SweepError(
                f"run {self.run_id}: {WEIGHTS} is unreadable ({err}); re-run its sweep to retrain it"
            ) from err

    def density(self) -> dict | None:
        """Feature-density tensors (see :func:`sweep.metrics.density_tensors`), if written."""
        from safetensors.torch import load_file

        path = self.path / DENSITY
        return load_file(str(path)) if path.is_file() else None

    def tracker_id(self) -> str | None:
        return self._json(TRACKER).get("wandb_id")

    def placement(self) -> dict:
        """Where the latest attempt ran (``placement.json``; {} when missing)."""
        return self._json(PLACEMENT)

    # ------------------------------------------------------------------------- writes

    def start(self, spec: dict, placement: dict) -> None:
        """A new attempt: record the spec and where it runs; clear FAILED / interrupted marks
        and a damaged ``DONE`` (the run is trained again). An intact ``DONE`` stays: a retried
        ensemble whose results were all written finishes without training."""
        self.path.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(self.path)
        if not self.is_done(deep=True):
            (self.path / DONE).unlink(missing_ok=True)
        (self.path / FAILED).unlink(missing_ok=True)  # a retried run is no longer failed
        (self.path / INTERRUPTED).unlink(missing_ok=True)
        atomic_write_json(self.path / SPEC, spec)
        atomic_write_json(self.path / PLACEMENT, {**placement, "time": time.time()})

    def save_checkpoint(self, ckpt: checkpoints.Checkpoint) -> None:
        """Write checkpoint ``ckpt``, the curve and events up to its step made durable first:
        a power loss must not keep the checkpoint and tear a record that a resume from it
        will not write again."""
        for name in (CURVE, EVENTS):
            fsync_file(self.path / name)
        checkpoints.save_checkpoint(self.path, ckpt)

    def record_timings(self, timings: dict[str, float], program: str | None = None) -> None:
        """Where the latest attempt's time went (restore, training, checkpoints, finalize),
        and how its step ran (``program``, e.g. ``fast-compiled-graphed cuda bfloat16``),
        added to ``placement.json``."""
        placement = self.placement()
        placement["timings"] = timings
        if program is not None:
            placement["program"] = program
        atomic_write_json(self.path / PLACEMENT, placement)

    def mark_interrupted(self, step: int | None) -> None:
        """The run's state is safe on disk after a stop (a stopping driver waits for this)."""
        atomic_write_json(self.path / INTERRUPTED, {"step": step, "time": time.time()})

    def mark_failed(self, reason: str) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.path / FAILED, {"reason": reason, "time": time.time()})

    def snapshots(self) -> list[tuple[int, Path]]:
        """(step, folder) of each whole snapshot (one with its ``cfg.json``; a snapshot still
        being written has none), in step order. A finished run writes none: one without its
        ``cfg.json`` there is damaged, left out with a warning."""
        steps = {f: f.name.removeprefix("step-") for f in (self.path / SNAPSHOTS).glob("step-*")}
        found = sorted(f for f, step in steps.items() if step.isdigit())
        torn = [f.name for f in found if not (f / CFG).is_file()]
        if torn and (self.path / DONE).is_file():
            log.warning(
                "run %s: snapshot %s has no %s (damaged: the run has finished); left out "
                "(remove its folder)",
                self.path.name,
                ", ".join(torn),
                CFG,
            )
        return [(int(steps[f]), f) for f in found if f.name not in torn]

    def write_snapshot(self, step: int, weights: bytes, cfg: dict) -> Path:
        """The run's weights after ``step`` (``train.snapshots``), in a folder ``load_run``
        opens; its ``cfg.json`` last, so a folder that has one is whole. A resumed run that
        passes the step again leaves a whole snapshot of the same bits as it is (rewriting it
        took it away from a reader for a moment), and writes one that differs again."""
        folder = self.path / SNAPSHOTS / f"step-{step:08d}"
        cfg = {**cfg, SNAPSHOT_SHA256: hashlib.sha256(weights).hexdigest()}
        if json_dict(folder / CFG) == json.loads(json_bytes(cfg)) and _holds(
            folder / WEIGHTS, cfg[SNAPSHOT_SHA256]
        ):
            return folder
        folder.mkdir(parents=True, exist_ok=True)
        (folder / CFG).unlink(missing_ok=True)
        atomic_write_bytes(folder / WEIGHTS, weights)
        atomic_write_json(folder / CFG, cfg)
        return folder

    def finish(self, result: FinalResult) -> None:
        """Write the final files, then ``DONE`` (the ensemble drops the checkpoints once every
        member is final, so a retry after a crash mid-way re-finishes all from the last one),
        then :data:`VERIFIED` (the weights just written are those ``DONE`` vouches for)."""
        if result.diverged_step is not None:
            atomic_write_json(self.path / DIVERGED, {"step": result.diverged_step})
        atomic_write_bytes(self.path / WEIGHTS, result.weights)
        stamp = file_stamp(self.path / WEIGHTS)
        atomic_write_bytes(self.path / DENSITY, result.density)
        cfg = json_bytes(result.cfg)
        atomic_write_bytes(self.path / CFG, cfg)
        with self._metrics_held():  # (a retry finishes a final run again: a report may merge)
            atomic_write_json(self.path / METRICS, result.metrics)
        state = RunState.DIVERGED if result.diverged_step is not None else RunState.DONE
        done = {"state": state.value, "finished": time.time()}
        done.update(
            weights_bytes=len(result.weights),
            weights_sha256=hashlib.sha256(result.weights).hexdigest(),
            cfg_sha256=hashlib.sha256(cfg).hexdigest(),
        )
        atomic_write_json(self.path / DONE, done)
        self._remember_verified(done["weights_sha256"], stamp)

    def finish_again(self, density: bytes, metrics: dict, reason: str) -> None:
        """A run whose weights and ``cfg.json`` ``DONE`` vouches for, evaluated again (for
        ``reason``): an ``evaluating_again`` event with the metrics it had ({} if none), its
        feature density and metrics, ``DONE`` with a new time (what it vouches for is left as
        it is, so a stop midway leaves a run that is evaluated again), then an
        ``evaluated_again`` event."""
        before = {"event": "evaluating_again", "reason": reason}
        self.append_event({**before, "previous_metrics": self._json(METRICS, quiet=True)})
        done = self._final_json(DONE)  # (rewritten: what it vouches for must be read)
        atomic_write_bytes(self.path / DENSITY, density)
        with self._metrics_held():
            atomic_write_json(self.path / METRICS, metrics)
        atomic_write_json(self.path / DONE, {**done, "finished": time.time()})
        self.append_event({"event": "evaluated_again", "reason": reason})

    def clear_checkpoints(self) -> None:
        checkpoints.clear_checkpoints(self.path)

    def update_metrics(self, values: dict, replace_keys: tuple[str, ...] = ()) -> None:
        """Merge ``values`` into a final run's ``metrics.json`` (dropping ``replace_keys`` first)."""
        path = self.path / METRICS
        if not path.is_file():
            return
        with self._metrics_held():  # (an evaluation writing new metrics: merged into those)
            old = self._final_json(METRICS)  # (read strictly: merged into, then rewritten)
            new = {k: v for k, v in old.items() if k not in replace_keys}
            new.update(values)
            if new != old:
                atomic_write_json(path, new)

    def _metrics_held(self) -> contextlib.AbstractContextManager[None]:
        """``metrics.json`` to this writer alone, across the processes of a host: a report's
        merge of MMCS never writes back the metrics an evaluation replaced meanwhile (an flock
        of the run folder: on NFS each host's own, so not between hosts; where the file
        system refuses it, nothing is held)."""
        return flock_held(self.path)

    def append_curve(self, records: list[dict]) -> None:
        """Append training-curve records to ``metrics.jsonl`` (one line each)."""
        append_text(self.path / CURVE, "".join(json.dumps(r) + "\n" for r in records))

    def drop_records_after(self, after_step: int) -> None:
        """Drop curve records past ``after_step`` (written after the checkpoint we resume from),
        and the events of training steps past it (:data:`REDONE_EVENTS`): the steps are redone
        and record them again."""
        jsonl.keep_through(self.path / CURVE, after_step)
        if not (self.path / EVENTS).exists():
            return
        lines = (self.path / EVENTS).read_text().splitlines(keepends=True)
        kept = [line for line in lines if not _redone(line, after_step)]
        if len(kept) < len(lines):
            atomic_write_bytes(self.path / EVENTS, "".join(kept).encode())

    def append_event(self, event: dict) -> None:
        """Record something a user should know about this run (``events.jsonl``)."""
        append_text(self.path / EVENTS, json.dumps({"time": time.time(), **event}) + "\n")

    def save_tracker_id(self, wandb_id: str, logged_step: int | None = None) -> None:
        """The run's wandb id and (``logged_step``) the newest curve step a finished wandb
        segment of it holds."""
        step = {} if logged_step is None else {"logged_step": logged_step}
        atomic_write_json(self.path / TRACKER, {"wandb_id": wandb_id, **step})

    def tracker_step(self) -> int:
        """The newest curve step a finished wandb segment of this run holds (-1: none known)."""
        step = self._json(TRACKER).get("logged_step")
        return step if isinstance(step, int) else -1


@dataclass(frozen=True)
class FinalResult:
    """What :meth:`RunFolder.finish` writes."""

    weights: bytes
    """``sae.safetensors`` (plain tensors, training space)."""
    density: bytes
    """``feature_density.safetensors``."""
    cfg: dict
    """``cfg.json``: what :func:`sweep.sae.load_run` needs."""
    metrics: dict
    diverged_step: int | None = None


def _verified(sha256: str, stamp: list[int]) -> dict:
    """:data:`VERIFIED`'s record: weights of this checksum, in a file of this stamp."""
    return {"weights_sha256": sha256, "file": stamp}


def _holds(path: Path, sha256: str) -> bool:
    """Whether the file at ``path`` has these bytes (False where it cannot be read)."""
    try:
        return file_sha256(path) == sha256
    except OSError:
        return False


def _redone(line: str, after_step: int) -> bool:
    """Whether an ``events.jsonl`` line is a training step's event past ``after_step``."""
    event = jsonl.record(line)
    if event is None:
        return False
    step = event.get("step")
    return event.get("event") in REDONE_EVENTS and isinstance(step, int) and step > after_step


def _sound_metrics(m: dict) -> bool:
    """``metrics.json`` holds a run's metrics, as numbers (not a file edited by hand)."""
    if not all(k in m for k in MEASURES):
        return False
    for k, v in m.items():
        if k not in TEXT_METRICS and not (v is None and k not in MEASURES):
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                return False
    return True


_HASHED: dict[tuple, bool] = {}
"""Final weights this process hashed, with their file stamps: whether they matched ``DONE``
(a preview, ``--plan``, or ``sweep report`` that checks a run twice hashes it once)."""

_UNREADABLE: set[tuple[Path, int]] = set()
"""Damaged files warned of, with their mtimes: one warning per file, not one per read."""


def _warn_unreadable(path: Path, err: Exception) -> None:
    try:
        seen = (path, path.stat().st_mtime_ns)
    except OSError:
        seen = (path, 0)
    if seen not in _UNREADABLE:
        _UNREADABLE.add(seen)
        log.warning("%s is unreadable (%s); ignoring it", path, err)
