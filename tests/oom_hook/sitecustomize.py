"""On PYTHONPATH in a test sweep's processes (Ray's workers inherit it): an ensemble of more
than ``SWEEP_TEST_OOM_ABOVE`` members fails its ``SWEEP_TEST_OOM_AT``-th step as a CUDA
allocation that does not fit does, so the driver's out-of-memory handling runs for real, in
a real Ray worker, on a CPU. Nothing is patched unless that variable is set; ``sweep`` is
patched when it is first imported, not before (Ray's own processes never import it)."""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys

TARGET = "sweep.ensemble"


def _patch(module) -> None:
    import torch

    above, at = int(os.environ["SWEEP_TEST_OOM_ABOVE"]), int(os.environ["SWEEP_TEST_OOM_AT"])
    real = module.Ensemble.step

    def step(self, *args, **kw):
        self._test_steps = getattr(self, "_test_steps", 0) + 1
        if self.n > above and self._test_steps == at:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(self, *args, **kw)

    module.Ensemble.step = step


class _PatchOnImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != TARGET:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            _patch(module)

        spec.loader.exec_module = exec_module
        return spec


if os.environ.get("SWEEP_TEST_OOM_ABOVE"):
    sys.meta_path.insert(0, _PatchOnImport())
