"""``python -m sweep.shield CMD [ARGS...]``: run CMD with SIGTERM blocked, a mask its children
inherit. launch/slurm.sbatch starts Ray's processes so: a plain ``scancel`` or a pre-emption
sends SIGTERM to every process of the job, and Ray's raylet, on its SIGTERM, kills its workers
at once, before they can save; blocked, Ray trains on while the driver (which the signal does
reach) stops every ensemble with a checkpoint. SLURM's SIGKILL still ends them after KillWait,
or the pre-emption's GraceTime. sweep's own stop handlers unblock it where they are installed
(:func:`sweep.stop._install`), so a worker sent SIGTERM alone still checkpoints and stops.
"""

from __future__ import annotations

import os
import signal
import sys


def main(argv: list[str]) -> None:
    if not argv:
        sys.exit("usage: python -m sweep.shield CMD [ARGS...]")
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    os.execvp(argv[0], argv)


if __name__ == "__main__":
    main(sys.argv[1:])
