"""Ray: start-up, what each task asks for, and ONE submit / wait / failure loop.

Training (:mod:`sweep.driver`) and sharded harvests (:mod:`sweep.activations.harvest`) both
start or join Ray with :func:`ray_session`, submit their tasks with :func:`submit` and take
results in completion order from :func:`drain` (``ray.wait``, never a blocking ``ray.get``
loop). A task that still fails after Ray's retries of crashed workers comes back as a
:class:`Finished` with its one-line ``error``; the caller decides what that means.
"""

from __future__ import annotations

import contextlib
import faulthandler
import logging
import math
import os
import re
import shutil
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Generic, TypeVar

from sweep import gpuinfo, reaper, shield
from sweep.cluster import PRIVATE, check_reachable, join_failed_hint, refuse_private, resolve
from sweep.config import LaunchConfig, SweepConfig
from sweep.devices import host_memory_bytes, release_device_memory
from sweep.errors import SweepError, first_line, task_error_reason
from sweep.gpuinfo import GpuInfo
from sweep.io import cpu_count, lift_file_size_limit
from sweep.logger import WANDB_THREAD
from sweep.stop import StopWatch, at_exit_now, exit_now, quietly

log = logging.getLogger(__name__)

K = TypeVar("K")
DEFAULT_GPU_BYTES = 16 * 2**30
"""What one GPU is planned with when nothing can say (``launch.device_memory_gb`` unset)."""


def _worker_env() -> None:
    """Ray's workers inherit this process's environment (a local instance): OpenMP threads
    that wait by sleeping, not spinning, unless the user chose otherwise. With spinning
    threads a CPU ensemble slows ~25x when another process takes one core; sleeping ones cost
    ~3% on a quiet machine (README, "CPU threads")."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _quiet_ray() -> None:
    """Ray's start-up chatter stays out of the terminal: its notice that token
    authentication is on (Ray's default for a local instance, which we keep) is not shown,
    and worker-log prefixes carry no colour codes when stderr is not a terminal."""
    logging.getLogger("ray._private.authentication").setLevel(logging.ERROR)
    if not sys.stderr.isatty():
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")


@contextlib.contextmanager
def _signals_stay_ours() -> Iterator[None]:
    """Keep this process's SIGTERM handling through ``ray.init``, which takes it twice:

    - in Python, ``sys.exit(signum)`` through ``ray._private.utils.set_sigterm_handler``: a
      SIGTERM that reached it while the interpreter ran a finalizer raised a SystemExit
      Python can only print and ignore, and the sweep went on (seen once in CI);
    - in C, the core worker's failure-signal handler (absl's): it prints a stack dump, and
      the alarm it sets aborts the process (SIGABRT) 3 s later unless it has died by then.

    The driver's core worker gets no failure-signal handler (Ray's own switch,
    ``RAY_DISABLE_FAILURE_SIGNAL_HANDLER``, for this process only: workers keep theirs);
    Python's faulthandler reports a crash of the driver instead. Another Ray without these
    hooks keeps its handlers (see :func:`_start_ray`'s SystemExit)."""
    import ray

    private = getattr(ray, "_private", None)
    utils, constants = getattr(private, "utils", None), getattr(private, "ray_constants", None)
    if not faulthandler.is_enabled():
        with contextlib.suppress(ValueError, OSError, RuntimeError):  # (stderr has no file)
            faulthandler.enable()
    with _replaced(utils, "set_sigterm_handler", lambda _handler: None):
        with _replaced(constants, "RAY_DISABLE_FAILURE_SIGNAL_HANDLER", True):
            yield


@contextlib.contextmanager
def _replaced(module: object, name: str, value: object) -> Iterator[None]:
    """``module.name`` is ``value`` inside (nothing changes where it has no such name)."""
    if not hasattr(module, name):
        yield
        return
    old = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, old)


def _start_ray(lc: LaunchConfig) -> None:
    import ray

    _quiet_ray()
    _worker_env()
    common = {"include_dashboard": False, "configure_logging": False, "log_to_driver": True}
    limit = None if lc.address else _file_size_limit()
    try:
        with _signals_stay_ours():
            if lc.address:
                _join(lc, common)
                return
            kwargs: dict[str, Any] = {"num_cpus": lc.num_cpus, "num_gpus": lc.num_gpus}
            if lc.temp_dir:
                kwargs["_temp_dir"] = str(Path(lc.temp_dir).absolute())
            # "local": a new instance even where RAY_ADDRESS is set or `ray start` ran
            # (shielded where what it starts can be ended at shutdown: sweep.reaper)
            with shield.inherited() if reaper.can_end() else contextlib.nullcontext():
                ray.init(address="local", resources={PRIVATE: 1}, **kwargs, **common)
    except SystemExit as err:  # a Ray whose own SIGTERM handler was set: sys.exit(SIGTERM)
        if err.code == signal.SIGTERM:
            exit_now(signal.SIGTERM)
        raise
    except SweepError:
        raise
    except Exception as err:  # (Ray's node start-up raises bare Exceptions)
        if lc.address:  # (joined: what failed after its ray.init)
            raise SweepError(
                f"Ray cluster at launch.address={lc.address} failed as it was joined "
                f"({first_line(err)}); check that its head runs, then re-run"
            ) from err
        hint = "check launch.* settings"
        if "path length" in str(err):
            hint = "launch.temp_dir is too long for Ray's socket paths (107 bytes); use a shorter folder"
        elif limit is not None:
            hint = f"the file-size limit (ulimit -f) of {limit} bytes may be why: lift it"
        raise SweepError(
            f"could not start a local Ray instance ({first_line(err)}); {hint}"
        ) from err


def _file_size_limit() -> int | None:
    """The file-size limit left (``ulimit -f``: a hard one, which :func:`sweep.io.
    lift_file_size_limit` cannot raise), warned about; None: there is none."""
    hard = lift_file_size_limit()
    if hard is not None:
        log.warning(
            "files are limited to %d bytes (ulimit -f): Ray's object store and the "
            "checkpoints may need larger ones; lift the limit if the sweep fails", hard,
        )  # fmt: skip
    return hard


def _join(lc: LaunchConfig, common: dict) -> None:
    """Join the running cluster ``launch.address`` names (:mod:`sweep.cluster`)."""
    import ray

    assert lc.address
    ignored = [f for f in ("num_cpus", "num_gpus", "temp_dir") if getattr(lc, f) is not None]
    if ignored:
        names = ", ".join(f"launch.{f}" for f in ignored)
        log.warning("%s apply to launch=local only; a cluster has its own (ignored)", names)
    address = resolve(lc.address)
    check_reachable(address)
    try:  # ("auto" as given: only then does Ray pick up a saved token for a local head)
        ray.init(address=lc.address.strip(), **common)
    except (ConnectionError, OSError, ValueError, RuntimeError, ray.exceptions.RayError) as err:
        raise SweepError(
            f"could not join the Ray cluster at {address} ({first_line(err)}); "
            + join_failed_hint(address)
        ) from err
    named = lc.address if lc.address == address else f"{lc.address} ({address})"
    cluster = ray.cluster_resources()
    try:
        refuse_private(cluster, named)
    except SweepError:
        quietly(ray.shutdown)
        raise
    log.info(
        "joined the Ray cluster at %s: %d node(s), %g CPUs, %g GPUs",
        named,
        len(alive_nodes()),
        cluster.get("CPU", 0),
        cluster.get("GPU", 0),
    )


def shutdown_ray(wait: float | None = None, local: bool = False) -> None:
    """ray.shutdown() in a helper thread; after a signal (Ray's processes may be dead) give
    up after ``wait`` s. Meanwhile this (main) thread keeps re-registering its SIGTERM/SIGINT
    handlers: Ray's core worker resets them in C as it shuts down (``signal.getsignal`` still
    names ours), and a signal then would kill the driver without a word. ``local``: the Ray
    this process started (:func:`_shutdown_local`)."""
    import ray

    handlers = _current_handlers()
    stop = _shutdown_local if local else ray.shutdown
    t = threading.Thread(target=lambda: quietly(stop), daemon=True, name="ray-shutdown")
    t.start()
    deadline = math.inf if wait is None else time.monotonic() + wait
    while t.is_alive() and time.monotonic() < deadline:
        _keep_handlers(handlers)
        t.join(0.005)
    _keep_handlers(handlers)


def _shutdown_local() -> None:
    """Shut down the local Ray that :func:`_start_ray` started with SIGTERM blocked
    (:func:`sweep.shield.inherited`). Ray's shutdown would send each of its processes SIGTERM
    and wait 1 s for it before SIGKILL, ~4 s more in all (measured): they get SIGKILL at once
    (every task has ended by then). The raylet's agents, which end themselves with a SIGTERM
    once it is gone, are ended by :func:`ray_session` (:func:`_end_agents`)."""
    import ray

    node = getattr(getattr(getattr(ray, "_private", None), "worker", None), "_global_node", None)
    kill = getattr(node, "kill_all_processes", None)
    if kill is None:  # (another Ray: its own shutdown, slower)
        ray.shutdown()
    else:
        at_once = lambda **kw: kill(**{**kw, "allow_graceful": False})  # noqa: E731
        with _replaced(node, "kill_all_processes", at_once):
            ray.shutdown()


def _current_handlers() -> dict:
    return {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}


def _keep_handlers(handlers: dict) -> None:
    for sig, handler in handlers.items():
        with contextlib.suppress(ValueError, TypeError):  # (not the main thread: nothing to do)
            signal.signal(sig, handler)


@contextlib.contextmanager
def ray_session(
    lc: LaunchConfig,
    stop_wait: Callable[[], float | None] = lambda: None,
    went_well: Callable[[], bool] = lambda: True,
) -> Iterator[bool]:
    """Start or join Ray unless already initialised (yields whether we own it); a Ray we
    started is shut down on exit, giving up after ``stop_wait()`` seconds when that is set,
    and its session folder removed if no error left it and ``went_well()``."""
    import ray

    owns = not ray.is_initialized()
    local = owns and not lc.address
    session = own = None
    with contextlib.ExitStack() as stack:
        if local:  # a signal before training exits at once: Ray's agents too
            stack.enter_context(at_exit_now(lambda _line: reaper.end_own_session(lc.temp_dir)))
        if owns:
            handlers = _current_handlers()
            try:
                _start_ray(lc)
            except BaseException:  # (its processes may have started)
                if local:
                    _end_agents(lc, None)
                raise
            _keep_handlers(handlers)  # (a Ray whose hooks _signals_stay_ours cannot hold off)
            session = own = None if lc.address else _session_dir()
        try:
            yield owns
        except BaseException:
            session = None  # (its logs may say why)
            raise
        finally:
            try:
                if owns:
                    shutdown_ray(stop_wait(), local)
            finally:  # (also where the shutdown was given up on, or a second signal cut it)
                if local:
                    _end_agents(lc, own)
            if session is not None and went_well():
                _remove_session(session)


def _end_agents(lc: LaunchConfig, session: Path | None) -> None:
    """End what is left of the local Ray this process started: its agents (and anything a
    shutdown cut short left) hold its session folder open and, started with SIGTERM blocked,
    would not end themselves. ``session``: its folder, where known (else found by this pid)."""
    with contextlib.suppress(OSError):  # (in a finally: never in the way of what raised)
        if session is not None:
            reaper.end_session(session)
        else:
            reaper.end_own_session(lc.temp_dir)


def _remove_session(session: Path) -> None:
    """Remove a Ray session folder, and Ray's ``session_latest`` link beside it when it names
    that folder (it would point at nothing; a later session's link stays)."""
    shutil.rmtree(session, ignore_errors=True)
    latest = session.parent / "session_latest"
    with contextlib.suppress(OSError):
        if latest.is_symlink() and Path(os.readlink(latest)).name == session.name:
            latest.unlink()


def _session_dir() -> Path | None:
    """The folder of the local Ray just started (``/tmp/ray/session_...``: its logs, a few MB
    an hour), removed when its session ends well: Ray never removes one, and each sweep left
    its own."""
    import ray

    try:
        return Path(ray._private.worker._global_node.get_session_dir_path())
    except (AttributeError, TypeError):  # (a Ray without it: the folder stays)
        return None


def _oversubscribed(threads: int) -> None:
    """Warn when each CPU ensemble of a local sweep would run more threads than this machine
    has CPUs (Ray counts what it is told, not the cores: launch.num_cpus=64 on 2 cores)."""
    cores = cpu_count()
    if threads > cores:
        log.warning(
            "each ensemble would run %d torch threads on this machine's %d CPUs (from "
            "launch.num_cpus, launch.cpus_per_ensemble or train.threads): oversubscribed, it "
            "trains several times slower; leave them unset to use every CPU once",
            threads,
            cores,
        )


def local_cluster(lc: LaunchConfig) -> dict[str, float] | None:
    """The resources a local Ray instance started with ``lc`` would have (CPUs, GPUs), found
    by Ray's own resolver without starting it (``--plan``: seconds saved); None where they
    cannot be known so (a cluster address, a Ray already running, a Ray without that resolver
    or refusing ``lc``: the caller starts Ray, which says why)."""
    import ray

    if lc.address or ray.is_initialized():
        return None
    try:
        from ray._private.resource_and_label_spec import ResourceAndLabelSpec

        spec = ResourceAndLabelSpec(num_cpus=lc.num_cpus, num_gpus=lc.num_gpus, resources={})
        found = spec.resolve(is_head=True).to_resource_dict()
        return {k: float(found.get(k, 0)) for k in ("CPU", "GPU")}
    except Exception:  # (a private API: any change in it means asking Ray itself)
        return None


def early_gpu_probe(cfg: SweepConfig) -> gpuinfo.Early | None:
    """What :class:`Resources` will ask of this machine's GPU, begun now (before Ray starts,
    to overlap it) where a local Ray instance may train on it."""
    lc = cfg.launch
    local_gpus = not lc.address and lc.num_gpus != 0 and cfg.train.device != "cpu"
    return gpuinfo.Early.begin(local_gpus, not lc.device_memory_gb, lc.num_gpus or 0)


class Resources:
    """What each ensemble task asks Ray for, and the device memory model's budget."""

    @classmethod
    def of_cluster(cls, cfg: SweepConfig, early: gpuinfo.Early | None = None) -> Resources:
        """For the Ray cluster this process is connected to: its resources and alive nodes."""
        import ray

        return cls(cfg, ray.cluster_resources(), alive_nodes(), early=early)

    def __init__(
        self,
        cfg: SweepConfig,
        cluster: dict[str, float],
        nodes: list[dict[str, float]] | None = None,
        gpu: GpuInfo | None = None,
        early: gpuinfo.Early | None = None,
    ) -> None:
        """``cluster``: Ray's total resources; ``nodes``: each alive node's (default: the
        cluster is one node, this machine). A task asking for more than one node has would
        wait forever.
        ``gpu``: what the GPUs are (default: asked, :func:`sweep.gpuinfo.ask`); ``early``: an
        answer for this machine's GPU begun before Ray started (:func:`early_gpu_probe`)."""
        nodes = nodes or [{**cluster, "here": 1.0}]
        gpus = cluster.get("GPU", 0)
        if cfg.train.device == "cuda" and gpus == 0:
            raise SweepError(
                "train.device=cuda but the Ray cluster has no GPUs; use train.device=auto or cpu"
            )
        self.on_gpu = cfg.train.device == "cuda" or (cfg.train.device == "auto" and gpus > 0)
        lc = cfg.launch
        cpus = cluster.get("CPU", 0.0)  # (Ray leaves a resource whose total is 0 out)
        self.auto_share = self.on_gpu and lc.gpus_per_ensemble == "auto"
        """Each ensemble's GPU share is chosen by :func:`sweep.packing.gpu_share`."""
        self.real_gpus = False
        """The ensembles' GPUs are CUDA GPUs (not only Ray's count of them)."""
        if self.on_gpu:
            gpu_nodes = [bool(n.get("here")) for n in nodes if n.get("GPU", 0) > 0]
            need_memory = not lc.device_memory_gb
            asked = gpu or (early.answer() if early and len(gpu_nodes) <= 1 else None)
            asked = asked or gpuinfo.ask(
                gpu_nodes, need_memory, need_dtype=cfg.train.dtype == "auto", gpus=int(gpus)
            )
            self._gpu_request(lc, asked)
        else:
            most = max((n.get("CPU", 0.0) for n in nodes), default=0.0) or cpus
            self._cpu_request(lc, lc.cpus_per_ensemble or most, cpus)
        _fits_a_node(self.num_gpus, self.num_cpus, nodes)
        self.threads = cfg.train.threads or max(1, int(self.num_cpus))
        if not self.on_gpu and not lc.address:
            _oversubscribed(self.threads)
        self.gpus = gpus
        self.gpus_here = max((n.get("GPU", 0.0) for n in nodes if n.get("here")), default=0.0)
        """The GPUs of this machine's Ray node (0: none, or it is not one)."""
        per, have = (self.num_gpus, gpus) if self.on_gpu else (self.num_cpus, cpus)
        packed = self.on_gpu and not self.auto_share and per < 1  # asked for: Ray packs them
        self.slots = 1 if packed else max(1, math.floor(have / per + 1e-9))
        """Ensembles that would each have hardware of their own (fewer leave some idle); 1
        under a fixed fraction of a GPU, which packs ensembles onto one as asked."""

    def _gpu_request(self, lc: LaunchConfig, gpu: GpuInfo) -> None:
        """A GPU share per ensemble (whole GPUs when they take one process each) and the
        memory it plans with."""
        share = 1.0 if self.auto_share else float(lc.gpus_per_ensemble)
        if gpu.exclusive:
            self.auto_share = False  # a second process on a GPU would fail to start
            _whole_gpus(share)
        self.real_gpus = gpu.real
        self.num_gpus, self.num_cpus = share, lc.cpus_per_ensemble or 1
        self.gpu_bytes = lc.device_memory_gb * 2**30 or gpu.free or DEFAULT_GPU_BYTES
        self.device_bytes = self.gpu_bytes * min(1.0, share)

    def _cpu_request(self, lc: LaunchConfig, per: float, cpus: float) -> None:
        """``per`` CPUs per ensemble (of the cluster's ``cpus``) and the host memory each of
        the ensembles running at once plans with."""
        if per <= 0:
            raise SweepError(
                "the Ray cluster has no CPUs for ensembles (are its worker nodes up?); "
                "start them, or give the head CPUs"
            )
        self.num_gpus, self.num_cpus = 0, per
        if str(lc.gpus_per_ensemble) != "auto":
            log.warning(
                "launch.gpus_per_ensemble=%s does nothing here: the ensembles train on CPUs "
                "(launch.cpus_per_ensemble sets their share)",
                lc.gpus_per_ensemble,
            )
        concurrent = max(1, math.floor(cpus / per))
        self.device_bytes = lc.device_memory_gb * 2**30 or host_memory_bytes() * 0.5 / concurrent


def _fits_a_node(gpus: float, cpus: float, nodes: list[dict[str, float]]) -> None:
    """Refuse a per-ensemble request no single node can grant (Ray would wait forever)."""
    if any(n.get("GPU", 0) + 1e-9 >= gpus and n.get("CPU", 0) + 1e-9 >= cpus for n in nodes):
        return
    fit = [n for n in nodes if n.get("GPU", 0) + 1e-9 >= gpus] if gpus else nodes
    name, want, have = ("CPU", cpus, fit) if fit else ("GPU", gpus, nodes)
    most = max((n.get(name, 0.0) for n in have), default=0.0)
    if name == "CPU" and most == 0:  # (asking for less would not help)
        raise SweepError(
            "the Ray cluster has no CPUs for ensembles (are its worker nodes up?); start "
            "them, or give the head CPUs"
        )
    raise SweepError(
        f"launch.{name.lower()}s_per_ensemble={want:g} but no Ray node has {want:g} {name}s"
        f"{' beside the GPUs asked for' if fit and gpus else ''} (at most {most:g}): ask for "
        "less (Ray would wait for such a node forever)"
    )


def alive_nodes() -> list[dict[str, float]]:
    """The CPUs and GPUs of each alive Ray node, and ``here``: 1 for this machine's."""
    import ray

    here = ray.get_runtime_context().get_node_id()
    return [
        {
            **{k: float(n.get("Resources", {}).get(k, 0.0)) for k in ("CPU", "GPU")},
            "here": float(n.get("NodeID") == here),
        }
        for n in ray.nodes()
        if n.get("Alive")
    ]


def _whole_gpus(share: float) -> None:
    """Under exclusive GPUs, ensembles cannot share one: refuse a fixed fraction, say so for
    ``auto``."""
    if share < 1:
        raise SweepError(
            f"launch.gpus_per_ensemble={share:g} shares a GPU, but the GPUs are in exclusive "
            "compute mode (one process each): use launch.gpus_per_ensemble=1 or auto"
        )
    log.info("the GPUs are in exclusive compute mode: one ensemble per GPU")


def submit(
    fn: Callable[..., Any],
    jobs: dict[K, tuple],
    num_cpus: float,
    num_gpus: float | dict[K, float],
    max_retries: int,
) -> dict[Any, K]:
    """One Ray task per job (``key -> args``), each asking for ``num_gpus`` (one value, or
    one per key); returns object ref -> key.

    A task that uses a GPU runs in a fresh worker process (``max_calls=1``, Ray's own default
    for functions declared with GPUs, which ``.options`` cannot set): a reused process would
    keep the previous ensemble's cached GPU memory, and stay on the GPU of its first task
    whatever ``CUDA_VISIBLE_DEVICES`` Ray gives the next."""
    import ray

    gpu_tasks = any(
        v > 0 for v in (num_gpus.values() if isinstance(num_gpus, dict) else [num_gpus])
    )
    remote = ray.remote(max_calls=1)(fn) if gpu_tasks else ray.remote(fn)
    refs = {}
    for key, args in jobs.items():
        gpus = num_gpus[key] if isinstance(num_gpus, dict) else num_gpus
        task = remote.options(
            num_cpus=num_cpus, num_gpus=gpus, max_retries=max_retries, retry_exceptions=False
        )
        refs[task.remote(*args)] = key
    return refs


@dataclass
class Finished(Generic[K]):
    """One task's outcome: its value, or the one-line reason it failed (and what it raised,
    when Ray could bring that back)."""

    key: K
    value: Any = None
    error: str | None = None
    cause: BaseException | None = None
    detail: str = ""
    """All of Ray's message for a failed task: the worker's traceback (for ``sweep.log``)."""


ANSI_COLOR = re.compile(r"\x1b\[[0-9;]*m")


def drain(
    refs: dict[Any, K], tick: Callable[[list], bool] | None = None, poll: float = 0.5
) -> Iterator[Finished[K]]:
    """Tasks' outcomes in completion order. Between waits ``tick(pending_keys)`` runs (the
    driver's heartbeat, progress and stop handling); when it returns False, stop waiting.
    Tasks added to ``refs`` meanwhile (by the caller, e.g. a re-planned ensemble) are waited
    for too."""
    import ray

    pending, seen, errors = list(refs), set(refs), 0
    while pending:
        if tick is not None and not tick([refs[r] for r in pending]):
            return
        try:
            ready, pending = ray.wait(pending, num_returns=1, timeout=poll if tick else None)
            errors = 0
        except ray.exceptions.RayError as err:
            errors += 1
            if errors >= 60:  # Ray itself is gone (e.g. its raylet was killed)
                raise SweepError(
                    f"lost contact with Ray ({task_error_reason(err)}); finished runs and "
                    "checkpoints are kept: re-run the same command to continue"
                ) from err
            time.sleep(poll)
            ready = []
        for ref in ready:
            try:
                yield Finished(refs[ref], value=ray.get(ref))
            except ray.exceptions.RayError as err:
                cause, reason = getattr(err, "cause", None), task_error_reason(err)
                if _points_at_logs(err):
                    reason += _where_ray_logs()
                detail = ANSI_COLOR.sub("", str(err))  # (Ray colours the task's name)
                yield Finished(refs[ref], error=reason, cause=cause, detail=detail)
        added = [r for r in refs if r not in seen]
        seen.update(added)
        pending += added


def _points_at_logs(err: Exception) -> bool:
    """Whether Ray's error sends the reader to its log files without saying where they are
    (a crashed worker's ``python-core-worker-*.log``; an actor or task that died with its node
    or its head's GCS: "Check raylet.out")."""
    import ray

    text = str(err)
    return isinstance(err, ray.exceptions.WorkerCrashedError) or any(
        name in text for name in ("raylet.out", "python-core-worker", "raylet.err")
    )


def _where_ray_logs() -> str:
    """Where the ``python-core-worker-*.log`` files a crashed worker's error points to are:
    the Ray session's log folder (on the worker's node; its placement.json names the host)."""
    import ray

    with contextlib.suppress(Exception):  # (a private API: without it, the message as Ray's)
        logs = ray._private.worker._global_node.get_logs_dir_path()
        return f" (Ray's logs: {logs}, on the node that ran it)"
    return ""


def placement() -> dict:
    """Where this Ray task runs (host, node, GPU ids) for the run folders' placement.json."""
    import ray

    ctx = ray.get_runtime_context()
    return {
        "host": socket.gethostname(),
        "node_id": ctx.get_node_id(),
        "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
        "gpu_share": float(ctx.get_assigned_resources().get("GPU", 0.0)),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES", ""),
        "pid": os.getpid(),
        "task_id": ctx.get_task_id(),  # (the same when Ray runs a task again)
    }


class _KeepWarnings(logging.Handler):
    """Keeps each warning's line, but not those of threads in ``older`` (wandb senders alive
    before the task began: a previous task's, abandoned, whose late warnings are not this
    ensemble's); ``echo``: also writes every warning to stderr, as logging's fallback would
    without this handler (a Ray worker sets up no logging: Ray forwards stderr)."""

    def __init__(self, echo: bool, older: frozenset[int | None] = frozenset()) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []
        self.echo, self.older = echo, older

    def emit(self, record: logging.LogRecord) -> None:
        try:
            if record.thread not in self.older:
                self.lines.append(record.getMessage())
        except Exception:  # noqa: BLE001 (a bad log call never stops training)
            self.handleError(record)
        if self.echo and logging.lastResort is not None:
            logging.lastResort.handle(record)


@contextlib.contextmanager
def _warnings_kept() -> Iterator[list[str]]:
    """The warnings sweep's code logs inside, as lines (a task sends them to the driver)."""
    older = frozenset(t.ident for t in threading.enumerate() if t.name == WANDB_THREAD)
    keep = _KeepWarnings(echo=not logging.getLogger("sweep").hasHandlers(), older=older)
    logging.getLogger("sweep").addHandler(keep)
    try:
        yield keep.lines
    finally:
        logging.getLogger("sweep").removeHandler(keep)


def _warnings_with_error(train: Callable[[], Any], warnings: list[str]) -> Any:
    """``train()``; what it raises carries the ``warnings`` logged before (as
    ``worker_warnings``: Ray pickles them with it, for the driver's sweep.log)."""
    try:
        return train()
    except Exception as err:
        with contextlib.suppress(AttributeError, TypeError):
            err.worker_warnings = list(warnings)  # type: ignore[attr-defined]
        raise


class ProgressReport:
    """An ensemble's rows trained, sent to the driver's progress counter at most once every
    ``every`` seconds (each call costs Ray's head ~3 KB of task records: at every logging
    step a fast ensemble sent dozens a second, ~340 MB an hour), and once more at the end."""

    def __init__(self, actor: object, ids: list[str], every: float = 1.0) -> None:
        self.actor, self.ids, self.every = actor, ids, every
        self.rows = self.sent_rows = 0
        self.sent_at = -math.inf

    def __call__(self, rows: int) -> None:
        self.rows = rows
        if time.monotonic() - self.sent_at >= self.every:
            self._send()

    def flush(self) -> None:
        if self.rows != self.sent_rows:
            self._send()

    def _send(self) -> None:
        self.actor.reach.remote(self.ids, self.rows)  # type: ignore[attr-defined]
        self.sent_rows, self.sent_at = self.rows, time.monotonic()


def train_task(job: Any, progress_actor: object, stop_file: str) -> Any:
    """The Ray task body: train one ensemble; stop cleanly (checkpoint) on SIGTERM/SIGINT or
    when the driver's stop file appears."""
    began = time.time()  # (this process is started and this module imported: Ray's part)
    from sweep.worker import EnsembleResult, train_ensemble

    ids = [m.run_id for m in job.ensemble.members]
    report = ProgressReport(progress_actor, ids)
    with StopWatch(Path(stop_file)) as stop:
        if stop.requested():  # the sweep was stopped before this task started
            interrupted = dict.fromkeys(ids, "interrupted")
            return EnsembleResult(job.ensemble.ensemble_id, interrupted, 0, 0.0, started=False)
        job = replace(job, placement={**job.placement, **placement(), "task_began": began})
        try:
            with _warnings_kept() as warnings:
                result = _warnings_with_error(
                    lambda: train_ensemble(job, progress=report, should_stop=stop.is_set), warnings
                )
            result.warnings = warnings
            return result
        finally:  # Ray hands the GPU share on before this process exits: free what it cached
            quietly(report.flush)
            try:
                release_device_memory()
            except Exception as err:  # noqa: BLE001 (never in place of the task's own error)
                log.warning("could not free this task's GPU memory: %s", err)
