"""Fault injection: SIGKILL a small sweep at random moments, again and again, then let it
finish; the dictionaries must be bit-identical to an uninterrupted sweep.

The kill times are drawn uniformly over the length of a whole uninterrupted run (measured
first), so they land in every phase: imports and config, store generation, Ray start-up,
training, evaluation and the final writes. Slow: ``pytest -m slow tests/test_fault_injection.py``.
"""

from __future__ import annotations

import os
import random
import signal
import time

import pytest

from tests.test_faults import finish, hashes, start

KILLS = 12


@pytest.mark.slow
@pytest.mark.parametrize("step", ["eager", "compiled"])
def test_random_sigkills_end_bit_identical(step, tmp_path, tmp_path_factory):
    """Killed runs are continued by new worker processes: under ``compiled``, each compiles
    the step afresh (or takes it from inductor's cache) and must still continue the bits."""
    base = tmp_path_factory.getbasetemp()
    extra = ["train.compile=true"] if step == "compiled" else []
    t0 = time.time()
    code, out = finish(start(tmp_path / "ref", base / f"fr{step[0]}", *extra))
    assert code == 0, out
    whole = time.time() - t0
    reference = hashes(tmp_path / "ref")
    rng = random.Random(int(os.environ.get("SWEEP_FAULT_SEED", "0")))
    sw, rt = tmp_path / "sw", base / f"fs{step[0]}"  # (short: Ray's 107-byte socket paths)
    moments = sorted(rng.uniform(0.05, 1.0) * whole for _ in range(KILLS))
    finished_early = 0
    for at in moments:
        p = start(sw, rt, *extra)
        time.sleep(at)
        if p.poll() is not None:  # it finished before this moment: start over from the kills
            finished_early += 1
            continue
        os.kill(p.pid, signal.SIGKILL)  # the driver: Ray's processes fate-share with it
        p.wait(timeout=60)
        time.sleep(0.5)
    code, out = finish(start(sw, rt, *extra))
    assert code == 0, out
    assert hashes(sw) == reference
    print(f"{KILLS} kills over {whole:.1f}s runs; {finished_early} landed after the end")
