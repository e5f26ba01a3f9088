"""``python -m sweep.ports JOB_ID``: where a SLURM job's Ray head listens, run on the head node
by launch/slurm.sbatch, printed as ``ADDRESS PORT``.

The address is the one the host name resolves to, unless that is a loopback address (Debian's
and Ubuntu's ``/etc/hosts`` map the host name to 127.0.1.1): then that of the interface the
node reaches the network by, as Ray finds its own (else the other nodes' Ray could not join and
the sweep trained on the head alone). The port is the first of three consecutive free TCP ports
(the GCS, the client server, the dashboard agent). Two jobs may share a node, so Ray's fixed
defaults (6379, 10001, 52365) would collide: the search starts at a port derived from the job
id, 20000 + 3 (id mod 3000), and steps by 3 through 20000-28999, so two jobs whose ids differ by
a multiple of 3000 no longer take the same ports (the second's `ray start` failed). A port
another job takes between this look and its own `ray start` still collides (rare: the start is
seconds later).
"""

from __future__ import annotations

import contextlib
import socket
import sys

LOW, SPAN, WIDTH = 20000, 9000, 3


def free(port: int) -> bool:
    """Whether nothing listens on ``port`` here (a bind to every interface succeeds)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("", port))
        except OSError:
            return False
    return True


def first_free(job_id: int) -> int:
    """The job's base port: the first of :data:`WIDTH` free ones from the id's own."""
    start = (job_id % (SPAN // WIDTH)) * WIDTH
    for step in range(0, SPAN, WIDTH):
        base = LOW + (start + step) % SPAN
        if all(free(base + k) for k in range(WIDTH)):
            return base
    return LOW + start  # (every one taken: Ray's own error will say so)


def node_address() -> str:
    """This node's address for the other nodes (see the module's note)."""
    with contextlib.suppress(OSError):
        named = socket.gethostbyname(socket.gethostname())
        if not named.startswith("127."):
            return named
    with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect(("10.255.255.255", 1))  # (a datagram socket sends nothing to connect)
        return s.getsockname()[0]
    return "127.0.0.1"  # (no network: this node alone)


if __name__ == "__main__":
    if len(sys.argv) != 2 or not sys.argv[1].isdigit():
        print("usage: python -m sweep.ports JOB_ID", file=sys.stderr)
        sys.exit(2)
    print(node_address(), first_free(int(sys.argv[1])))
