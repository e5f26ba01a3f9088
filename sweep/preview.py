"""``sweep run --plan``: what ``sweep run`` would train, how it groups the grid into
ensembles and what each asks of the hardware — without training or writing anything.

It plans as ``sweep run`` does (the same checks, Ray resources, memory model and GPU shares)
on the store that exists or, for ``data=synthetic``, the one the config would generate. A
store that must be harvested or copied first is refused: its width is not known yet.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from sweep import driver, execution, grid, launcher, planning
from sweep.activations.store import MANIFEST, ChunkStore, staged_bytes
from sweep.config import SweepConfig, SyntheticDataConfig
from sweep.errors import SweepError
from sweep.planning import SweepPlan
from sweep.sweepdir import SweepFolder, default_store_path


@dataclass(frozen=True)
class StoreShape:
    """What planning needs of a store: its width and what two staged chunks take."""

    path: Path
    width: int
    staged: int


@dataclass
class Preview:
    cfg: SweepConfig
    """With ``train.dtype`` resolved as the run would record it."""
    plan: SweepPlan
    res: launcher.Resources
    rows: list[dict]
    """One per ensemble: id, dict ratio and size, members, share, memory, runs."""


def preview(cfg: SweepConfig) -> Preview:
    """The plan ``sweep run`` would make now (refusing what it would refuse)."""
    planning.check_device(cfg)
    folder = SweepFolder(cfg.sweep_dir)
    planning.check_compatible(folder, cfg)
    shape = store_shape(cfg, folder)
    planning.expand_grid(cfg, shape.width)
    with launcher.ray_session(cfg.launch):
        import ray

        res = launcher.Resources(cfg, ray.cluster_resources(), launcher.alive_nodes())
    cfg = replace(cfg, train=replace(cfg.train, dtype=driver.compute_dtype(cfg, res)))
    planning.check_compatible(folder, cfg)
    budget = driver.device_budget(shape.staged, shape.path, res)
    p = planning.plan(cfg, shape.width, budget, res.on_gpu, res.slots, tidy=False)
    return Preview(cfg, p, res, _rows(cfg, p, res, shape))


def store_shape(cfg: SweepConfig, folder: SweepFolder) -> StoreShape:
    path = Path(cfg.data.path or default_store_path(cfg.sweep_dir))
    if (path / MANIFEST).is_file():
        store = ChunkStore(path)
        planning.check_store(folder, store)
        return StoreShape(path, store.width, store.staged_bytes())
    if isinstance(cfg.data, SyntheticDataConfig):
        d = cfg.data
        return StoreShape(
            path, d.width, staged_bytes(min(d.rows_per_chunk, d.rows), d.width, d.dtype)
        )
    raise SweepError(
        f"{path} holds no chunk store yet, so its width is unknown: `sweep run --plan` plans on "
        "an existing store (harvest it first with `sweep harvest`, or point data.path at one)"
    )


def _rows(cfg: SweepConfig, p: SweepPlan, res: launcher.Resources, shape: StoreShape) -> list[dict]:
    shares = execution.gpu_shares(cfg, p.ensembles, res, shape.staged) if res.on_gpu else {}
    t, buffers = cfg.train, planning.batch_buffers(cfg)
    rows = []
    for e in p.ensembles:
        per = grid.bytes_per_member(shape.width, e.dict_size, t.batch_size, t.dtype, buffers)
        memory = len(e.members) * per + (shape.staged if res.on_gpu else 0)
        ask = f"{shares[e]:g} GPU" if res.on_gpu else f"{res.num_cpus:g} CPU"
        rows.append(
            {
                "ensemble": e.ensemble_id,
                "dict_ratio": f"{e.dict_ratio:g}",
                "dict_size": e.dict_size,
                "members": len(e.members),
                "asks": ask,
                "memory": f"{memory / 2**30:.2f} GiB",
                "runs": ", ".join(m.run_id for m in e.members),
            }
        )
    return rows


def print_preview(v: Preview) -> None:
    from rich.console import Console
    from rich.table import Table

    p, res = v.plan, v.res
    where = (
        f"GPUs ({res.gpus:g} in the Ray cluster, {res.gpu_bytes / 2**30:.1f} GiB each planned)"
        if res.on_gpu
        else f"CPUs ({res.device_bytes / 2**30:.1f} GiB per ensemble planned)"
    )
    console = Console(width=200)
    table = Table(title=f"sweep plan: {v.cfg.sweep_dir} (nothing trained or written)")
    cols = ["ensemble", "dict_ratio", "dict_size", "members", "asks", "memory", "runs"]
    for c in cols:
        table.add_column(c, overflow="fold")
    for row in v.rows:
        table.add_row(*(str(row[c]) for c in cols))
    console.print(table)
    todo = sum(len(e.members) for e in p.ensembles)
    console.print(
        f"{len(p.runs)} runs: {len(p.skipped)} already done, {todo} to train in "
        f"{len(p.ensembles)} ensemble(s) on {where}, compute dtype {v.cfg.train.dtype}"
    )
