"""Joining a running Ray cluster (``launch=cluster``) without hanging or landing somewhere else.

``ray.init(address=...)`` waits without limit for a head that is not there, and
``address=auto`` joins any Ray it finds on the machine, even the private, in-process instance
of another user's ``launch=local`` sweep (which ends with that sweep). So the address is
resolved first, a head must answer there within :data:`CONNECT_SECONDS` — and answer as a
gRPC server does (a Ray head's GCS port is one; a port that accepts connections but is not,
such as the dashboard's 8265, would leave ``ray.init`` waiting for ever) and as the GCS does
(Ray's other gRPC ports — a raylet's, Ray Client's — would fail ``ray.init`` only after the
store was made) — and a Ray instance that a ``launch=local`` sweep started (marked with
:data:`PRIVATE`) is refused.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import TYPE_CHECKING

from sweep.errors import SweepError, first_line

if TYPE_CHECKING:
    from sweep.config import LaunchConfig

log = logging.getLogger(__name__)

PRIVATE = "sweep_private_instance"
"""A custom resource on the Ray instance a ``launch=local`` sweep starts: nothing asks for it;
it tells a ``launch=cluster`` sweep that joined it that this is not a cluster."""
CONNECT_SECONDS = 10.0
START_FIX = "start it first (ray start --head, or launch/slurm.sbatch) or fix launch.address"
GRPC_UNIMPLEMENTED = 12
"""gRPC's status for a call the server has no method for."""
HTTP2_HELLO = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])
"""An HTTP/2 client's connection preface and an empty SETTINGS frame: a gRPC server's first
frame in reply is its own SETTINGS frame (type 4)."""


def check_address(lc: LaunchConfig) -> None:
    """``launch=cluster`` without an address would start a private Ray and train on this
    machine alone, without a word: refused (before any work: :func:`sweep.driver.check_config`).
    An address with ``launch=local`` is joined, as asked, and said."""
    if lc.name == "cluster" and not (lc.address or "").strip():
        raise SweepError(
            "launch=cluster joins a running Ray cluster but launch.address is empty; set it "
            "(auto: RAY_ADDRESS, else the Ray started on this machine; or HOST:PORT), or use "
            "launch=local"
        )
    if lc.name == "local" and lc.address:
        log.warning(
            "launch=local with launch.address=%s: joining that Ray cluster rather than starting "
            "one (launch=cluster launch.address=... says so)",
            lc.address,
        )


def resolve(address: str) -> str:
    """``host:port`` of the head ``launch.address`` names (``auto``: ``RAY_ADDRESS``, else
    the Ray started latest on this machine, as Ray itself looks)."""
    address = address.strip()
    if "://" in address:
        what = "a Ray Client address" if address.startswith("ray://") else "a URL"
        raise SweepError(
            f"launch.address={address} is {what}; give the head's HOST:PORT (the GCS port, "
            "6379 by default, not the dashboard's or a client's), or auto"
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
        conn = socket.create_connection((host.strip("[]"), int(port)), timeout=seconds)
    except OSError as err:
        raise SweepError(
            f"no Ray head answers at launch.address={address} ({err or type(err).__name__}); "
            f"{START_FIX}"
        ) from err
    with conn:
        reply = _first_frame(conn)
    if reply != "gRPC" and os.environ.get("RAY_USE_TLS", "0").lower() not in ("1", "true"):
        raise SweepError(
            f"launch.address={address} accepts connections but is not a Ray head ({reply}); "
            "give the head's GCS port (6379 by default, as `ray start --head` printed it; "
            "8265 is the dashboard's)"
        )
    if reply == "gRPC" and _no_gcs_methods(address, seconds):
        raise SweepError(
            f"launch.address={address} is a gRPC server but not a Ray head's GCS (a raylet's, "
            "a worker's or Ray Client's port answers so too); give the head's GCS port (6379 "
            "by default, as `ray start --head` printed it)"
        )


def _no_gcs_methods(address: str, seconds: float) -> bool:
    """Whether the gRPC server at ``address``, asked for the session's name as the GCS is,
    has no such method (``ray.init`` would fail only after the store was made). False where
    unsure: a Ray without this client, a token it lacks, no reply (``ray.init`` says)."""
    try:
        from ray._raylet import GcsClient
        from ray.exceptions import RpcError
    except ImportError:
        return False
    try:
        client = GcsClient(address=address)
        client.internal_kv_get(b"session_name", namespace=b"session", timeout=seconds)
    except RpcError as err:
        return getattr(err, "rpc_code", None) == GRPC_UNIMPLEMENTED
    except Exception:  # (another Ray's client: ray.init judges)
        return False
    return False


def _first_frame(conn: socket.socket) -> str:
    """ "gRPC" when the server at ``conn`` answers an HTTP/2 hello as gRPC servers do, else
    what it did instead."""
    try:
        conn.sendall(HTTP2_HELLO)
        head = conn.recv(9)
        while head and len(head) < 9:
            more = conn.recv(9 - len(head))
            if not more:
                break
            head += more
    except TimeoutError:
        return f"no reply within {conn.gettimeout():g} s"
    except OSError as err:
        return f"{err or type(err).__name__}"
    if len(head) == 9 and head[3] == 4:  # a SETTINGS frame
        return "gRPC"
    return "it closed the connection" if not head else f"it replied {head[:8]!r}"


def join_failed_hint(address: str) -> str:
    """What to check when a head answered at ``address`` but Ray could not join it."""
    import ray

    return (
        f"a head answers at {address}, but Ray could not join it: check that the port is the "
        "head's GCS port (as `ray start --head` printed it; a raylet's or worker's port answers "
        "too), that RAY_AUTH_MODE and RAY_AUTH_TOKEN here match the cluster's "
        f"(launch/slurm.sbatch uses a token) and that it runs Ray {ray.__version__}"
    )


def refuse_private(resources: dict[str, float], address: str) -> None:
    """Refuse a Ray instance that a ``launch=local`` sweep started for itself."""
    if resources.get(PRIVATE):
        raise SweepError(
            f"launch.address={address} is the private Ray instance of a launch=local sweep "
            "running on this machine, not a cluster; start a cluster (ray start --head, or "
            "launch/slurm.sbatch) and give its address, or use launch=local"
        )
