"""Joining a running Ray cluster (``launch=cluster``) without hanging or landing somewhere else.

``ray.init(address=...)`` waits without limit for a head that is not there, and
``address=auto`` joins any Ray it finds on the machine, even the private, in-process instance
of another user's ``launch=local`` sweep (which ends with that sweep). So the address is
resolved first, a head must answer there within :data:`CONNECT_SECONDS`, and a Ray instance
that a ``launch=local`` sweep started (marked with :data:`PRIVATE`) is refused.
"""

from __future__ import annotations

import socket

from sweep.errors import SweepError, first_line

PRIVATE = "sweep_private_instance"
"""A custom resource on the Ray instance a ``launch=local`` sweep starts: nothing asks for it;
it tells a ``launch=cluster`` sweep that joined it that this is not a cluster."""
CONNECT_SECONDS = 10.0
START_FIX = "start it first (ray start --head, or launch/slurm.sbatch) or fix launch.address"


def resolve(address: str) -> str:
    """``host:port`` of the head ``launch.address`` names (``auto``: ``RAY_ADDRESS``, else
    the Ray started latest on this machine, as Ray itself looks)."""
    address = address.strip()
    if "://" in address:
        raise SweepError(
            f"launch.address={address} is a Ray Client address; give the head's HOST:PORT "
            "(the GCS port, 6379 by default), or auto"
        )
    if address != "auto":
        return address
    try:
        from ray._private.services import canonicalize_bootstrap_address
    except ImportError:  # (another Ray: let ray.init look)
        return address
    try:
        found = canonicalize_bootstrap_address("auto")
    except (ConnectionError, ValueError) as err:
        found, why = None, f" ({first_line(err)})"
    else:
        why = " (RAY_ADDRESS=local)" if found is None else ""
    if found is None:
        raise SweepError(
            f"launch.address=auto found no running Ray cluster{why}; start one (ray start "
            "--head, or launch/slurm.sbatch) or give launch.address=HOST:PORT"
        )
    return found


def check_reachable(address: str, seconds: float = CONNECT_SECONDS) -> None:
    """Refuse an address at which no head accepts a connection within ``seconds``."""
    if address == "auto":  # (a Ray that cannot resolve it: ray.init will)
        return
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise SweepError(
            f"launch.address={address} is not HOST:PORT; give a running head's HOST:PORT, or auto"
        )
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=seconds).close()
    except OSError as err:
        raise SweepError(
            f"no Ray head answers at launch.address={address} ({err or type(err).__name__}); "
            f"{START_FIX}"
        ) from err


def join_failed_hint(address: str) -> str:
    """What to check when a head answered at ``address`` but Ray could not join it."""
    import ray

    return (
        f"a head answers at {address}, but Ray could not join it: check that RAY_AUTH_MODE "
        "and RAY_AUTH_TOKEN here match the cluster's (launch/slurm.sbatch uses a token) and "
        f"that it runs Ray {ray.__version__}"
    )


def refuse_private(resources: dict[str, float], address: str) -> None:
    """Refuse a Ray instance that a ``launch=local`` sweep started for itself."""
    if resources.get(PRIVATE):
        raise SweepError(
            f"launch.address={address} is the private Ray instance of a launch=local sweep "
            "running on this machine, not a cluster; start a cluster (ray start --head, or "
            "launch/slurm.sbatch) and give its address, or use launch=local"
        )
