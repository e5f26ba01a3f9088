"""``python -m sweep.shield CMD [ARGS...]``: run CMD with SIGTERM blocked, a mask its children
inherit, and :data:`SHIELDED` set. launch/slurm.sbatch starts Ray's processes so: a plain
``scancel`` sends SIGTERM to every process of the job, and Ray's raylet, on its SIGTERM, kills
its workers at once, before they can save; blocked, Ray trains on while the driver (which the
signal reaches too) stops every ensemble with a checkpoint, before SLURM's SIGKILL (KillWait
later). A pre-emption signals the job's steps (Ray) at once but the batch script (the driver)
only when its GraceTime ends: Ray's workers keep SIGTERM blocked (:func:`sweep.stop._install`
leaves it so where :data:`SHIELDED` is set), so the sweep trains through the grace time and
stops, checkpointed, at its end.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Iterator

SHIELDED = "SWEEP_SHIELDED"
"""Set in the environment of a shielded command (and so of Ray's workers it starts)."""


@contextlib.contextmanager
def inherited() -> Iterator[None]:
    """SIGTERM blocked in this thread inside, so that the processes it starts inherit the
    mask, as ``ray start`` does from ``python -m sweep.shield``: a local Ray started inside
    (:func:`sweep.launcher.ray_session`) trains on through a SIGTERM sent to every process
    (a ``scancel`` of a SLURM job running ``launch=local``), as it already does through a
    Ctrl-C's SIGINT (Ray blocks SIGINT in its processes), while the driver stops the sweep
    with a checkpoint of every ensemble. (Without it the raylet, on its SIGTERM, killed the
    workers before they saved.) Ray's workers unblock SIGTERM where they train
    (:data:`SHIELDED` is not set): a worker signalled alone checkpoints and stops."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def main(argv: list[str]) -> None:
    if not argv or not argv[0]:
        print("usage: python -m sweep.shield CMD [ARGS...]", file=sys.stderr)
        sys.exit(2)  # (a usage error, as argparse's)
    os.environ[SHIELDED] = "1"
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        os.execvp(argv[0], argv)
    except OSError as err:  # (as a shell says it, and its exit status)
        print(f"sweep.shield: cannot run {argv[0]}: {err.strerror}", file=sys.stderr)
        sys.exit(127)


if __name__ == "__main__":
    main(sys.argv[1:])
