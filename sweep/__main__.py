"""``python -m sweep`` and the ``sweep`` command.

SIGTERM/SIGINT are handled from the first moment (before the heavy imports of the CLI): a
stop then is a one-line message and exit 128+signal, never a silent kill or a traceback.
"""

from __future__ import annotations

import os
import signal
import sys


def entry() -> None:
    from sweep.stop import Interrupted, raise_interrupted

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, raise_interrupted)
    try:
        from sweep.cli import entry as cli_entry
    except Interrupted as err:
        print(f"interrupted: {err}", file=sys.stderr)
        sys.stderr.flush()
        os._exit(128 + err.signum)
    cli_entry()


if __name__ == "__main__":
    entry()
