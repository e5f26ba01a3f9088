"""A researcher's first hour: refused runs leave nothing behind, errors are one line with the
fix, help is the subcommand's own, interrupts say what happened, and the terminal shows
sweep's output, not third-party chatter. CLI checks run the real ``sweep`` command."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

import sweep
from sweep import rundir, sweepdir
from sweep.cli import main
from sweep.sweepdir import SweepFolder
from tests.conftest import refused
from tests.test_sweep_e2e import TINY

GRID = ["grid.l1=[1e-3,1e-1]", "grid.dict_ratio=[1,2]"]


def cli(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """The real ``sweep`` command in a fresh process."""
    e = dict(os.environ if env is None else env, TQDM_DISABLE="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "sweep", *args]
    return subprocess.run(cmd, env=e, capture_output=True, text=True, timeout=timeout)


def snapshot(folder: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def finished(ray_cluster, tmp_path_factory) -> Path:
    sw = tmp_path_factory.mktemp("first-hour") / "sw"
    assert main(["run", f"sweep_dir={sw}", *TINY, *GRID]) == 0
    return sw


# ------------------------------------------------------------------ refused runs write nothing


def test_refused_run_leaves_no_new_folder(finished, tmp_path, capsys):
    store = finished / "store"
    sw = tmp_path / "new"
    args = [f"sweep_dir={sw}", "data=chunks", f"data.path={store}", "data.eval_rows=10000000"]
    assert main(["run", *args, *GRID]) == 2
    err = capsys.readouterr().err
    assert "data.eval_rows=10000000" in err and len(err.strip().splitlines()) == 1
    assert not sw.exists()


def test_refused_run_leaves_an_existing_sweep_untouched(finished, tmp_path, capsys):
    sw = tmp_path / "sw"
    shutil.copytree(finished, sw)
    before = snapshot(sw)
    assert main(["run", f"sweep_dir={sw}", *TINY, *GRID, "train.lr=0.5"]) == 2
    assert "different settings" in capsys.readouterr().err
    assert snapshot(sw) == before
    assert main(["run", f"sweep_dir={sw}", *TINY, *GRID]) == 0  # the corrected command runs


def test_export_of_a_sweep_with_unfinished_runs_is_refused(finished, tmp_path, capsys):
    sw = tmp_path / "sw"
    shutil.copytree(finished, sw)
    (rundir.run_dir(sw, "r1-l1_1e-03-s0") / rundir.DONE).unlink()
    out = tmp_path / "out"
    assert main(["export", str(sw), "--to", "saelens", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "1 of 4 runs" in err and "--finished" in err and "\n" not in err
    assert not out.exists()
    assert main(["export", str(sw), "--to", "saelens", str(out), "--finished"]) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "r1-l1_1e-01-s0",
        "r2-l1_1e-01-s0",
        "r2-l1_1e-03-s0",
    ]
    assert "skipped 1 unfinished run(s): r1-l1_1e-03-s0" in " ".join(
        capsys.readouterr().err.split()
    )


# ------------------------------------------------------------------ one-line errors and help


@pytest.mark.parametrize(
    "args, needle",
    [
        ([], "sweep_dir is required: pass sweep_dir=outputs/my-sweep"),
        (["sweep_dir=x", "grid.l1=0.01"], "grid.l1 takes a list: write grid.l1='[0.01]'"),
        (["sweep_dir=x", "grid.l1=1e-2,2e-2"], "grid.l1=1e-2,2e-2 has a comma outside brackets"),
        (["sweep_dir=x", "--plan", "grid.l1=0.01"], "grid.l1 takes a list"),  # after an option
        (["sweep_dir=x", "launch.device_memory_gb=inf"], "launch.device_memory_gb must be finite"),
        (["sweep_dir=x", "train.eps=inf"], "train.eps must be finite"),
        (["sweep_dir=x", "launch.num_cpus=0"], "launch.num_cpus must be >= 1"),
        (["sweep_dir=x", "data=harvest"], "data.model is required: pass data.model=..."),
        (["sweep_dir=x", "train.lr=null"], "train.lr cannot be null; give it a value"),
        (["sweep_dir=x", "~train.lr"], "cannot delete train.lr (~train.lr): every field has"),
        (["sweep_dir=x", "~grid.l1"], "cannot delete grid.l1 (~grid.l1): every field has"),
        (["sweep_dir=x", "launch=cluster", "launch.address=null"], "launch=cluster joins a run"),
        (["sweep_dir=x", "launch=cluster", "launch.address="], "launch=cluster joins a running"),
        (["sweep_dir=x", "grid.l1='[1e-2]'"], "grid.l1 takes a list, got the text '[1e-2]' ("),
        (["sweep_dir=x", "grid.l1=[]"], "grid.l1 is empty: give at least one value, e.g. gri"),
        (["sweep_dir=x", "grid.l1="], "grid.l1 takes a list: write grid.l1='[1e-3,3e-3]' ("),
        (["sweep_dir=x", "launch.name=foo"], "launch.name must be local or cluster, got 'foo'"),
        (["sweep_dir=x", "grid.l1=range(1,3)"], "grid.l1 takes a list, not Hydra's sweep synt"),
        (["sweep_dir=x", "grid.k=choice(8,16)"], "grid.k takes a list, not Hydra's sweep syntax"),
        (["sweep_dir=x", "train=null"], "a config group (data, grid, launch, logger, sae, train)"),
        (["sweep_dir=x", "data.normalize=abc"], "cannot set data.normalize to 'abc' (Value"),
        (["sweep_dir=x", "data.name=chunks"], "data.name='chunks' does not name this source"),
        (
            ["sweep_dir=x", "train.seed=-1"],
            "train.seed must be in [0, 2**63), got -1; give train.seed such a value, or leave it out",
        ),
        (["sweep_dir=x", "data.seed=18446744073709551616"], "data.seed must fit in 64 bits"),
        (
            [
                "sweep_dir=x",
                "data=harvest",
                "data.model=m",
                "data.dataset=d",
                "data.rows=9",
                "data.hook=a",
                "data.seed=-1",
            ],
            "data.seed must be >= 0, got -1; give data.seed such a value, or leave it out",
        ),
        (
            ["sweep_dir=x", "grid.dict_ratio=[0]"],
            "grid.dict_ratio values must be > 0, got 0.0; give",
        ),
        (["sweep_dir=x", "launch.num_cpus=100000"], "each ensemble would run 100000 torch threads"),
        (["sweep_dir=x", "train.threads=100000"], "each ensemble would run 100000 torch threads"),
        (["sweep_dir=x", "data.rows=1000000000000"], "x/store needs about 232.83 TiB more"),
        (
            ["sweep_dir=x", "data.n_features=1000000000"],
            "data.n_features=1,000,000,000 at data.width=64 needs about",
        ),  # fmt: skip
    ],
)
def test_config_mistakes_are_one_line_with_the_fix(args, needle, capsys):
    assert main(["run", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {needle}") and "\n" not in err
    assert not Path("x").exists()  # refused before anything is written


def test_a_symlink_loop_as_sweep_dir_is_one_line(tmp_path, capsys):
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    assert main(["run", "--plan", f"sweep_dir={tmp_path / 'a'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {tmp_path / 'a'} cannot be resolved (") and "\n" not in err


def test_a_bound_of_a_required_or_top_level_field_names_its_fix(capsys):
    """A required field has no default to leave it out for; ``sweep harvest``'s own fields
    (not in a group) get their fix too."""
    harvest = ["harvest", "model=m", "dataset=d", "hooks=[a]", "store_dir=h"]
    for args, said in [
        ([*harvest, "rows=0"], "rows must be > 0, got 0; give rows such a value"),
        ([*harvest, "rows=9", "seed=-1"], "seed must be >= 0, got -1; give seed such a value, "
                                          "or leave it out for its default"),
    ]:  # fmt: skip
        assert main(args) == 2
        assert capsys.readouterr().err.strip() == f"error: {said}"
        assert not Path("h").exists()


def test_a_required_field_names_one_fix(capsys):
    """Not also "leave it out for its default": it has none."""
    assert main(["run", "sweep_dir=x", "data=chunks"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: data.path is required for data=chunks: pass data.path=/path/to/store"


def test_paths_that_are_files_are_refused_before_any_work(tmp_path, short_tmp, capsys):
    (afile := short_tmp / "f").write_text("mine")  # (short: also a launch.temp_dir)
    for key, needle in [
        ("data.path", f"data.path {afile} is a file; give a folder for the synthetic store"),
        ("launch.temp_dir", f"launch.temp_dir {afile} cannot be used for Ray's session"),
    ]:
        assert main(["run", f"sweep_dir={tmp_path / 'sw'}", f"{key}={afile}"]) == 2
        assert capsys.readouterr().err.strip().startswith(f"error: {needle}")
        assert not (tmp_path / "sw").exists() and afile.read_text() == "mine"


def test_harvest_mistakes_name_harvests_own_command(tmp_path, capsys):
    base = ["harvest", "model=m", "dataset=d", "rows=10", "hooks=[h]"]
    assert main([*base, f"store_dir={tmp_path / 's'}", "contxt=5"]) == 2
    assert "run 'sweep harvest --cfg job' to list the fields" in capsys.readouterr().err
    (tmp_path / "f").write_text("mine")
    assert main([*base, f"store_dir={tmp_path / 'f'}"]) == 2
    assert f"store_dir {tmp_path / 'f'} is a file" in capsys.readouterr().err
    assert (tmp_path / "f").read_text() == "mine"


def test_subcommand_help_and_usage_are_their_own():
    helped = cli("run", "--help")
    assert helped.returncode == 0 and helped.stdout.startswith("usage: sweep run")
    assert "sweep harvest model=" not in helped.stdout
    bad = cli("export", "x", "--to", "hf", "out")
    assert bad.returncode == 2
    (line,) = bad.stderr.strip().splitlines()  # one line, as every other mistake
    assert line.startswith("error: argument --to: invalid choice: 'hf'")
    assert line.endswith("see 'sweep export --help'")
    for command in ("resume", "evaluate"):  # (their overrides are optional: not named)
        bare = cli(command)
        assert bare.returncode == 2
        assert bare.stderr.strip() == (
            f"error: the following arguments are required: sweep_dir; see 'sweep {command} --help'"
        )
    version = cli("--version")
    assert (version.returncode, version.stdout) == (0, f"sweep {sweep.__version__}\n")


# ------------------------------------------------------------------ the Python API


def test_python_api_is_discoverable_and_takes_arrays(finished):
    assert {"load_run", "load_sweep", "SAE", "Sweep"} <= set(dir(sweep))
    sae = sweep.load_run(rundir.run_dir(finished, "r2-l1_1e-03-s0"))
    assert not any(p.requires_grad for p in sae.parameters())
    x = np.random.default_rng(0).normal(size=(5, 16)).astype(np.float32)
    torch.testing.assert_close(sae.encode(x), sae.encode(torch.from_numpy(x)))
    assert sae.decode(sae.encode(x.tolist())).shape == (5, 16)
    with pytest.raises(ValueError, match=r"shape \(\.\.\., 16\)"):
        sae.encode(np.zeros((5, 7), dtype=np.float32))
    with pytest.raises(TypeError, match="tensor or array"):
        sae.encode("activations")
    with pytest.raises(TypeError, match="activations must be real, got torch.complex64"):
        sae(torch.zeros(5, 16, dtype=torch.complex64))


def test_an_sae_splices_into_a_model_of_any_float_dtype_and_device(finished):
    """Results come back in the input's dtype (a bfloat16 model's hook needs bfloat16) and
    shape, per-head (..., heads, d_head) inputs too; the math runs in float32 either way."""
    sae = sweep.load_run(rundir.run_dir(finished, "r2-l1_1e-03-s0"))
    x = torch.randn(3, 5, 16)
    want = sae(x)
    for dtype in (torch.bfloat16, torch.float16, torch.float64):
        got = sae(x.to(dtype))
        assert got.dtype == dtype and got.shape == x.shape
        torch.testing.assert_close(got, sae(x.to(dtype).float()).to(dtype), atol=0, rtol=0)
        assert sae.encode(x.to(dtype)).dtype == sae.decode(sae.encode(x).to(dtype)).dtype == dtype
    torch.testing.assert_close(sae(x.double()).float(), want)
    heads = x.reshape(3, 5, 4, 4)  # (batch, pos, heads, d_head): a hook_z as the model gives it
    with pytest.raises(ValueError, match=r"shape \(\.\.\., 16\)"):
        sae(heads)  # (this SAE's store is no per-head hook's: (..., 4, 4) is a mistake)
    run = rundir.RunFolder(rundir.run_dir(finished, "r2-l1_1e-03-s0"))
    z_cfg = {**run.cfg(), "provenance": {"hook": "blocks.0.attn.hook_z"}}
    z_sae = sweep.SAE(run.weights(), z_cfg)
    torch.testing.assert_close(z_sae(heads), want.reshape(heads.shape), atol=0, rtol=0)
    torch.testing.assert_close(z_sae.encode(heads), sae.encode(x), atol=0, rtol=0)
    with pytest.raises(ValueError, match=r"codes must have shape \(\.\.\., 32\)"):
        z_sae.decode(torch.zeros(2, 4, 8))  # (codes are never per-head)
    with pytest.raises(ValueError, match=r"shape \(\.\.\., 16\)"):
        sae(torch.zeros(5, 3, 4))


def test_a_sweep_iterates_its_run_ids_and_gives_its_heldout_rows(finished, tmp_path):
    from sweep.activations.store import ChunkStore
    from sweep.errors import SweepError

    s = sweep.load_sweep(finished)
    assert list(s) == s.run_ids and "r2-l1_1e-03-s0" in s and "nope" not in s
    assert ["r2-l1_1e-03-s0"] not in s
    with pytest.raises(SweepError, match="a sweep is indexed by run id .*not slice"):
        s[0:2]
    assert len(s) == len(s.run_ids)
    rows = s.heldout()
    cfg = SweepFolder(finished).load_config()
    assert rows.dtype == torch.float32 and rows.shape == (cfg["data"]["eval_rows"], 16)
    sae = s["r2-l1_1e-03-s0"]
    fvu = ((sae(rows) - rows) ** 2).sum() / ((rows - rows.mean(0)) ** 2).sum()
    assert abs(fvu.item() - s.table.loc["r2-l1_1e-03-s0", "fvu"]) < 1e-4
    store = Path(SweepFolder(finished).manifest()["store"]["path"])
    moved = tmp_path / "moved"
    shutil.copytree(store, moved)
    torch.testing.assert_close(s.heldout(store=moved), rows)
    with pytest.raises(SweepError, match="no chunk store at .*pass where it lies now"):
        s.heldout(store=tmp_path / "nowhere")
    other = ChunkStore(moved)
    other.manifest["created"] = "another"  # (another content: another identity)
    (moved / "manifest.json").write_text(json.dumps(other.manifest))
    with pytest.raises(SweepError, match="is not the store sweep .* trained on"):
        s.heldout(store=moved)
    elsewhere = tmp_path / "sweep-moved"  # a sweep whose store sits inside it, moved
    shutil.copytree(finished, elsewhere)
    assert store == finished / "store"  # (the default: inside the sweep folder)
    folder = SweepFolder(elsewhere)
    manifest = folder.manifest()
    manifest["store"]["path"] = str(tmp_path / "gone")
    (elsewhere / "manifest.json").write_text(json.dumps(manifest))
    torch.testing.assert_close(sweep.load_sweep(elsewhere).heldout(), rows)
    manifest["store"]["path"] = str(moved)  # another store where it was recorded: its own
    (elsewhere / "manifest.json").write_text(json.dumps(manifest))
    torch.testing.assert_close(sweep.load_sweep(elsewhere).heldout(), rows)
    (elsewhere / "config.yaml").unlink()  # (as a damaged one's message says): the runs' specs
    torch.testing.assert_close(sweep.load_sweep(elsewhere).heldout(), rows)


def test_the_python_api_takes_paths_and_devices_as_a_notebook_gives_them(
    finished, tmp_path, monkeypatch
):
    """A sweep opened by a relative path survives a later chdir (Jupyter's %cd: its runs
    were 'not finished'); '~' is the home folder; cpu:0 is the CPU; other devices are one
    line at load time (safetensors' or torch's own errors at the first load before)."""
    from sweep.errors import SweepError

    rid = "r2-l1_1e-03-s0"
    monkeypatch.chdir(finished.parent)
    s = sweep.load_sweep(finished.name)
    monkeypatch.chdir(tmp_path)
    assert s.sae(rid).d_sae == 32 and s.heldout().shape[1] == 16
    monkeypatch.setenv("HOME", str(finished.parent))
    assert sweep.load_run(f"~/{finished.name}/runs/{rid}", device="cpu:0").d_sae == 32
    assert sweep.load_sweep(f"~/{finished.name}").path == finished
    for device in ("meta", "mps"):
        with pytest.raises(SweepError, match=f"device='{device}' is not supported here; pass"):
            sweep.load_sweep(finished, device=device)


def test_a_sweeps_table_has_its_columns_before_any_run_finishes(finished, tmp_path):
    """``s.table.explained_variance`` mid-sweep: a column of empty values, not a KeyError
    (those columns came only with the first finished run)."""
    from sweep.sweepdir import RUN_METRICS

    metrics = json.loads((rundir.run_dir(finished, "r2-l1_1e-03-s0") / rundir.METRICS).read_text())
    assert set(RUN_METRICS) <= set(metrics)  # every finished run has them
    copy = tmp_path / "sw"
    shutil.copytree(finished, copy)
    for run in (copy / "runs").iterdir():
        (run / rundir.DONE).unlink()
    done, running = (set(sweep.load_sweep(d).table.columns) for d in (finished, copy))
    assert done <= running, done - running
    assert sweep.load_sweep(copy).table["explained_variance"].isna().all()


def test_load_run_on_the_wrong_folder_names_the_right_one(finished, tmp_path):
    from sweep.errors import SweepError

    with pytest.raises(
        SweepError, match=r"no folder .*; pass a run folder \(SWEEP_DIR/runs/<run_id>\)"
    ):
        sweep.load_run(tmp_path / "missing")
    with pytest.raises(SweepError, match=r"is a sweep folder, not a run folder; .*load_sweep\("):
        sweep.load_run(finished)
    with pytest.raises(SweepError, match="has no cfg.json: not a finished sweep run folder; pass"):
        sweep.load_run(tmp_path)
    weights = rundir.run_dir(finished, "r1-l1_1e-01-s0") / rundir.WEIGHTS
    with pytest.raises(SweepError, match=r"is a file; pass the run folder that holds it \("):
        sweep.load_run(weights)
    with pytest.raises(FileNotFoundError):  # (what it raised before it named the fix)
        sweep.load_run(tmp_path)
    exported = tmp_path / "exported"
    assert main(["export", str(finished), "--to", "saelens", str(exported)]) == 0
    with pytest.raises(SweepError, match="is a run exported for SAELens .*load_from_disk"):
        sweep.load_run(exported / "r1-l1_1e-01-s0")
    training = tmp_path / "training"  # a run as it trains (or stopped): no final files yet
    training.mkdir()
    shutil.copy(rundir.run_dir(finished, "r1-l1_1e-01-s0") / rundir.SPEC, training)
    with pytest.raises(SweepError, match=r"is not finished \(no DONE\); its sweep finishes it"):
        sweep.load_run(training)
    with pytest.raises(SweepError, match=r"sweep .* has no run r9-x; 'sweep status .*' lists"):
        sweep.load_run(finished / rundir.RUNS / "r9-x")  # (a mistyped id)
    pending = rundir.run_dir(finished, "r2-l1_1e-01-s0")
    moved = tmp_path / "moved"
    shutil.move(pending, moved)  # (as before the run started)
    try:
        with pytest.raises(SweepError, match=r"run r2-l1_1e-01-s0 of sweep .* has not started"):
            sweep.load_run(pending)
    finally:
        shutil.move(moved, pending)
    planned = tmp_path / "planned"  # planned, its runs/ not made yet (a few seconds)
    planned.mkdir()
    shutil.copy(finished / "manifest.json", planned)
    with pytest.raises(SweepError, match=r"run r2-l1_1e-01-s0 of sweep .* has not started"):
        sweep.load_run(planned / rundir.RUNS / "r2-l1_1e-01-s0")


def test_damaged_weights_are_one_line_for_the_api_and_cross_dictionary_code(finished, tmp_path):
    import shutil

    from sweep import crossdict
    from sweep.errors import SweepError

    run = tmp_path / "run"
    shutil.copytree(rundir.run_dir(finished, "r2-l1_1e-03-s0"), run)
    weights = run / rundir.WEIGHTS
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF  # a flipped bit in a tensor: same size, wrong content
    weights.write_bytes(bytes(data))
    with pytest.raises(SweepError, match="fails its checksum; re-run its sweep"):
        sweep.load_run(run)
    weights.write_bytes(b"\0" * len(data))  # the header itself destroyed
    with pytest.raises(SweepError, match="unreadable .*re-run its sweep"):
        crossdict.unit_atoms(run, torch.device("cpu"))
    copy = tmp_path / "sweep"
    shutil.copytree(finished, copy)
    weights = rundir.run_dir(copy, "r2-l1_1e-03-s0") / rundir.WEIGHTS
    weights.write_bytes(weights.read_bytes()[:100])  # truncated: its DONE is there
    with pytest.raises(SweepError, match=f"has 100 bytes, {rundir.DONE} recorded"):
        sweep.load_sweep(copy).sae("r2-l1_1e-03-s0")


# ------------------------------------------------------------------ interrupts say what happened


def test_status_and_report_agree_on_state_and_order(finished, tmp_path):
    from sweep.report import build_report
    from sweep.status import status_rows

    sw = tmp_path / "sw"
    shutil.copytree(finished, sw)
    run = SweepFolder(sw).run("r1-l1_1e-01-s0")
    (run.path / rundir.DONE).unlink()
    (run.path / "checkpoint-000000010.safetensors").write_bytes(b"")  # a checkpoint exists
    run.mark_interrupted(10)
    _, rows = build_report(sw, log_media=False)
    report = [(r["run_id"], r["state"]) for r in rows]
    status = [(r["run_id"], r["state"]) for r in status_rows(sw)]
    assert report == status and ("r1-l1_1e-01-s0", "interrupted") in status


def test_a_stop_after_every_run_ended_is_not_an_interrupt(caplog):
    """(It said "asking every ensemble to checkpoint and stop", then ended done in silence.)"""
    from sweep.execution import Outcome
    from sweep.stop import DriverSignals

    signals = DriverSignals(lambda s: None)
    signals.signum = 2
    outcome = Outcome(signals=signals, all_final=True)
    assert outcome.state == "done"
    with caplog.at_level("WARNING", logger="sweep.execution"):
        outcome.raise_if_unfinished()  # no Interrupted: nothing was left to stop
    assert "every run had finished before the stop (SIGINT) took effect: the sweep is done" in (
        caplog.text
    )
    outcome.all_final = False
    assert outcome.state == "interrupted"


# ------------------------------------------------------------------ no third-party chatter


def test_terminal_shows_sweeps_output_only(tmp_path, tmp_path_factory):
    env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"}  # Ray's default: token
    args = [f"sweep_dir={tmp_path / 'sw'}", *TINY, "grid.l1=[1e-2]", "grid.dict_ratio=[1]"]
    done = cli(
        "run",
        *args,
        f"launch.temp_dir={tmp_path_factory.getbasetemp() / 'rq'}",
        "launch.num_cpus=1",
        env=env,
    )
    assert done.returncode == 0, done.stderr
    assert "Token authentication" not in done.stderr
    assert "\x1b[" not in done.stderr and "Loading weights" not in done.stderr
    noise = [
        ln for ln in done.stderr.splitlines() if ln.strip() and not ln.startswith(("INFO", " "))
    ]
    assert not noise, done.stderr


def test_log_lines_into_a_file_are_neither_wrapped_nor_padded(capfd):
    """A SLURM job's output file (stderr not a terminal) gets each message on one line as
    written: rich wrapped them at 80 columns (a long path cut mid-word) and padded each."""
    from sweep.cli import _setup_logging

    path = "/scratch/" + "a-long-folder-name/" * 8 + "store"
    _setup_logging(verbose=False)
    logging.getLogger("sweep.driver").warning("the store is not at %s", path)
    lines = capfd.readouterr().err.splitlines()
    assert lines == [f"WARNING  the store is not at {path}"]


def test_cuda_without_a_gpu_is_refused_before_any_work(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    sw = tmp_path / "sw"
    assert main(["run", f"sweep_dir={sw}", *TINY, *GRID, "train.device=cuda"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: train.device=cuda but no CUDA device") and "\n" not in err
    assert not sw.exists()  # not even the store was generated


def test_dtype_auto_is_resolved_and_recorded(finished, tmp_path, capsys):
    from omegaconf import OmegaConf

    from sweep.devices import resolve_compute_dtype

    assert resolve_compute_dtype("auto", on_gpu=True) == "bfloat16"
    assert resolve_compute_dtype("auto", on_gpu=False) == "float32"
    assert resolve_compute_dtype("tf32", on_gpu=True) == "tf32"
    saved = OmegaConf.load(finished / "config.yaml")
    assert saved.train.dtype == "float32"  # what "auto" meant for the CPU runs of this sweep
    sw = tmp_path / "sw"
    shutil.copytree(finished, sw)
    assert main(["run", f"sweep_dir={sw}", *TINY, *GRID, "train.dtype=float32"]) == 0  # same
    saved.train.dtype = "bfloat16"  # as if it had been run on a GPU
    OmegaConf.save(saved, sw / "config.yaml")
    for spec in (sw / "runs").glob(f"*/{rundir.SPEC}"):  # which its runs recorded too
        recorded = json.loads(spec.read_text())
        recorded["train"]["dtype"] = "bfloat16"
        spec.write_text(json.dumps(recorded))
    before = snapshot(sw)
    assert main(["run", f"sweep_dir={sw}", *TINY, *GRID, "train.dtype=float32"]) == 2
    err = capsys.readouterr().err
    assert "train.dtype bfloat16 -> float32" in err
    assert snapshot(sw) == before
    assert main(["run", f"sweep_dir={sw}", *TINY, *GRID]) == 0  # auto keeps the sweep's own
    assert OmegaConf.load(sw / "config.yaml").train.dtype == "bfloat16"


# ------------------------------------------------------------------ damaged or misplaced folders


def test_resume_refuses_a_config_that_disagrees_with_its_runs(finished, tmp_path, capsys):
    sw = tmp_path / "sw"
    shutil.copytree(finished, sw)
    text = (sw / "config.yaml").read_text()
    cut = "".join(ln for ln in text.splitlines(True) if "grad_clip" not in ln)
    (sw / "config.yaml").write_text(cut)  # a lost line reads as a sweep from before grad_clip
    (rundir.run_dir(sw, "r1-l1_1e-01-s0") / rundir.DONE).unlink()
    before = snapshot(sw)
    assert main(["resume", str(sw)]) == 2
    err = capsys.readouterr().err
    assert "disagrees with what the sweep's runs recorded" in err and "grad_clip 1.0 -> null" in err
    (sw / "config.yaml").write_text(text.replace("device: auto", "device: a", 1))
    assert main(["resume", str(sw)]) == 2
    assert "config.yaml is damaged or was edited (train.device" in capsys.readouterr().err
    (sw / "config.yaml").write_text(text)
    for override, needle in [
        ("train.lr=abc", "cannot set train.lr to 'abc'"),
        ("train.lr", "takes field=value overrides"),
        ("grid.l1=0.5", "grid.l1 takes a list"),
        ("tran.lr=1", "unknown config field 'tran.lr'"),
    ]:
        assert main(["resume", str(sw), override]) == 2
        err = capsys.readouterr().err.strip()
        assert needle in err and "\n" not in err, err
    assert snapshot(sw) == {**before, sw / "config.yaml": text.encode()}  # nothing else written


def test_nothing_is_written_inside_another_sweep(finished, tmp_path, capsys):
    sw = tmp_path / "sw"
    shutil.copytree(finished, sw)
    before = snapshot(sw)
    inner = rundir.run_dir(sw, "r1-l1_1e-01-s0")
    assert main(["run", f"sweep_dir={inner}", *TINY, *GRID]) == 2
    assert f"is inside the runs of the sweep {sw}" in capsys.readouterr().err
    for folder in ("report", "store"):
        assert main(["run", f"sweep_dir={sw / folder / 'new'}", *TINY, *GRID]) == 2
        assert f"is inside the {folder}/ folder of the sweep {sw}" in capsys.readouterr().err
    (tmp_path / "link").symlink_to(sw / "runs")
    assert main(["run", "--plan", f"sweep_dir={tmp_path / 'link' / 'new'}", *TINY, *GRID]) == 2
    assert f"is inside the runs of the sweep {sw}" in capsys.readouterr().err
    project = tmp_path / "project"  # a config.yaml and a runs/ folder do not make a sweep
    (project / "runs").mkdir(parents=True)
    (project / "config.yaml").write_text("lr: 0.1\n")
    for free in (project / "runs" / "x", sw / "ablation", sw / "runs" / ".." / "beside"):
        assert main(["run", "--plan", f"sweep_dir={free}", *TINY, *GRID]) == 0
    for out in (sw, sw / "store"):
        assert main(["export", str(sw), "--to", "saelens", str(out)]) == 2
        assert "is a sweep folder or a chunk store" in capsys.readouterr().err
    assert main(["run", f"sweep_dir={tmp_path / 'x'}", "data=chunks", f"data.path={sw}"]) == 2
    assert f"{sw} is a sweep folder, not a chunk store" in capsys.readouterr().err
    assert snapshot(sw) == before


def test_report_reads_a_run_whose_spec_is_damaged(finished, tmp_path, monkeypatch, capsys):
    from sweep import report

    sw = tmp_path / "sw"
    shutil.copytree(finished, sw)
    (rundir.run_dir(sw, "r2-l1_1e-03-s0") / rundir.SPEC).write_text('{"x": [1,')
    summary = (sw / "summary.csv").read_bytes()
    monkeypatch.setattr(report.os, "access", lambda path, mode: False)  # a read-only sweep
    _, rows = report.build_report(sw, log_media=False, out=tmp_path / "rep")
    row = next(r for r in rows if r["run_id"] == "r2-l1_1e-03-s0")
    assert (row["dict_ratio"], row["state"]) == (2, "done")  # its grid point from the manifest
    assert (sw / "summary.csv").read_bytes() == summary  # the read-only sweep is left as it is
    assert (tmp_path / "rep" / "summary.csv").is_file()


def test_a_missing_or_damaged_sweep_manifest_says_how_to_recover(
    finished, tmp_path, capsys, monkeypatch
):
    sw = tmp_path / "sw"
    shutil.copytree(finished, sw)
    manifest = (sw / "manifest.json").read_bytes()
    (sw / "manifest.json").unlink()
    assert main(["status", str(sw)]) == 2
    said = capsys.readouterr().err
    assert "has no manifest.json (deleted?); re-run the same 'sweep run'" in said
    assert f"(or 'sweep resume {sw}') to write it" in said
    config = (sw / "config.yaml").read_bytes()
    (sw / "config.yaml").unlink()  # its runs say it planned: not "stopped preparing its data"
    (sw / "sweep.log").write_text("INFO sweep.driver: planned\n")
    assert main(["status", str(sw)]) == 2
    said = capsys.readouterr().err  # (resume reads config.yaml: only the run command can help)
    assert "has no manifest.json (deleted?); re-run the same 'sweep run' command to" in said
    (sw / "config.yaml").write_bytes(config)
    (sw / "manifest.json").write_text("{")
    assert main(["report", str(sw)]) == 2
    assert "delete it and re-run the same 'sweep run'" in capsys.readouterr().err
    (sw / "manifest.json").write_bytes(manifest)  # (unreadable proves nothing: no "delete it")
    monkeypatch.setattr(sweepdir, "read_json", refused(sweepdir.read_json, "manifest.json"))
    assert main(["status", str(sw)]) == 2
    err = capsys.readouterr().err
    assert "manifest.json could not be read (PermissionError" in err and "delete" not in err


def test_status_needs_no_torch(finished, tmp_path):
    """``sweep status`` reads JSON and file names only (torch's import alone took 2.5 s)."""
    sw = tmp_path / "sw"
    shutil.copytree(finished, sw)
    run = SweepFolder(sw).run("r1-l1_1e-01-s0")
    (run.path / rundir.DONE).unlink()
    (run.path / "checkpoint-000000010.safetensors").write_bytes(b"")
    code = (
        "import sys; from sweep.cli import main; code = main(['status', sys.argv[1]]); "
        "assert 'torch' not in sys.modules, 'torch imported'; sys.exit(code)"
    )
    done = subprocess.run([sys.executable, "-c", code, str(sw)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "r1-l1_1e-01-s0" in done.stdout


@contextlib.contextmanager
def a_driver_locking_soon(sw: Path) -> Iterator[None]:
    """A new sweep folder whose driver takes its lock 0.1 s from now (a ``sweep run`` just
    started), released after."""
    from sweep.lock import SweepLock

    sw.mkdir()
    lock = SweepLock(sw)
    taken = threading.Timer(0.1, lock.__enter__)
    taken.start()
    try:
        yield
    finally:
        taken.join()
        lock.__exit__(None, None, None)


def test_status_just_after_a_run_made_its_folder_waits_for_its_lock(tmp_path, capsys):
    """A script that starts ``sweep run`` and asks ``sweep status`` at once may find the
    folder made an instant before the driver's lock: starting, not "not a sweep folder"."""
    sw = tmp_path / "sw"
    with a_driver_locking_soon(sw):
        assert main(["status", str(sw), "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["activity"] == "starting"
    (tmp_path / "old").mkdir()
    os.utime(tmp_path / "old", (1, 1))  # (an empty folder made long ago: said at once)
    began = time.monotonic()
    assert main(["status", str(tmp_path / "old")]) == 2
    assert time.monotonic() - began < 0.5 and "is not a sweep folder" in capsys.readouterr().err


def test_a_stop_just_after_a_run_made_its_folder_reaches_its_driver(tmp_path, capsys):
    """``sweep stop`` at once after ``sweep run``: the driver taking its lock an instant
    later is asked to stop (it said there was no driver, or "its sweep is starting")."""
    from sweep.sweepdir import STOP_REQUEST

    sw = tmp_path / "sw"
    with a_driver_locking_soon(sw):
        assert main(["stop", str(sw), "--no-wait"]) == 0
        assert "asked the driver of sweep" in capsys.readouterr().out
        assert json.loads((sw / STOP_REQUEST).read_text())["lock"]["pid"] == os.getpid()


def test_a_sweep_preparing_its_data_is_reported_as_such(tmp_path, capsys):
    """A harvest can take hours before a sweep plans its runs: status says what it is doing
    (exit 0), and once stopped there, status (exit 0) and resume (exit 2) say how to continue."""
    from sweep.lock import SweepLock
    from sweep.status import status_facts

    sw = tmp_path / "sw"
    (sw / "store").mkdir(parents=True)
    for i in range(3):
        (sw / "store" / f"chunk_{i:05d}.npy").write_bytes(b"")
    with SweepLock(sw):  # a live driver, making its store
        assert main(["status", str(sw)]) == 0
        said = capsys.readouterr().out
        assert "its sweep is starting: preparing its data (store: 3 chunks so far)" in said
        assert main(["status", str(sw), "--json"]) == 0
        said = json.loads(capsys.readouterr().out)
        assert said["activity"] == "starting" and said["runs"] == []
        planned = tmp_path / "planned"  # (a sweep that has planned: the same keys)
        planned.mkdir()
        (planned / "manifest.json").write_text(json.dumps({"state": "running", "runs": {}}))
        assert set(said) == set(status_facts(planned))
        assert "its sweep is starting: preparing its data (store: 3 chunks so far)" in said["note"]
    (sw / "sweep.log").write_text("INFO sweep.driver: harvesting\n")
    for argv, code in ((["status", str(sw)], 0), (["resume", str(sw)], 2)):
        assert main(argv) == code
        said = capsys.readouterr()
        said = said.out if code == 0 else said.err
        assert "its sweep stopped while preparing its data (store: 3 chunks so far)" in said
        assert "re-run its 'sweep run' command" in said and "\n" not in said.strip()
    assert main(["status", str(sw), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["activity"] == "stopped"
    (sw / "store" / "manifest.json").write_text("{}")  # the store finished, Ray's start-up not
    assert main(["status", str(sw)]) == 0
    said = capsys.readouterr().out
    assert "its sweep stopped after making its data (store: complete, 3 chunks), before it" in said
    assert said.strip().endswith("to continue: its store is kept")


def test_resume_names_what_its_folder_is_and_takes_no_other_sweep_dir(finished, tmp_path, capsys):
    assert main(["resume", str(tmp_path / "nope")]) == 2
    assert "does not exist or is not a folder" in capsys.readouterr().err
    assert main(["resume", str(finished / "runs" / "r1-l1_1e-01-s0")]) == 2
    assert (
        f"inside the runs of the sweep {finished.resolve()}; pass that" in capsys.readouterr().err
    )
    assert main(["resume", str(finished), f"sweep_dir={tmp_path / 'other'}"]) == 2
    err = capsys.readouterr().err
    assert "sweep resume works on the sweep folder it is given" in err and "\n" not in err.strip()
    assert not (tmp_path / "other").exists()
    copy = tmp_path / "copy"
    shutil.copytree(finished, copy)
    (copy / "config.yaml").unlink()
    assert main(["resume", str(copy)]) == 2
    err = capsys.readouterr().err
    assert f"re-run the 'sweep run ... sweep_dir={copy}' command that started it" in err
