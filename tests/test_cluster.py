"""Multi-node path: a Ray head and a second node started with `ray start` on this machine (each
with a fake GPU), and `sweep run launch=cluster` pointed at it. Ensembles must run on both."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

RAY = str(Path(sys.executable).parent / "ray")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict:
    e = dict(os.environ, RAY_AUTH_MODE="disabled", TQDM_DISABLE="1")
    e.pop("RAY_ADDRESS", None)
    return e


@pytest.fixture
def two_node_cluster(tmp_path_factory):
    port = free_port()
    common = ["--num-cpus", "1", "--num-gpus", "1", "--disable-usage-stats", "--block"]
    head = subprocess.Popen(
        [
            RAY,
            "start",
            "--head",
            "--port",
            str(port),
            "--include-dashboard",
            "false",
            "--temp-dir",
            str(tmp_path_factory.getbasetemp() / "rc"),
            *common,
        ],
        env=env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    address = f"127.0.0.1:{port}"
    procs = [head]
    try:
        _wait_nodes(address, 1)  # (a head that fails to start makes this time out, not hang)
        procs.append(
            subprocess.Popen(
                [RAY, "start", "--address", address, *common],
                env=env(),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
        )
        _wait_nodes(address, 2)
        yield address
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()


def _wait_nodes(address: str, n: int, timeout: float = 90) -> None:
    probe = (
        "import ray, sys; ray.init(address=sys.argv[1], configure_logging=False); "
        "print(sum(1 for x in ray.nodes() if x['Alive']))"
    )
    end = time.time() + timeout
    while time.time() < end:
        try:
            out = subprocess.run(
                [sys.executable, "-c", probe, address],
                env=env(),
                capture_output=True,
                text=True,
                timeout=30,
            )
        except subprocess.TimeoutExpired:
            continue
        if out.returncode == 0 and out.stdout.strip().splitlines()[-1:] == [str(n)]:
            return
        time.sleep(1)
    raise AssertionError(f"Ray cluster at {address} never showed {n} nodes")


def test_sweep_runs_on_both_nodes(two_node_cluster, tmp_path):
    sw = tmp_path / "sw"
    cmd = [
        sys.executable,
        "-m",
        "sweep",
        "run",
        "launch=cluster",
        f"launch.address={two_node_cluster}",
        f"sweep_dir={sw}",
        "data.width=16",
        "data.n_features=32",
        "data.rows=20000",
        "data.rows_per_chunk=4096",
        "data.eval_rows=2048",
        "grid.l1=[1e-2,3e-2]",
        "grid.dict_ratio=[1,2,4,8]",
        "train.batch_size=256",
        "train.epochs=4",
        "progress=false",
    ]
    out = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    with open(sw / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 8 and {r["state"] for r in rows} == {"done"}
    placements = [
        json.loads((sw / "runs" / r["run_id"] / "placement.json").read_text()) for r in rows
    ]
    assert len({p["node_id"] for p in placements}) == 2, placements  # both nodes trained ensembles
    assert all(
        p["gpu_ids"] and p["cuda_visible_devices"] for p in placements
    )  # one fake GPU per task


SHIMS = {  # what the batch script asks of SLURM, answered for "nodes" that are this machine
    "srun": "while [ $# -gt 0 ]; do case $1 in -w) shift 2;; -*) shift;; *) break;; esac; done\n"
    # (SHIM_WORKER_FAILS: the second node's `ray start` fails at once)
    '[ -n "${SHIM_WORKER_FAILS:-}" ] && [[ " $* " == *" --address="* ]] && '
    '{ echo "srun: error: node2: task 0: Exited with exit code 1" >&2; exit 1; }\n'
    # the step: its own process group, which signals sent to srun reach, as SLURM signals
    # every process of a step (SIGUSR1 ends Ray's, which keep SIGTERM blocked)
    'set -m; "$@" & step=$!\n'
    'for s in USR1 TERM INT; do trap "kill -$s -- -$step" $s; done\n'
    "while kill -0 $step 2>/dev/null; do wait $step; done; wait $step\n",
    "scontrol": "echo localhost; echo localhost\n",  # scontrol show hostnames: two nodes
}


def _job_id() -> int:
    return 20000 + os.getpid() % 9000


def test_a_jobs_ray_ports_are_free_ones_from_its_own():
    """Two jobs on one node whose ids differ by a multiple of 3000 shared ports (the second's
    `ray start` failed): the search goes on to the next free three."""
    from sweep.ports import first_free

    own = first_free(12)
    assert own == 20036 or own > 20036  # (free here, or taken by something else)
    with socket.socket() as taken:
        taken.bind(("", own + 1))  # (one of the three is enough)
        taken.listen()
        assert first_free(12) >= own + 3 and first_free(3012) == first_free(12)


def test_the_heads_address_is_not_the_loopback_its_name_may_resolve_to(monkeypatch):
    """Debian's /etc/hosts maps the host name to 127.0.1.1: a head at that address was
    unreachable from the other nodes, and the sweep trained on the head alone."""
    from sweep.ports import node_address

    monkeypatch.setattr(socket, "gethostbyname", lambda name: "10.1.2.3")
    assert node_address() == "10.1.2.3"
    monkeypatch.setattr(socket, "gethostbyname", lambda name: "127.0.1.1")
    assert node_address() != "127.0.1.1"  # (the interface's; 127.0.0.1 with no network)


@pytest.mark.parametrize(
    "args, said, code",
    [
        (["sweep.ports"], "usage: python -m sweep.ports JOB_ID", 2),
        (["sweep.ports", "12a"], "usage: python -m sweep.ports JOB_ID", 2),
        (["sweep.shield"], "usage: python -m sweep.shield CMD [ARGS...]", 2),
        (["sweep.shield", ""], "usage: python -m sweep.shield CMD [ARGS...]", 2),
        (
            ["sweep.shield", "no-such-cmd"],
            "sweep.shield: cannot run no-such-cmd: No such file",
            127,
        ),
    ],
)
def test_the_batch_scripts_helpers_refuse_bad_input_in_one_line(args, said, code):
    done = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True)
    assert done.returncode == code and not done.stdout
    assert len(done.stderr.splitlines()) == 1 and done.stderr.startswith(said), done.stderr


def run_slurm_script(tmp: Path, ray_tmp: Path, *args: str, **extra_env: str) -> tuple[int, str]:
    """launch/slurm.sbatch, unchanged, with srun/scontrol shims (two nodes: this machine)."""
    bin_dir = tmp / "bin"
    bin_dir.mkdir()
    for name, body in SHIMS.items():
        (bin_dir / name).write_text("#!/bin/bash\n" + body)
        (bin_dir / name).chmod(0o755)
    e = env()
    for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN"):  # the script's default: a token of its own
        e.pop(k, None)
    e.update(
        PATH=f"{bin_dir}:{e['PATH']}",
        SWEEP_VENV=str(Path(sys.executable).parent.parent),
        SLURM_JOB_ID=str(_job_id()),
        SLURM_JOB_NODELIST="node[1-2]",
        SLURM_CPUS_PER_TASK="1",
        RAY_TMPDIR=str(ray_tmp),
        **extra_env,
    )
    script = Path(__file__).resolve().parent.parent / "launch" / "slurm.sbatch"
    p = subprocess.Popen(
        ["bash", str(script), *args],
        env=e,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = p.communicate(timeout=300)
    finally:  # (whatever it left running)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)
    return p.returncode, out


def test_the_slurm_script_runs_a_sweep_on_two_nodes(tmp_path, tmp_path_factory):
    """A token-authenticated Ray head, a second node joining it, the sweep trained."""
    sw = tmp_path / "sw"
    args = ["data.width=16", "data.n_features=32", "data.rows=12000", "data.eval_rows=2048"]
    args += ["grid.l1=[1e-2]", "grid.dict_ratio=[1,2]", "train.batch_size=256", "progress=false"]
    ray_tmp = tmp_path_factory.getbasetemp() / "sl"  # (short: Ray's socket paths)
    job_port = 20000 + (_job_id() % 3000) * 3
    with socket.socket() as taken:  # another job's Ray listens on this job's own port
        taken.bind(("", job_port))
        taken.listen()
        code, out = run_slurm_script(tmp_path, ray_tmp, f"sweep_dir={sw}", *args)
    assert code == 0, out
    assert f":{job_port + 3}); workers: " in out, out  # the next free ones
    assert "not every Ray node joined" not in out, out
    with open(sw / "summary.csv") as f:
        assert {r["state"] for r in csv.DictReader(f)} == {"done"}


def test_the_slurm_script_goes_on_at_once_without_a_node_whose_ray_start_failed(
    tmp_path, tmp_path_factory
):
    """(not after waiting 5 minutes for it to join): the sweep trains on the nodes that did."""
    sw = tmp_path / "sw"
    args = ["data.width=16", "data.n_features=32", "data.rows=6000", "data.eval_rows=1024"]
    args += ["grid.l1=[1e-2]", "grid.dict_ratio=[1]", "train.batch_size=256", "progress=false"]
    ray_tmp = tmp_path_factory.getbasetemp() / "sf"
    start = time.monotonic()
    code, out = run_slurm_script(tmp_path, ray_tmp, f"sweep_dir={sw}", *args, SHIM_WORKER_FAILS="1")
    assert code == 0, out
    assert "warning: not every Ray node joined (any failed step's output is above)" in out, out
    assert "node2: task 0: Exited with exit code 1" in out
    assert time.monotonic() - start < 150, out
    with open(sw / "summary.csv") as f:
        assert {r["state"] for r in csv.DictReader(f)} == {"done"}


def test_the_slurm_script_stops_at_once_when_the_head_cannot_start(tmp_path):
    """(here: a temp dir too long for Ray's socket paths) not after waiting 5 minutes."""
    long_tmp = tmp_path / ("x" * 90)
    start = time.monotonic()
    code, out = run_slurm_script(tmp_path, long_tmp, f"sweep_dir={tmp_path / 'sw'}")
    assert code == 1 and "error: the Ray head did not start on localhost" in out, out
    assert time.monotonic() - start < 120 and not (tmp_path / "sw").exists()


def sweep_cli(*args: str, **extra_env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "sweep", *args],
        env={**env(), **extra_env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_a_file_size_limit_is_lifted_to_its_hard_limit_for_ray_and_the_sweep(short_tmp):
    """``ulimit -f`` (soft) of 1 MiB: the raylet, killed by SIGXFSZ mapping its object store,
    took the sweep down with a traceback; the soft limit is raised to the hard one."""
    import resource

    from tests.test_sweep_e2e import TINY

    def limited() -> None:
        _, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, hard))

    sw = short_tmp / "sw"
    args = ["run", f"sweep_dir={sw}", *TINY, "grid.l1=[1e-3]", "grid.dict_ratio=[2]"]
    out = subprocess.run(
        [sys.executable, "-m", "sweep", *args, f"launch.temp_dir={short_tmp / 'ray'}"],
        env=env(), capture_output=True, text=True, timeout=300, preexec_fn=limited,
    )  # fmt: skip
    hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
    if hard != resource.RLIM_INFINITY and hard < 1 << 34:
        pytest.skip(f"this machine's hard file-size limit ({hard} bytes) is too low for Ray")
    assert out.returncode == 0, out.stderr[-3000:]
    assert (sw / "runs" / "r2-l1_1e-03-s0" / "DONE").is_file()


def refused_at(address: str, tmp_path) -> str:  # noqa: ANN001
    """The one line a ``launch=cluster`` run at ``address`` is refused with (exit 2, before
    its sweep folder is made)."""
    sw = tmp_path / "sw"
    out = sweep_cli("run", "launch=cluster", f"launch.address={address}", f"sweep_dir={sw}")
    assert out.returncode == 2, out.stderr
    assert not sw.exists()
    return out.stderr.strip().splitlines()[-1]


def test_an_address_where_no_head_answers_is_refused_before_any_work(tmp_path):
    port = free_port()  # (nothing listens there)
    assert refused_at(f"127.0.0.1:{port}", tmp_path) == (
        f"error: no Ray head answers at launch.address=127.0.0.1:{port} ([Errno 111] Connection "
        "refused); start it first (ray start --head, or launch/slurm.sbatch) or fix launch.address"
    )


@contextlib.contextmanager
def listener(reply: bytes | None):
    """A TCP server on a free port that is not a Ray head: it answers every connection with
    ``reply`` and closes it, or (None) accepts and says nothing."""
    server = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []

    def serve() -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = server.accept()
                if reply is None:
                    held.append(conn)
                    continue
                with conn:
                    conn.recv(64)
                    conn.sendall(reply)

    threading.Thread(target=serve, daemon=True).start()
    try:
        yield f"127.0.0.1:{server.getsockname()[1]}"
    finally:
        server.close()
        for conn in held:
            conn.close()


def test_an_address_that_is_not_a_ray_head_is_refused_not_waited_on(tmp_path):
    """A port that accepts connections but does not speak gRPC (here an HTTP server, as the
    dashboard's 8265 is) would leave ray.init waiting for ever: one line, exit 2."""
    with listener(b"HTTP/1.1 400 Bad Request\r\n\r\n") as address:
        said = refused_at(address, tmp_path)
    assert said == (
        f"error: launch.address={address} accepts connections but is not a Ray head (it replied "
        "b'HTTP/1.1'); give the head's GCS port (6379 by default, as `ray start --head` printed "
        "it; 8265 is the dashboard's)"
    )


def test_a_ray_port_other_than_the_heads_gcs_is_refused_before_any_work(ray_cluster, tmp_path):
    """A raylet's port (like a worker's, or Ray Client's 10001) answers as a gRPC server, as
    the GCS's does, but has none of its methods: one line, exit 2, before the store is made
    (ray.init failed only after it)."""
    from sweep.cluster import check_reachable

    node = ray_cluster.nodes()[0]
    address = f"{node['NodeManagerAddress']}:{node['NodeManagerPort']}"
    assert refused_at(address, tmp_path) == (
        f"error: launch.address={address} is a gRPC server but not a Ray head's GCS (a "
        "raylet's, a worker's or Ray Client's port answers so too); give the head's GCS port "
        "(6379 by default, as `ray start --head` printed it)"
    )
    check_reachable(ray_cluster.get_runtime_context().gcs_address)  # (the GCS's passes)


def test_a_silent_listener_is_not_a_ray_head():
    from sweep.cluster import check_reachable
    from sweep.errors import SweepError

    with listener(None) as address, pytest.raises(SweepError) as err:
        check_reachable(address, seconds=0.5)
    assert f"launch.address={address} accepts connections but is not a Ray head (no reply " in str(
        err.value
    )


def test_a_ray_error_that_points_at_its_logs_gets_where_they_are():
    """Ray's "Check raylet.out" (an actor lost with its node or the head's GCS) and a crashed
    worker's "python-core-worker-*.log" name files without their folder: a FAILED line
    says where Ray's logs are."""
    import ray

    from sweep.launcher import _points_at_logs

    lost = "System error: the actor died. Check raylet.out on the node for more"
    assert _points_at_logs(ray.exceptions.RaySystemError(lost))
    assert _points_at_logs(ray.exceptions.WorkerCrashedError())
    assert not _points_at_logs(ray.exceptions.RaySystemError("ValueError: bad value"))


PRIVATE_RAY = """
import sys, time, ray
from sweep.config import LaunchConfig
from sweep.launcher import ray_session
with ray_session(LaunchConfig(temp_dir=sys.argv[1])):
    print(ray.get_runtime_context().gcs_address, flush=True)
    time.sleep(120)
"""


def test_launch_local_is_private_and_never_joined_as_a_cluster(tmp_path_factory, tmp_path):
    """A launch=local sweep's Ray ignores RAY_ADDRESS, and a launch=cluster sweep given its
    address refuses to join it (as it would one that address=auto found on the machine)."""
    rt = tmp_path_factory.getbasetemp() / "pv"
    p = subprocess.Popen(
        [sys.executable, "-c", PRIVATE_RAY, str(rt)],
        env={**env(), "RAY_ADDRESS": f"127.0.0.1:{free_port()}"},  # (nothing there: ignored)
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        ready, _, _ = select.select([p.stdout], [], [], 90)
        address = p.stdout.readline().strip() if ready else ""
        assert address, "the launch=local Ray did not start"
        plan = ("run", "--plan", "launch=cluster", f"launch.address={address}")
        out = sweep_cli(*plan, f"sweep_dir={tmp_path / 'x'}")
        assert out.returncode == 2
        said = f"launch.address={address} is the private Ray instance of a launch=local sweep"
        assert said in out.stderr
    finally:
        os.killpg(p.pid, signal.SIGTERM)
        p.wait(timeout=60)


def test_launch_addresses_that_cannot_name_a_head_are_one_line(monkeypatch):
    from sweep.cluster import check_reachable, resolve
    from sweep.errors import SweepError

    assert resolve(" 10.0.0.1:6379 ") == "10.0.0.1:6379"
    with pytest.raises(SweepError, match=r"is a Ray Client address; give the head's HOST:PORT"):
        resolve("ray://head:10001")
    with pytest.raises(SweepError, match=r"is a URL; give the head's HOST:PORT \(the GCS port"):
        resolve("http://head:8265")  # (the dashboard's)
    with pytest.raises(SweepError, match=r"launch.address=head is not HOST:PORT"):
        check_reachable("head")
    monkeypatch.setenv("RAY_ADDRESS", "local")
    with pytest.raises(SweepError, match=r"found no running Ray cluster \(RAY_ADDRESS=local\)"):
        resolve("auto")
