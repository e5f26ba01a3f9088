"""An ensemble that runs out of GPU memory continues in the same ``sweep run``: first on a
GPU of its own if it shared one, then split in halves, down to one member; later plans of
the sweep keep to the limit it learned. The out-of-memory is raised for real inside the Ray
workers of a real ``sweep run`` subprocess (``tests/hooks``), on Ray's fake GPUs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from sweep import grid, planning
from sweep.cli import compose
from sweep.config import to_sweep_config
from sweep.errors import SweepError
from sweep.io import atomic_write_json, read_json
from sweep.sweepdir import MANIFEST, SweepFolder
from tests.test_faults import env, finish, start

HOOK = Path(__file__).parent / "hooks"


def events(run: Path) -> list[dict]:
    path = run / "events.jsonl"
    return [json.loads(ln) for ln in path.read_text().splitlines()] if path.exists() else []


def test_an_ensemble_out_of_gpu_memory_gets_a_gpu_then_halves_and_finishes(
    tmp_path, tmp_path_factory
):
    """Two ensembles of two members, each on half of one (fake) GPU, fail their 15th step
    (checkpointed at step 10): each continues on a whole GPU, fails its 15th step again
    (step 25), and continues as two one-member ensembles from step 20. The sweep ends done,
    and the limit is recorded."""
    sw = tmp_path / "sw"
    hook = {"PYTHONPATH": str(HOOK), "SWEEP_TEST_OOM_ABOVE": "1", "SWEEP_TEST_OOM_AT": "15"}
    shared = ["launch.num_gpus=1", "launch.gpus_per_ensemble=0.5", "train.device=auto"]
    shared += ["train.epochs=1"]  # (74 steps: more only cost time)
    code, out = finish(
        start(sw, tmp_path_factory.getbasetemp() / "oom", *shared, environ=hook), timeout=400
    )
    assert code == 0, out
    said = (sw / "sweep.log").read_text()
    assert said.count("ran out of GPU memory beside others on its GPU (share 0.5)") == 2, said
    assert said.count("ran out of GPU memory with 2 members: it continues from its") == 2, said
    manifest = json.loads((sw / "manifest.json").read_text())
    assert manifest["member_limits"] == {"4.0": 1, "8.0": 1}
    assert manifest["state"] == "done"
    for run in (sw / "runs").iterdir():
        assert (run / "DONE").is_file(), run.name
        assert json.loads((run / "placement.json").read_text())["gpu_share"] == 1.0
        ensemble = manifest["runs"][run.name]["ensemble"]
        assert ensemble.endswith((".0", ".1")), ensemble
        (oom,) = [e for e in events(run) if e["event"] == "out_of_memory"]
        assert oom["members"] == 2 and oom["continues_in"] == ensemble
        timings = json.loads((run / "placement.json").read_text())["timings"]
        assert timings["steps"] == 74 - 20  # failed at 15 (after 10), at 25 (after 20)
    status = subprocess.run(  # (env: the process's own, not a COLUMNS a library set in it)
        [sys.executable, "-m", "sweep", "status", str(sw)],
        env=env(),
        capture_output=True,
        text=True,
    )
    assert "learned when one ran out of GPU memory: dict ratio 4: 1, dict ratio 8: 1" in (
        status.stdout
    ), status.stdout


def test_an_evaluation_out_of_gpu_memory_is_evaluated_in_halves(tmp_path, tmp_path_factory):
    """``sweep evaluate`` whose two-member ensembles run out of GPU memory evaluating: each
    is evaluated as two one-member ensembles, to the metrics training wrote; the sweep
    learns no member limit (evaluation's memory is not training's) and its manifest keeps
    the ensembles the runs trained in."""
    sw, base = tmp_path / "sw", tmp_path_factory.getbasetemp()
    gpu = ["launch.num_gpus=1", "launch.gpus_per_ensemble=1", "train.device=auto"]
    code, out = finish(start(sw, base / "oom-ev", *gpu, "train.epochs=1"), timeout=300)
    assert code == 0, out
    trained = {r.name: read_json(r / "metrics.json") for r in (sw / "runs").iterdir()}
    manifest = read_json(sw / MANIFEST)
    hook = {"PYTHONPATH": str(HOOK), "SWEEP_TEST_OOM_EVAL_ABOVE": "1"}
    cmd = [sys.executable, "-m", "sweep", "evaluate", str(sw)]
    done = subprocess.run(cmd, env=env(**hook), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    said = (sw / "sweep.log").read_text()
    assert said.count("ran out of GPU memory with 2 members while evaluated: it is") == 2, said
    assert {r.name: read_json(r / "metrics.json") for r in (sw / "runs").iterdir()} == trained
    after = read_json(sw / MANIFEST)
    assert "member_limits" not in after and after["runs"] == manifest["runs"]


def test_a_run_out_of_gpu_memory_while_evaluated_teaches_no_training_limit(
    tmp_path, tmp_path_factory
):
    """A training ensemble that runs out of GPU memory only once training ended, evaluating
    its members, is evaluated on a GPU of its own, then in halves, and finishes; the sweep
    learns no member limit from it (later ensembles of its ratios were split for nothing,
    and on a GPU a partly trained one resumed in halves was no longer bit-identical)."""
    sw = tmp_path / "sw"
    hook = {"PYTHONPATH": str(HOOK), "SWEEP_TEST_OOM_EVAL_ABOVE": "1"}
    shared = ["launch.num_gpus=1", "launch.gpus_per_ensemble=0.5", "train.device=auto"]
    code, out = finish(
        start(sw, tmp_path_factory.getbasetemp() / "oom-tr-ev", *shared, "train.epochs=1",
              environ=hook), timeout=400,
    )  # fmt: skip
    assert code == 0, out
    said = (sw / "sweep.log").read_text()
    assert said.count("ran out of GPU memory with 2 members while evaluated: it is") == 2, said
    manifest = read_json(sw / MANIFEST)
    assert "member_limits" not in manifest and manifest["state"] == "done"
    assert all((run / "DONE").is_file() for run in (sw / "runs").iterdir())


def test_an_ensemble_split_after_running_out_keeps_the_commands_grid(tiny_store, tmp_path):
    """The halves of an ensemble re-recorded mid-run are some of the grid, not the grid
    (``sweep status`` tells runs outside the last grid by it)."""
    folder = SweepFolder(tmp_path / "sw")
    folder.path.mkdir()
    specs = [{"run_id": r} for r in ("a", "b", "c")]
    folder.write_manifest(specs, {}, tiny_store, grid=True)
    folder.write_manifest(specs[:1], {"a": "r2-e0.0"}, tiny_store)
    assert folder.last_grid() == {"a", "b", "c"}


def test_a_learned_member_limit_caps_later_plans_unless_max_members_is_set(tiny_store, tmp_path):
    folder = SweepFolder(tmp_path / "sw")
    folder.path.mkdir()
    folder.write_manifest([], {}, tiny_store)
    folder.record_member_limit(2.0, 3)
    folder.record_member_limit(2.0, 2)  # the smallest stays
    folder.record_member_limit(2.0, 5)
    folder.write_manifest([], {}, tiny_store)  # a later plan's manifest keeps it
    assert folder.member_limits() == {2.0: 2}

    def sizes(*extra: str) -> list[int]:
        overrides = [f"sweep_dir={folder.path}", "grid.l1=[1e-3,3e-3,1e-2,3e-2]", *extra]
        cfg = to_sweep_config(compose([*overrides, "grid.dict_ratio=[1,2]", "grid.seeds=1"]))
        p = planning.plan(cfg, tiny_store.width, 1e12, on_gpu=False)
        return [len(e.members) for e in p.ensembles]

    assert sizes() == [2, 2, 4]  # ratio 2 capped, ratio 1 as the memory model fits
    assert sizes("grid.max_members=4") == [4, 4]


@pytest.mark.parametrize(
    "damaged",
    [{"2.0": "many"}, {"two": 3}, ["2.0"], {"2.0": 0}, {"2.0": 2.7}, {"2.0": True}, {"2.0": 1e400}],
)
def test_a_hand_damaged_member_limit_is_one_line_naming_the_key(tiny_store, tmp_path, damaged):
    folder = SweepFolder(tmp_path / "sw")
    folder.path.mkdir()
    folder.write_manifest([], {}, tiny_store)
    manifest = read_json(folder.path / MANIFEST)
    atomic_write_json(folder.path / MANIFEST, {**manifest, "member_limits": damaged})
    with pytest.raises(SweepError, match="'member_limits'.*delete that key") as err:
        folder.member_limits()
    assert "\n" not in str(err.value)


def test_a_learned_limit_only_ever_lowers_the_memory_models_budget(tiny_store, tmp_path):
    """A limit learned on a GPU never lifts the CPU's default cap (8 members)."""
    folder = SweepFolder(tmp_path / "sw")
    folder.path.mkdir()
    folder.write_manifest([], {}, tiny_store)
    folder.record_member_limit(2.0, 12)
    l1s = ",".join(f"{(i + 1) * 1e-3:.3f}" for i in range(24))
    overrides = [f"sweep_dir={folder.path}", f"grid.l1=[{l1s}]", "grid.dict_ratio=[2]"]
    cfg = to_sweep_config(compose([*overrides, "grid.seeds=1"]))
    p = planning.plan(cfg, tiny_store.width, 1e12, on_gpu=False)
    assert [len(e.members) for e in p.ensembles] == [8, 8, 8]


def test_halves_are_what_a_plan_capped_at_half_would_group(tiny_store):
    runs = grid.expand([1e-3, 3e-3, 1e-2, 3e-2, 1e-1], [2.0], 1, tiny_store.width, "untied")
    (whole,) = grid.group(runs, {2.0: 8})
    parts = planning.halves(whole)
    assert [p.ensemble_id for p in parts] == ["r2-e0.0", "r2-e0.1"]
    assert [p.members for p in parts] == [tuple(runs[:3]), tuple(runs[3:])]
    # ids other runs keep (an earlier split of an ensemble numbered the same) are skipped
    taken = {"r2-e0.0", "r2-e0.2"}
    assert [p.ensemble_id for p in planning.halves(whole, taken)] == ["r2-e0.1", "r2-e0.3"]
