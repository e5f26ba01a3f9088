"""``python -m sweep`` and the ``sweep`` command.

SIGTERM/SIGINT are handled from the first moment (before the heavy imports of the CLI): a
stop then is a one-line message and exit 128+signal, never a silent kill or a C++ abort.
"""

from __future__ import annotations

import signal


def entry() -> None:
    from sweep.stop import exit_now

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, exit_now)
    from sweep.cli import entry as cli_entry

    cli_entry()


if __name__ == "__main__":
    entry()
