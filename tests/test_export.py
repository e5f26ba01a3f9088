"""`sweep export --to saelens`: SAELens on-disk format, same reconstructions as ours."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import sweep
from sweep import archs, cli, export, rundir
from sweep.activations.store import ChunkStore
from sweep.cli import main
from sweep.errors import SweepError
from sweep.export import export_run, export_sweep
from tests.sweep_builder import build_sweep


@pytest.fixture(scope="module")
def small_sweep(tiny_store, tmp_path_factory):
    """2 L1 x 1 ratio (tied is covered by one extra run below)."""
    return build_sweep(
        tiny_store,
        tmp_path_factory.mktemp("export") / "sw",
        l1s=(1e-3, 3e-2),
        ratios=(2.0,),
        seeds=1,
    )


def raw_rows(store_path: str, n: int = 64) -> torch.Tensor:
    return ChunkStore(store_path).tail_rows(n).float()


def saelens_forward(folder, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SAELens's standard SAE written out: relu((x - b_dec) @ W_enc + b_enc) @ W_dec + b_dec."""
    w = load_file(str(folder / "sae_weights.safetensors"))
    codes = torch.relu((x - w["b_dec"]) @ w["W_enc"] + w["b_enc"])
    return codes, codes @ w["W_dec"] + w["b_dec"]


def test_export_writes_saelens_layout(small_sweep, tiny_store, tmp_path):
    paths = export_sweep(small_sweep, tmp_path / "out")
    assert sorted(p.name for p in paths) == ["r2-l1_1e-03-s0", "r2-l1_3e-02-s0"]
    for p in paths:
        cfg = json.loads((p / "cfg.json").read_text())
        assert cfg["architecture"] == "standard" and (cfg["d_in"], cfg["d_sae"]) == (16, 32)
        assert cfg["apply_b_dec_to_input"] is True and cfg["normalize_activations"] == "none"
        assert cfg["dtype"] == "float32" and cfg["metadata"]["sweep_run_id"] == p.name
        assert cfg["metadata"]["hook_name"] and cfg["metadata"]["model_name"]
        w = load_file(str(p / "sae_weights.safetensors"))
        assert {k: tuple(v.shape) for k, v in w.items()} == {
            "W_enc": (16, 32),
            "b_enc": (32,),
            "W_dec": (32, 16),
            "b_dec": (16,),
        }
        ours = sweep.load_run(str(rundir.run_dir(small_sweep, p.name)))
        x = raw_rows(str(tiny_store.path))
        codes, recon = saelens_forward(p, x)
        torch.testing.assert_close(codes, ours.encode(x))
        torch.testing.assert_close(recon, ours(x))


def test_export_tied_run(tiny_store, tmp_path):
    from sweep import grid
    from sweep.worker import EnsembleJob, train_ensemble
    from tests.conftest import tiny_train

    runs = grid.expand([1e-2], [1.0], 1, tiny_store.width, "tied")
    (ens,) = grid.group(runs, {1.0: 4})
    train_ensemble(
        EnsembleJob(ens, str(tmp_path), str(tiny_store.path), True, 2048, tiny_train(), threads=1)
    )
    out = export_run(rundir.run_dir(tmp_path, runs[0].run_id), tmp_path / "exp")
    x = raw_rows(str(tiny_store.path))
    torch.testing.assert_close(
        saelens_forward(out, x)[1], sweep.load_run(str(rundir.run_dir(tmp_path, runs[0].run_id)))(x)
    )


def test_cli_export_chosen_runs(small_sweep, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    assert (
        main(["export", str(small_sweep), "--to", "saelens", str(out), "--runs", "r2-l1_3e-02-s0"])
        == 0
    )
    assert [p.name for p in out.iterdir()] == ["r2-l1_3e-02-s0"]
    assert f"exported: {out / 'r2-l1_3e-02-s0'}" in capsys.readouterr().out
    twice = ["--runs", "r2-l1_3e-02-s0", "r2-l1_3e-02-s0"]
    assert main(["export", str(small_sweep), "--to", "saelens", str(out), *twice]) == 0
    assert capsys.readouterr().out.count("exported: ") == 1  # once
    monkeypatch.setattr(cli, "EXPORTS_LISTED", 1)  # (a sweep of hundreds: the rest in a line)
    assert main(["export", str(small_sweep), "--to", "saelens", str(tmp_path / "all")]) == 0
    said = capsys.readouterr().out.splitlines()
    assert said == [f"exported: {tmp_path / 'all' / 'r2-l1_1e-03-s0'}",
                    f"... and 1 more in {tmp_path / 'all'}",
                    f"exported 2 run(s) to {tmp_path / 'all'}"]  # fmt: skip


def test_a_sweep_with_nothing_finished_is_told_to_wait(small_sweep, tmp_path, capsys):
    """Not "pass --finished to export the 0 finished runs", which then fails too."""
    import shutil

    sw = tmp_path / "sw"
    shutil.copytree(small_sweep, sw)
    for run in (sw / "runs").iterdir():  # as while they train
        for name in (rundir.DONE, rundir.WEIGHTS):
            (run / name).unlink()
    for extra in ([], ["--finished"]):
        assert main(["export", str(sw), "--to", "saelens", str(tmp_path / "o"), *extra]) == 2
        assert "has no finished runs to export yet (2 of 2 runs not finished)" in one_line(capsys)
    run = rundir.run_dir(sw, "r2-l1_3e-02-s0")  # finished, but its weights damaged since
    for name in (rundir.DONE, rundir.WEIGHTS):
        shutil.copy(rundir.run_dir(small_sweep, "r2-l1_3e-02-s0") / name, run / name)
    (run / rundir.WEIGHTS).write_bytes((run / rundir.WEIGHTS).read_bytes()[:-1] + b"x")
    for extra in ([], ["--finished"]):  # named, not "wait for the sweep"
        assert main(["export", str(sw), "--to", "saelens", str(tmp_path / "o"), *extra]) == 2
        err = one_line(capsys)
        assert "1 of 2 runs in" in err and "are damaged (r2-l1_3e-02-s0: sae.safetensors" in err
        assert err.endswith("; re-run the sweep"), err


def test_export_of_unfinished_run_is_one_line_error(small_sweep, tmp_path, capsys):
    import shutil

    sw = tmp_path / "sw"
    shutil.copytree(small_sweep, sw)
    (rundir.run_dir(sw, "r2-l1_1e-03-s0") / rundir.DONE).unlink()
    rc = main(
        ["export", str(sw), "--to", "saelens", str(tmp_path / "out"), "--runs", "r2-l1_1e-03-s0"]
    )
    err = capsys.readouterr().err.strip()
    assert (
        rc == 2 and err.startswith("error: run r2-l1_1e-03-s0 is not finished") and "\n" not in err
    )
    assert not (tmp_path / "out").exists()
    assert (
        main(["export", str(sw), "--to", "saelens", str(tmp_path / "out"), "--runs", "nope"]) == 2
    )
    assert "no run nope" in capsys.readouterr().err
    with pytest.raises(SweepError, match="not finished"):
        export_run(rundir.run_dir(sw, "r2-l1_1e-03-s0"), tmp_path / "x")


def one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


def files(folder: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_every_run_is_checked_before_any_is_written(small_sweep, tmp_path, capsys):
    sw = shutil.copytree(small_sweep, tmp_path / "sw")
    victim = rundir.run_dir(sw, "r2-l1_3e-02-s0") / rundir.WEIGHTS
    data = victim.read_bytes()  # same size, one bit changed: only the checksum catches it
    victim.write_bytes(data[:-9] + bytes([data[-9] ^ 1]) + data[-8:])
    assert main(["export", str(sw), "--to", "saelens", str(tmp_path / "out")]) == 2
    assert "are damaged (r2-l1_3e-02-s0: sae.safetensors fails its checksum" in one_line(capsys)
    assert not (tmp_path / "out").exists()
    named = ["--runs", "r2-l1_3e-02-s0", "r2-l1_1e-03-s0"]
    assert main(["export", str(sw), "--to", "saelens", str(tmp_path / "out"), *named]) == 2
    assert "r2-l1_3e-02-s0: sae.safetensors fails its checksum" in one_line(capsys)
    assert not (tmp_path / "out").exists()


def test_finished_exports_the_intact_runs_and_says_why_one_is_left(small_sweep, tmp_path, capsys):
    sw = shutil.copytree(small_sweep, tmp_path / "sw")
    victim = rundir.run_dir(sw, "r2-l1_3e-02-s0") / rundir.WEIGHTS
    data = victim.read_bytes()
    victim.write_bytes(data[:-9] + bytes([data[-9] ^ 1]) + data[-8:])
    assert main(["export", str(sw), "--to", "saelens", str(tmp_path / "out"), "--finished"]) == 0
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["r2-l1_1e-03-s0"]
    err = " ".join(capsys.readouterr().err.split())
    assert "r2-l1_3e-02-s0 (sae.safetensors fails its checksum" in err
    from sweep.status import status_rows

    note = {r["run_id"]: r.get("note") for r in status_rows(sw)}["r2-l1_3e-02-s0"]
    assert note is None  # status reads no weights; a size or DONE problem it does name
    victim.write_bytes(data[:-1])
    note = {r["run_id"]: r.get("note") for r in status_rows(sw)}["r2-l1_3e-02-s0"]
    assert (
        note.startswith("sae.safetensors has ")
        and "a sweep run whose grid has it trains it again" in note
    )


def test_an_export_of_another_sweep_is_never_replaced(small_sweep, tmp_path, capsys):
    """Two sweeps share run ids: one export folder per sweep, and each export says whence."""
    other = shutil.copytree(small_sweep, tmp_path / "other")
    spec = rundir.run_dir(other, "r2-l1_3e-02-s0") / rundir.SPEC
    spec.write_text(json.dumps({**json.loads(spec.read_text()), "sweep_dir": str(other)}))
    out = tmp_path / "out"
    assert main(["export", str(small_sweep), "--to", "saelens", str(out)]) == 0
    meta = json.loads((out / "r2-l1_3e-02-s0" / "cfg.json").read_text())["metadata"]
    recorded = json.loads((rundir.run_dir(small_sweep, "r2-l1_3e-02-s0") / rundir.SPEC).read_text())
    assert meta["sweep_dir"] == recorded["sweep_dir"] and meta["store_id"] == recorded["store_id"]
    assert meta["train_seed"] == recorded["train"]["seed"]
    before, _ = files(out), capsys.readouterr()
    assert main(["export", str(other), "--to", "saelens", str(out)]) == 2
    assert f"holds run r2-l1_3e-02-s0 of another sweep ({recorded['sweep_dir']})" in one_line(
        capsys
    )
    assert files(out) == before


def test_a_moved_sweep_exports_where_it_is_now(small_sweep, tmp_path, capsys):
    """A sweep folder moved (or copied) elsewhere: its exports name where it is now and where
    it was trained, and replace its exports from before the move."""
    out, moved = tmp_path / "out", shutil.copytree(small_sweep, tmp_path / "moved")
    assert main(["export", str(small_sweep), "--to", "saelens", str(out)]) == 0
    assert main(["export", str(moved), "--to", "saelens", str(out)]) == 0
    meta = json.loads((out / "r2-l1_3e-02-s0" / "cfg.json").read_text())["metadata"]
    assert meta["sweep_dir"] == str(moved.resolve())
    assert meta["trained_in"] == str(small_sweep)
    # a sweep trained later where that one was, on another store, is another sweep
    later = shutil.copytree(small_sweep, tmp_path / "later")
    spec = rundir.run_dir(later, "r2-l1_3e-02-s0") / rundir.SPEC
    fields = {"sweep_dir": str(small_sweep), "store_id": "another store"}
    spec.write_text(json.dumps({**json.loads(spec.read_text()), **fields}))
    capsys.readouterr()
    assert main(["export", str(later), "--to", "saelens", str(out)]) == 2
    assert "holds run r2-l1_3e-02-s0 of another sweep" in one_line(capsys)


@pytest.mark.parametrize("target", ["", "a_file"])
def test_an_export_folder_that_is_no_folder_is_refused(
    small_sweep, tmp_path, capsys, monkeypatch, target
):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a_file").write_text("x")
    before = files(tmp_path)
    assert main(["export", str(small_sweep), "--to", "saelens", target]) == 2
    want = "a_file is a file, not a folder" if target else "OUT_DIR is empty"
    assert want in one_line(capsys)
    assert files(tmp_path) == before


def test_a_folder_it_did_not_write_is_never_exported_into(small_sweep, tmp_path, capsys):
    """Exporting into the sweep's own runs folder would replace each run's cfg.json."""
    sw = shutil.copytree(small_sweep, tmp_path / "sw")
    before = files(sw)
    for inside in (sw / "runs", sw / "runs" / "new", sw / "report", sw / "store" / "x"):
        assert main(["export", str(sw), "--to", "saelens", str(inside)]) == 2
        want = f"is inside the {inside.relative_to(sw).parts[0]}/ folder of the sweep"
        assert want in one_line(capsys)
    assert files(sw) == before
    theirs = tmp_path / "theirs"
    shutil.copytree(sw / "runs", theirs)
    assert main(["export", str(sw), "--to", "saelens", str(theirs)]) == 2
    assert "holds files not written by 'sweep export'" in one_line(capsys)
    assert main(["export", str(sw), "--to", "saelens", str(sw / "exported")]) == 0
    capsys.readouterr()
    (next((sw / "exported").iterdir()) / "notes").mkdir()  # the user's, beside an export
    assert main(["export", str(sw), "--to", "saelens", str(sw / "exported")]) == 2
    assert "holds files not written by 'sweep export' (notes);" in one_line(capsys)
    assert main(["report", str(sw)]) == 0  # an export beside the runs leaves the sweep intact
    out = tmp_path / "out"  # its own export is replaced by a later one
    assert main(["export", str(sw), "--to", "saelens", str(out)]) == 0
    assert main(["export", str(sw), "--to", "saelens", str(out)]) == 0


def test_an_export_killed_between_its_files_is_replaced_by_the_next(small_sweep, tmp_path):
    out = tmp_path / "out"
    export_sweep(small_sweep, out)
    weights = out / "r2-l1_3e-02-s0" / "sae_weights.safetensors"
    weights.unlink()  # killed before the weights
    assert len(export_sweep(small_sweep, out)) == 2 and weights.is_file()


def test_a_re_export_that_fails_leaves_the_earlier_export_whole(small_sweep, tmp_path, monkeypatch):
    """A full disk (or any failure) writing a re-export's weights leaves the earlier
    export's, of the same run, as they were (they were deleted first: SAELens could not load
    the folder, which the error said was intact)."""
    out = tmp_path / "out"
    export_sweep(small_sweep, out)
    weights = out / "r2-l1_1e-03-s0" / "sae_weights.safetensors"  # (the first written)
    before = weights.read_bytes()

    def full(path, data):  # noqa: ANN001, ANN202
        raise OSError(errno.ENOSPC, "No space left on device")

    other = tmp_path / "other"  # another run's export there: its weights go first
    export_run(small_sweep / "runs" / "r2-l1_1e-03-s0", other)
    monkeypatch.setattr(export, "atomic_write_bytes", full)
    with pytest.raises(OSError, match="No space left"):
        export_sweep(small_sweep, out)
    assert weights.read_bytes() == before
    with pytest.raises(OSError, match="No space left"):
        export_run(small_sweep / "runs" / "r2-l1_3e-02-s0", other)
    assert not (other / "sae_weights.safetensors").exists()  # (never beside its cfg.json)


def test_every_export_folder_is_checked_writable_before_any_is_written(
    small_sweep, tmp_path, monkeypatch
):
    out = tmp_path / "out"
    ensure = export.ensure_writable

    def refused(folder, what, *args):  # noqa: ANN001, ANN202
        if Path(folder).name == "r2-l1_3e-02-s0":  # (the second: the first would be written)
            raise SweepError(f"{what} {folder} is not writable")
        return ensure(folder, what, *args)

    monkeypatch.setattr(export, "ensure_writable", refused)
    with pytest.raises(SweepError, match="is not writable"):
        export_sweep(small_sweep, out)
    assert not list(out.rglob("*.json")) and not list(out.rglob("*.safetensors"))


def test_a_diverged_run_is_never_exported(small_sweep, tmp_path, capsys):
    sw = shutil.copytree(small_sweep, tmp_path / "sw")
    done = rundir.run_dir(sw, "r2-l1_3e-02-s0") / rundir.DONE
    done.write_text(json.dumps({**json.loads(done.read_text()), "state": "diverged"}))
    out = tmp_path / "out"
    assert main(["export", str(sw), "--to", "saelens", str(out), "--runs", "r2-l1_3e-02-s0"]) == 2
    assert "run r2-l1_3e-02-s0 diverged" in one_line(capsys) and not out.exists()
    assert main(["export", str(sw), "--to", "saelens", str(out)]) == 0  # skipped, with a warning
    assert [p.name for p in out.iterdir()] == ["r2-l1_1e-03-s0"]


def test_a_failed_run_is_named_with_its_fix(small_sweep, tmp_path, capsys):
    sw = shutil.copytree(small_sweep, tmp_path / "sw")
    folder = rundir.RunFolder.of(sw, "r2-l1_3e-02-s0")
    (folder.path / rundir.DONE).unlink()
    folder.mark_failed("worker died")
    assert main(["export", str(sw), "--to", "saelens", str(tmp_path / "out")]) == 2
    err = one_line(capsys)
    assert "1 of 2 runs in" in err and "failed (r2-l1_3e-02-s0); re-run the sweep" in err


def test_export_of_foreign_folder_is_an_error(tmp_path, capsys):
    assert main(["export", str(tmp_path), "--to", "saelens", str(tmp_path / "out")]) == 2
    assert "not a sweep folder" in capsys.readouterr().err


def test_loads_in_sae_lens(small_sweep, tiny_store, tmp_path):
    """Optional: the real SAELens opens the export and reconstructs like we do."""
    sae_lens = pytest.importorskip(
        "sae_lens", reason="sae-lens not installed (pip install sae-lens 'transformer-lens<4')"
    )
    (path,) = export_sweep(small_sweep, tmp_path / "out", runs=["r2-l1_3e-02-s0"])
    theirs = sae_lens.SAE.load_from_disk(str(path), device="cpu")
    ours = sweep.load_run(str(rundir.run_dir(small_sweep, "r2-l1_3e-02-s0")))
    x = raw_rows(str(tiny_store.path))
    with torch.no_grad():
        torch.testing.assert_close(theirs.encode(x), ours.encode(x))
        torch.testing.assert_close(theirs.decode(theirs.encode(x)), ours(x))
        torch.testing.assert_close(theirs(x), ours(x))
    assert theirs.cfg.d_in == 16 and theirs.cfg.d_sae == 32


def test_harvest_provenance_becomes_saelens_metadata():
    from sweep.export import saelens_cfg

    prov = {
        "source": "harvest",
        "model": "pythia-70m",
        "hook": "blocks.3.hook_resid_post",
        "dataset": "pile",
        "context": 128,
    }
    meta = saelens_cfg(
        {"d_in": 512, "d_sae": 4096, "provenance": prov, "run_id": "r8-l1_1e-03-s0"}
    )["metadata"]
    assert meta["model_name"] == "pythia-70m" and meta["hook_name"] == "blocks.3.hook_resid_post"
    assert (
        meta["dataset_path"] == "pile"
        and meta["context_size"] == 128
        and meta["sweep_run_id"] == "r8-l1_1e-03-s0"
    )
    z = {"d_in": 512, "d_sae": 4096, "provenance": {**prov, "hook": "blocks.3.attn.hook_z"}}
    assert saelens_cfg(z)["reshape_activations"] == "hook_z"  # (SAELens flattens the heads)
    assert (
        saelens_cfg({"d_in": 512, "d_sae": 4096, "provenance": prov})["reshape_activations"]
        == "none"
    )


ARCH_VALUES = {
    "topk": [3], "batchtopk": [3], "matryoshka": [3], "jumprelu": [1e-3], "untied": [1e-2],
    "untied-weighted": [1e-2], "gated": [1e-2],
}  # fmt: skip


@pytest.fixture(scope="module")
def arch_runs(tiny_store, tmp_path_factory):
    """One finished run per architecture: {arch: run folder}."""
    from sweep import grid
    from sweep.config import SAEConfig
    from sweep.worker import EnsembleJob, train_ensemble
    from tests.conftest import tiny_train

    out = {}
    for key, values in ARCH_VALUES.items():
        arch, _, recipe = key.partition("-")
        knob = archs.get(arch).knob
        sweep_dir = tmp_path_factory.mktemp(f"exp-{key}")
        runs = grid.expand(values, [2.0], 1, tiny_store.width, arch, knob)
        (ens,) = grid.group(runs, {2.0: 4})
        sae = SAEConfig(name=arch, recipe=recipe or None)
        job = EnsembleJob(
            ens, str(sweep_dir), str(tiny_store.path), True, 2048, tiny_train(), threads=1, sae=sae
        )
        train_ensemble(job)
        out[key] = rundir.run_dir(sweep_dir, runs[0].run_id)
    return out


def saelens_encode(folder, x: torch.Tensor) -> torch.Tensor:
    """SAELens's encoders written out, by the exported cfg's architecture."""
    w, cfg = (
        load_file(str(folder / "sae_weights.safetensors")),
        json.loads((folder / "cfg.json").read_text()),
    )
    if cfg["architecture"] == "gated":  # (SAELens's weight sharing: W_enc * exp(r_mag))
        centred = x - w["b_dec"]
        gate = centred @ w["W_enc"] + w["b_gate"]
        mag = centred @ (w["W_enc"] * w["r_mag"].exp()) + w["b_mag"]
        return (gate > 0).float() * torch.relu(mag)
    pre = (x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    if cfg["architecture"] == "topk":
        vals, idx = pre.topk(cfg["k"], dim=-1)
        return torch.zeros_like(pre).scatter(-1, idx, torch.relu(vals))
    if cfg["architecture"] == "jumprelu":
        return torch.relu(pre) * (pre > w["threshold"])
    return torch.relu(pre)


@pytest.mark.parametrize(
    "arch, saelens",
    [
        ("topk", "topk"),
        ("batchtopk", "jumprelu"),
        ("matryoshka", "jumprelu"),  # (BatchTopK's inference form; its levels in metadata)
        ("jumprelu", "jumprelu"),
        ("untied-weighted", "standard"),  # free decoder norms export as they are
        ("gated", "gated"),  # (its b_enc as b_gate)
    ],
)
def test_every_architecture_exports_in_saelens_form(arch_runs, tiny_store, tmp_path, arch, saelens):
    out = export_run(arch_runs[arch], tmp_path / arch)
    cfg = json.loads((out / "cfg.json").read_text())
    assert cfg["architecture"] == saelens
    assert cfg["metadata"]["training_architecture"] == arch.split("-")[0]
    if arch == "topk":
        assert cfg["k"] == 3
    if arch == "matryoshka":  # (round(d_sae * level) for the default levels, then d_sae)
        assert (
            cfg["metadata"]["matryoshka_widths"]
            == [1, 3, 7, 15, 32]
            == [*archs.get("matryoshka").inner_widths(32), 32]
        )
    names = ("k", "l1_coefficient", "l0_coefficient", "sweep_l1")
    sparsity = {k: v for k, v in cfg["metadata"].items() if k in names}
    d = tiny_store.width  # SAELens's MSE sums over dimensions, ours averages
    assert (
        sparsity
        == {
            "topk": {"k": 3},
            "batchtopk": {"k": 3},
            "matryoshka": {"k": 3},
            "jumprelu": {"l0_coefficient": pytest.approx(1e-3 * d), "sweep_l1": 1e-3},
            "untied-weighted": {"l1_coefficient": pytest.approx(1e-2 * d), "sweep_l1": 1e-2},
            "gated": {"l1_coefficient": pytest.approx(1e-2 * d), "sweep_l1": 1e-2},
        }[arch]
    )
    ours, x = sweep.load_run(str(arch_runs[arch])), raw_rows(str(tiny_store.path))
    codes = saelens_encode(out, x)
    assert bool((codes != 0).any())
    torch.testing.assert_close(codes, ours.encode(x))
    w = load_file(str(out / "sae_weights.safetensors"))
    torch.testing.assert_close(codes @ w["W_dec"] + w["b_dec"], ours(x))


SAELENS_PY = Path(__file__).resolve().parents[1] / ".venv-saelens" / "bin" / "python"
CHECK = """
import sys, torch
from safetensors.torch import load_file
from sae_lens import SAE
for folder in sys.argv[1:]:
    sae = SAE.load_from_disk(folder, device="cpu")
    io = load_file(folder + "/io.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(sae.encode(io["x"]), io["codes"])
        torch.testing.assert_close(sae(io["x"]), io["recon"])
    print(folder, type(sae).__name__)
"""


@pytest.mark.skipif(
    not SAELENS_PY.exists(), reason="no .venv-saelens (scripts/frontier/setup_saelens.sh)"
)
def test_every_architecture_loads_in_real_sae_lens(arch_runs, tiny_store, tmp_path):
    """Optional: SAELens, in its own environment, opens each export and computes our codes."""
    from safetensors.torch import save_file

    folders = []
    for arch, run in arch_runs.items():
        out = export_run(run, tmp_path / arch)
        ours, x = sweep.load_run(str(run)), raw_rows(str(tiny_store.path))
        save_file({"x": x, "codes": ours.encode(x), "recon": ours(x)}, str(out / "io.safetensors"))
        folders.append(str(out))
    res = subprocess.run([str(SAELENS_PY), "-c", CHECK, *folders], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "TopKSAE" in res.stdout and "JumpReLUSAE" in res.stdout and "StandardSAE" in res.stdout
    assert "GatedSAE" in res.stdout


@pytest.mark.parametrize(
    "command",
    [["status", "--json"], ["status"], ["export", "--to", "saelens", "OUT"]],
    ids=["status-json", "status-table", "export"],
)
def test_a_reader_that_stops_reading_is_no_error(small_sweep, tmp_path, command):
    """``sweep status DIR | head``: the pipe closes before the output is written. No
    "Broken pipe; check the path and its permissions" (the work is done), exit 1 as rich
    does on a closed pipe; an export still writes every run."""
    import sys

    args = [a.replace("OUT", str(tmp_path / "out")) for a in command]
    argv = [sys.executable, "-m", "sweep", args[0], str(small_sweep), *args[1:]]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # (a pipe buffers)
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    p.stdout.close()  # before the command writes (it is still importing)
    err = p.stderr.read()
    assert (p.wait(), err) == (1, "")
    if args[0] == "export":
        assert len(list((tmp_path / "out").iterdir())) == 2


def test_snapshots_export_beside_their_runs_when_asked(tiny_store, tmp_path, capsys):
    """``--snapshots``: each run's snapshots as ``OUT_DIR/<run_id>-step<N>/``, each a SAELens
    folder whose weights are the snapshot's (its step in the metadata); without the flag
    only the final SAEs. A second export into the same folder replaces them."""
    sw = build_sweep(
        tiny_store, tmp_path / "sw", l1s=(1e-3,), ratios=(2.0,), seeds=1, snapshots=[0.5]
    )
    assert [p.name for p in export_sweep(sw, tmp_path / "plain")] == ["r2-l1_1e-03-s0"]
    out = tmp_path / "out"
    for _ in range(2):
        assert main(["export", str(sw), "--to", "saelens", str(out), "--snapshots"]) == 0
    said = capsys.readouterr().out
    assert "exported 1 run(s) (+ 1 snapshot(s)) to" in said.splitlines()[-1], said
    ((step, folder),) = rundir.RunFolder(sw / "runs" / "r2-l1_1e-03-s0").snapshots()
    snap_out = out / f"r2-l1_1e-03-s0-step{step}"
    assert sorted(p.name for p in out.iterdir()) == ["r2-l1_1e-03-s0", snap_out.name]
    meta = json.loads((snap_out / "cfg.json").read_text())["metadata"]
    assert meta["snapshot_step"] == step and meta["sweep_run_id"] == "r2-l1_1e-03-s0"
    assert export.is_snapshot(snap_out) and not export.is_snapshot(out / "r2-l1_1e-03-s0")
    x, snap = raw_rows(str(tiny_store.path)), sweep.load_run(str(folder))
    codes, recon = saelens_forward(snap_out, x)
    torch.testing.assert_close(codes, snap.encode(x))
    torch.testing.assert_close(recon, snap(x))
    final = load_file(str(out / "r2-l1_1e-03-s0" / "sae_weights.safetensors"))
    assert not torch.equal(
        final["W_enc"], load_file(str(snap_out / "sae_weights.safetensors"))["W_enc"]
    )
    damaged = folder / "sae.safetensors"  # a damaged snapshot: one line, nothing written
    data = damaged.read_bytes()
    damaged.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))
    with pytest.raises(
        SweepError, match=rf"snapshot of step {step} \(.*\): its sae.safetensors fails"
    ):
        export_sweep(sw, tmp_path / "again", snapshots=True)
    assert not (tmp_path / "again").exists()


def test_a_snapshot_written_again_with_the_same_bits_is_left_as_it_is(tmp_path):
    """A retried worker passing a snapshot's step again: the same weights leave the whole
    snapshot untouched (rewriting took its cfg.json from a reader for a moment: a loop of
    ``Sweep.snapshots`` failed 'has no cfg.json'); other weights are written again."""
    run = rundir.RunFolder(tmp_path / "r2-l1_1e-03-s0")
    folder = run.write_snapshot(3, b"weights", {"snapshot_step": 3})
    stamps = {f.name: f.stat().st_mtime_ns for f in folder.iterdir()}
    inodes = {f.name: f.stat().st_ino for f in folder.iterdir()}
    assert run.write_snapshot(3, b"weights", {"snapshot_step": 3}) == folder
    assert {f.name: f.stat().st_ino for f in folder.iterdir()} == inodes
    assert {f.name: f.stat().st_mtime_ns for f in folder.iterdir()} == stamps
    run.write_snapshot(3, b"other", {"snapshot_step": 3})
    assert (folder / rundir.WEIGHTS).read_bytes() == b"other"
    assert rundir.snapshot_problem(folder) is None and run.snapshots() == [(3, folder)]
    (folder / rundir.WEIGHTS).write_bytes(b"flipped")  # damaged: written again, whole
    run.write_snapshot(3, b"other", {"snapshot_step": 3})
    assert (folder / rundir.WEIGHTS).read_bytes() == b"other"


def test_a_finished_runs_snapshot_without_its_cfg_is_left_out_with_a_warning(tmp_path, caplog):
    """A snapshot without cfg.json is one still being written while its run trains (passed
    over in silence); once the run has finished, it is damaged: said, and left out."""
    run = rundir.RunFolder(tmp_path / "r2-l1_1e-03-s0")
    whole, torn = (run.path / rundir.SNAPSHOTS / f"step-{n:08d}" for n in (3, 5))
    for folder in (whole, torn):
        folder.mkdir(parents=True)
    (whole / rundir.CFG).write_text("{}")
    with caplog.at_level("WARNING", logger="sweep.rundir"):
        assert run.snapshots() == [(3, whole)] and not caplog.records  # (training)
        (run.path / rundir.DONE).write_text("{}")
        assert run.snapshots() == [(3, whole)]
    assert caplog.records[0].getMessage() == (
        "run r2-l1_1e-03-s0: snapshot step-00000005 has no cfg.json (damaged: the run has "
        "finished); left out (remove its folder)"
    )
