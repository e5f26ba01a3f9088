"""On PYTHONPATH in a test sweep's processes (Ray's workers inherit it), to make on a CPU
what only a GPU cluster shows, inside the real processes. Nothing is patched unless its
variable is set, and a module is patched when it is first imported, not before:

- ``SWEEP_TEST_OOM_ABOVE`` / ``SWEEP_TEST_OOM_AT``: an ensemble of more members fails its
  ``AT``-th step as a CUDA allocation that does not fit does;
- ``SWEEP_TEST_OOM_EVAL_ABOVE``: evaluating more members at once fails as a CUDA
  allocation that does not fit does;
- ``SWEEP_TEST_NODE_CUDA``: torch sees CUDA on the Ray nodes (in their workers only; the
  driver and the training keep the truth), as on a cluster whose head has no GPU;
- ``SWEEP_TEST_EVAL_RAISES``: evaluating raises a ``KeyError`` of that key (a bug's
  unexpected error, not a :class:`sweep.errors.SweepError`);
- ``SWEEP_TEST_FINISH_RAISES``: writing the final files of that run id raises a
  ``KeyError`` (its ensemble-mates before it have finished);
- ``SWEEP_TEST_STEP_SLEEP``: every ensemble step takes that many seconds more (a sweep long
  enough for a stop asked from another process to land in training);
- ``SWEEP_TEST_EVAL_SLEEP`` (``SECONDS:FILE``): evaluating touches FILE, then takes that many
  seconds more (a stop landing while an ensemble is evaluated);
- ``SWEEP_TEST_STOP_GRACE``: the driver waits that many seconds for a stop's checkpoints;
- ``SWEEP_TEST_PLAN_SLEEP`` (``SECONDS:FILE``): the driver, its Ray started, touches FILE as
  it plans, then takes that many seconds more (a stop landing before training);
- ``SWEEP_TEST_STOP_FILE_FAILS``: the driver cannot write the sweep's stop file (a full
  disk: ENOSPC).
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys


def _ensemble(module) -> None:
    import torch

    above, at = int(os.environ["SWEEP_TEST_OOM_ABOVE"]), int(os.environ["SWEEP_TEST_OOM_AT"])
    real = module.Ensemble.step

    def step(self, *args, **kw):
        self._test_steps = getattr(self, "_test_steps", 0) + 1
        if self.n > above and self._test_steps == at:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(self, *args, **kw)

    module.Ensemble.step = step


def _slow_steps(module) -> None:
    import time

    pause, real = float(os.environ["SWEEP_TEST_STEP_SLEEP"]), module.Ensemble.step

    def step(self, *args, **kw):
        time.sleep(pause)
        return real(self, *args, **kw)

    module.Ensemble.step = step


def _metrics(module) -> None:
    import torch

    above, real = int(os.environ["SWEEP_TEST_OOM_EVAL_ABOVE"]), module.evaluate_members

    def evaluate_members(members, *args, **kw):
        if len(members) > above:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(members, *args, **kw)

    module.evaluate_members = evaluate_members


def _raising_metrics(module) -> None:
    key = os.environ["SWEEP_TEST_EVAL_RAISES"]

    def evaluate_members(members, *args, **kw):
        return {}[key]

    module.evaluate_members = evaluate_members


def _slowed(name: str, var: str):
    """A patch making ``module.name`` touch FILE, then take SECONDS more (``var``:
    ``SECONDS:FILE``)."""

    def patch(module) -> None:
        import pathlib
        import time

        pause, mark = os.environ[var].split(":", 1)
        real = getattr(module, name)

        def slowed(*args, **kw):
            pathlib.Path(mark).touch()
            time.sleep(float(pause))
            return real(*args, **kw)

        setattr(module, name, slowed)

    return patch


def _stop_grace(module) -> None:
    module.STOP_GRACE = float(os.environ["SWEEP_TEST_STOP_GRACE"])


def _raising_finish(module) -> None:
    run_id, real = os.environ["SWEEP_TEST_FINISH_RAISES"], module.RunFolder.finish

    def finish(self, result):
        if self.path.name == run_id:
            raise KeyError(run_id)
        return real(self, result)

    module.RunFolder.finish = finish


def _stop_file_fails(module) -> None:
    import errno

    def request_stop(self, signum):
        raise OSError(errno.ENOSPC, "No space left on device", str(self.stop_file))

    module.SweepFolder.request_stop = request_stop


def _gpuinfo(module) -> None:
    if "default_worker" in " ".join(sys.argv):  # a Ray worker
        module._torch_sees_cuda = lambda: True


PATCHES = [
    ("sweep.ensemble", "SWEEP_TEST_OOM_ABOVE", _ensemble),
    ("sweep.ensemble", "SWEEP_TEST_STEP_SLEEP", _slow_steps),
    ("sweep.metrics", "SWEEP_TEST_OOM_EVAL_ABOVE", _metrics),
    ("sweep.metrics", "SWEEP_TEST_EVAL_RAISES", _raising_metrics),
    (
        "sweep.metrics",
        "SWEEP_TEST_EVAL_SLEEP",
        _slowed("evaluate_members", "SWEEP_TEST_EVAL_SLEEP"),
    ),
    ("sweep.execution", "SWEEP_TEST_STOP_GRACE", _stop_grace),
    ("sweep.driver", "SWEEP_TEST_PLAN_SLEEP", _slowed("plan_for", "SWEEP_TEST_PLAN_SLEEP")),
    ("sweep.gpuinfo", "SWEEP_TEST_NODE_CUDA", _gpuinfo),
    ("sweep.rundir", "SWEEP_TEST_FINISH_RAISES", _raising_finish),
    ("sweep.sweepdir", "SWEEP_TEST_STOP_FILE_FAILS", _stop_file_fails),
]


class _PatchOnImport(importlib.abc.MetaPathFinder):
    def __init__(self, name: str, patch) -> None:
        self.name, self.patch = name, patch

    def find_spec(self, name, path, target=None):
        if name != self.name:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            self.patch(module)

        spec.loader.exec_module = exec_module
        return spec


for _name, _variable, _patch in PATCHES:
    if os.environ.get(_variable):
        sys.meta_path.insert(0, _PatchOnImport(_name, _patch))
