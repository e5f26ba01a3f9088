"""Shared fixtures: tiny stores, one local Ray instance per session, temp dirs for Ray/wandb."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

from sweep.activations.synthetic import ensure_synthetic_store
from sweep.config import SyntheticDataConfig, TrainConfig
from sweep.lock import pid_alive

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TQDM_DISABLE", "1")
torch.set_num_threads(1)


KEEP_BASETEMPS = 3
"""Temp folders of this many test runs are kept (as pytest keeps its own)."""


@pytest.hookimpl(tryfirst=True)  # (before pytest's tmp_path factory reads basetemp)
def pytest_configure(config: pytest.Config) -> None:
    """Run by pytest-xdist (``make test``), each worker's temp folder is
    ``<basetemp>/popen-gwN``: under pytest's default basetemp,
    ``/tmp/pytest-of-USER/pytest-N``, the tests' Ray temp folders would be too long for
    Ray's socket paths, so the controller takes a shorter one. xdist's workers are given
    ``COLUMNS=80``; the tests read tables as a pipe gets them (no COLUMNS)."""
    if hasattr(config, "workerinput"):  # an xdist worker
        os.environ.pop("COLUMNS", None)
    elif config.getoption("numprocesses", None) and not config.option.basetemp:
        config.option.basetemp = str(_short_basetemp())


def _short_basetemp() -> Path:
    """A new ``<tmp>/sw-tests-UID/N``; only the newest :data:`KEEP_BASETEMPS` are kept, and
    never one whose test run is still going (``N.pid`` names its controller)."""
    root = Path(tempfile.gettempdir()) / f"sw-tests-{os.getuid()}"
    root.mkdir(mode=0o700, exist_ok=True)
    numbered = sorted((int(d.name) for d in root.iterdir() if d.name.isdigit()), reverse=True)
    for old in numbered[KEEP_BASETEMPS - 1 :]:
        if not _running(root / f"{old}.pid"):
            shutil.rmtree(root / str(old), ignore_errors=True)
            (root / f"{old}.pid").unlink(missing_ok=True)
    n = numbered[0] + 1 if numbered else 0
    while True:  # (a run started at the same moment may take a number first)
        try:
            (root / str(n)).mkdir()
        except FileExistsError:
            n += 1
            continue
        (root / f"{n}.pid").write_text(str(os.getpid()))
        return root / str(n)


def _running(pid_file: Path) -> bool:
    try:
        pid = int(pid_file.read_text())
    except (OSError, ValueError):  # gone or unreadable
        return False
    return pid > 0 and pid_alive(pid)


def tiny_data(**kw) -> SyntheticDataConfig:
    base = dict(
        width=16,
        n_features=32,
        mean_active=3.0,
        rows=12_000,
        rows_per_chunk=4096,
        eval_rows=2048,
        seed=0,
    )
    base.update(kw)
    return SyntheticDataConfig(**base)


def rehash_chunk(store: Path, name: str) -> None:
    """Record chunk ``name``'s present bytes in the store's manifest, as if it had been
    written so (e.g. NaN from another tool's writer: ours refuses them), not changed since."""
    manifest = json.loads((store / "manifest.json").read_text())
    (entry,) = [c for c in manifest["chunks"] if c["file"] == name]
    entry["sha256"] = hashlib.sha256((store / name).read_bytes()).hexdigest()
    (store / "manifest.json").write_text(json.dumps(manifest))


def refused(real, victim: str | Path):  # noqa: ANN001, ANN201
    """``real`` (a function, or a method of Path, taking the path first) failing as a
    permission refused does for ``victim``: a file name, or a whole path."""

    def call(path, *args, **kwargs):  # noqa: ANN001, ANN202
        p = Path(str(path))
        if p == victim if isinstance(victim, Path) else p.name == victim:
            raise PermissionError(13, "Permission denied", str(path))
        return real(path, *args, **kwargs)

    return call


def tiny_train(**kw) -> TrainConfig:
    base = dict(batch_size=256, lr=1e-2, log_every=5, checkpoint_every=7, threads=1)
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="session", autouse=True)
def own_runtime_dir(tmp_path_factory):
    """Machine-wide records (the local GPU sweeps: sweep.neighbours) kept to this test run,
    its subprocesses' too."""
    os.environ["XDG_RUNTIME_DIR"] = str(tmp_path_factory.mktemp("runtime"))


@pytest.fixture
def short_tmp():
    """A fresh folder with a short path (Ray's sockets lie 64 bytes below a launch.temp_dir,
    and pytest's tmp_path is too deep for that), removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix="t", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory):
    path = tmp_path_factory.mktemp("stores") / "tiny"
    store = ensure_synthetic_store(tiny_data(), path)
    store.verify()  # (as every sweep does before training; a worker would, at its first job)
    return store


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory):
    """One local Ray instance (2 CPUs, 2 fake GPUs) shared by every test that needs Ray."""
    import ray

    temp = tmp_path_factory.getbasetemp() / "ray"  # inside pytest's tmp (kept short: socket paths)
    ray.init(
        num_cpus=2,
        num_gpus=2,
        include_dashboard=False,
        _temp_dir=str(temp),
        configure_logging=False,
    )
    yield ray
    ray.shutdown()
