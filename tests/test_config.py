"""Config composition (real Hydra) and validation: bad values fail with a one-line message."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from sweep.cli import compose, main
from sweep.config import (
    DEFAULT_K,
    DEFAULT_L1,
    ChunksDataConfig,
    ConfigError,
    SyntheticDataConfig,
    TrainConfig,
    to_sweep_config,
)


def cfg_of(*overrides: str):
    return to_sweep_config(compose(["sweep_dir=/tmp/x", *overrides]))


def test_matryoshka_records_its_levels_and_only_it_has_them():
    """config.yaml names the default levels (as a recipe is named), so a later default cannot
    change a sweep's runs; other architectures record none (old sweeps: null, the same)."""
    assert cfg_of("sae=matryoshka").sae.levels == [0.03125, 0.09375, 0.21875, 0.46875]
    assert cfg_of("sae=matryoshka", "sae.levels=[0.25]").sae.architecture().inner_widths(64) == [16]
    assert cfg_of("sae=matryoshka", "sae.levels=[]").sae.levels == []
    assert cfg_of("sae=batchtopk").sae.levels is None
    assert cfg_of("sae=batchtopk", "sae.levels=[]").sae.levels is None


def test_defaults_compose_to_dataclasses():
    cfg = cfg_of()
    assert isinstance(cfg.data, SyntheticDataConfig)
    assert cfg.sae.name == "untied"
    assert cfg.grid.l1 and cfg.grid.dict_ratio and cfg.grid.seeds == 1
    assert cfg.train.device == "auto"


def test_overrides_reach_every_group():
    cfg = cfg_of(
        "data=chunks",
        "data.path=/some/store",
        "sae=tied",
        "grid.l1=[0,1e-3]",
        "grid.dict_ratio=[0.5,2]",
        "grid.seeds=3",
        "train.batch_size=64",
        "train.betas=[0.8,0.99]",
        "train.dtype=bfloat16",
        "launch.max_retries=5",
    )
    assert isinstance(cfg.data, ChunksDataConfig) and cfg.data.path == "/some/store"
    assert cfg.sae.name == "tied"
    assert cfg.grid.l1 == [0.0, 1e-3] and cfg.grid.dict_ratio == [0.5, 2.0] and cfg.grid.seeds == 3
    assert (
        cfg.train.batch_size == 64
        and cfg.train.betas == [0.8, 0.99]
        and cfg.train.dtype == "bfloat16"
    )
    assert cfg.launch.max_retries == 5


def test_synthetic_fields_have_the_documented_names():
    cfg = cfg_of(
        "data.width=32",
        "data.n_features=100",
        "data.mean_active=2.5",
        "data.decay=0.9",
        "data.noise=0.1",
        "data.correlation=0.2",
        "data.rows=50000",
        "data.seed=7",
    )
    d = cfg.data
    assert (
        d.width,
        d.n_features,
        d.mean_active,
        d.decay,
        d.noise,
        d.correlation,
        d.rows,
        d.seed,
    ) == (32, 100, 2.5, 0.9, 0.1, 0.2, 50000, 7)


@pytest.mark.parametrize(
    "override, field",
    [
        ("grid.l1=[-1e-3]", "grid.l1"),
        ("grid.l1=[]", "grid.l1"),
        ("grid.dict_ratio=[0]", "grid.dict_ratio"),
        ("grid.dict_ratio=[]", "grid.dict_ratio"),
        ("grid.seeds=0", "grid.seeds"),
        ("grid.seeds=100000", "the grid has 800,000 runs (4 l1 x 2 dict_ratio x 100,000 seeds)"),
        ("train.batch_size=0", "train.batch_size"),
        ("train.lr=-1", "train.lr"),
        ("train.betas=[0.9]", "train.betas"),
        ("train.device=tpu", "train.device"),
        ("train.dtype=float8", "train.dtype"),
        ("train.compile=sometimes", "train.compile"),
        ("train.cuda_graphs=maybe", "train.cuda_graphs"),
        ("train.cuda_graphs=true", "train.cuda_graphs=true replays the compiled step"),
        (
            "train.cuda_graphs=true train.compile=true train.device=cpu",
            "train.cuda_graphs=true needs a GPU but train.device=cpu",
        ),
        ("train.epochs=0", "train.epochs"),
        ("data.width=0", "data.width"),
        ("data.correlation=1.5", "data.correlation"),
        ("data.decay=0", "data.decay"),
        ("data.noise=-1", "data.noise"),
        ("data.rows=100", "data.rows"),
        ("data.rows=17000", "data.rows (17000) leaves 616 rows after data.eval_rows=16384, fewer"),
        ("data=chunks", "data.path"),
        ("train.lr_decay=2", "train.lr_decay"),
        ("train.checkpoint_minutes=0", "train.checkpoint_minutes"),
        ("train.checkpoint_minutes=-5", "train.checkpoint_minutes"),
        ("train.checkpoint_every=0", "train.checkpoint_every"),
        ("sae.name=nope", "unknown architecture sae='nope'"),
        ("sae=topk grid.k=[0]", "grid.k"),
        ("sae=topk grid.k=[-4]", "grid.k"),
        ("sae=topk grid.k=[]", "grid.k"),
        ("sae=topk grid.l1=[1e-3]", "grid.l1 does not apply to sae=topk"),
        ("sae=batchtopk grid.l1=[1e-3]", "grid.l1 does not apply to sae=batchtopk"),
        ("grid.k=[32]", "grid.k does not apply to sae=untied"),
        ("sae=jumprelu grid.k=[32]", "grid.k does not apply to sae=jumprelu"),
        ("train.auxk_alpha=-0.1", "train.auxk_alpha"),
        ("train.auxk_alpha=2", "train.auxk_alpha"),
        ("train.dead_tokens=0", "train.dead_tokens"),
        ("train.resample_dead=-1", "train.resample_dead"),
        ("train.resample_stop=0", "train.resample_stop"),
        (
            "sae=topk train.resample_dead=100",
            "train.resample_dead applies to L1-penalised SAEs (gated, tied, untied)",
        ),
        ("sae=jumprelu train.resample_dead=100", "not sae=jumprelu; set train.resample_dead=0"),
        ("sae.recipe=nope", "unknown recipe sae.recipe='nope' for sae=untied; choose one of"),
        ("sae=topk sae.recipe=weighted", "it has none: drop sae.recipe"),
        ("sae=topk sae.levels=[0.5]", "sae.levels is sae=matryoshka's (nested dictionaries)"),
        ("sae=matryoshka sae.levels=[0.5,0.25]", "sae.levels must be ascending fractions"),
        ("sae=matryoshka sae.levels=[0.25,1]", "in (0, 1) (the whole dictionary is always the"),
        ("sae.init_decoder_norm=0", "sae.init_decoder_norm"),
        ("sae.init_decoder_norm=-1", "sae.init_decoder_norm"),
        ("train.grad_clip=0", "train.grad_clip"),
        ("train.grad_clip=-1", "train.grad_clip"),
        ("logger=wandb logger.timeout=0.05", "logger.timeout must be at least 2 seconds"),
    ],
)
def test_invalid_values_name_the_field(override, field):
    with pytest.raises(ConfigError, match=re.escape(field)):
        cfg_of(*override.split())


@pytest.mark.parametrize(
    "argv, needle",
    [
        (
            ["run", "data=nosuch", "sweep_dir=/tmp/x"],
            "unknown option 'nosuch' for config group 'data'",
        ),
        (["run", "nosuch.field=1", "sweep_dir=/tmp/x"], "unknown config field 'nosuch.field'"),
        (["run", "+grid.foo=1"], "unknown config field 'grid.foo'; run 'sweep run --cfg job'"),
        (["run", "train.batch_size=abc", "sweep_dir=/tmp/x"], "train.batch_size"),
        (["run", "grid.l1=[-1]", "sweep_dir=/tmp/x"], "grid.l1"),
        (["run", "grid.dict_ratio=[4]"], "sweep_dir"),
        (
            ["run", "launch.cpus_per_ensemble=999"],
            "launch.cpus_per_ensemble=999 but this machine's Ray instance has",
        ),
        (
            ["run", "sae=nosuch", "sweep_dir=/tmp/x"],
            "unknown option 'nosuch' for config group 'sae'",
        ),
        (
            ["run", "sae=topk", "grid.k=[100]", "data.width=16", "grid.dict_ratio=[2]"],
            "grid.k values must be whole numbers in [1, dict size 32], got 100",
        ),
        (["run", "sae=topk", "grid.l1=[1e-3]"], "grid.l1 does not apply to sae=topk"),
        (
            ["run", "sae=matryoshka", "grid.k=[2]", "data.width=16", "grid.dict_ratio=[1,4]"],
            "of a 16-latent dictionary are [0, 2, 4, 8] latents: each level needs at least one",
        ),
        (
            ["run", "data.width=64", "grid.dict_ratio=[0.001]"],
            "grid.dict_ratio 0.001 x width 64 rounds to 0 latents; use dict ratios >= 0.0156",
        ),
        (
            ["run", "data.width=64", "grid.dict_ratio=[4.004,4]"],
            "grid.dict_ratio 4.004 and 4 both give dict size 256 at width 64",
        ),
        (["run", "grid.l1=[1e-3,1e-3]"], "grid.l1 has duplicate values: [0.001, 0.001]; list each"),
        (
            ["run", "train.snapshots=[0.5,1]"],
            "train.snapshots are fractions of training in (0, 1), got 1.0",
        ),
        (["run", "grid.lr=[1e-3,0]"], "grid.lr values must be finite and > 0, got 0.0; e.g."),
        (["run", "grid.lr=[]"], "grid.lr is empty: give at least one learning rate, e.g."),
        (["run", "grid.lr=[3e-3,3e-3]"], "grid.lr has duplicate values: [0.003, 0.003]; list"),
        (["run", "grid.lr=1e-3"], "grid.lr"),
        (["run", "grid.l1=[1e-2"], "cannot read the override 'grid.l1=[1e-2' (no viable"),
        (["run", "grid.l1 = [1e-2]"], "with no spaces around '='"),
        (["run", "grid.l1", "[1e-2]"], "write each override as key=value"),
        (["run", "sweep_dir=~/my sweep"], "\"sweep_dir='~/my sweep'\""),
        (["run", "train.lr=abc"], "cannot set train.lr to 'abc' (Value 'abc' of type 'str'"),
        (["run", "train.lr=a: b"], "cannot set train.lr to 'a: b' (Value 'a: b' of type 'str'"),
        (["run", "--config-dir", "/nonexistent/dir"], "--config-dir /nonexistent/dir is not a"),
        (["run", "hydra.run.dir=/tmp/y"], "'hydra.run.dir=/tmp/y' sets Hydra's own settings"),
        (["run", "--plan", "hydra/job_logging=disabled"], "which sweep does not use"),
        (["harvest", "hydra.job.chdir=true"], "'hydra.job.chdir=true' sets Hydra's own"),
        (["run", "data.normalize=2"], "data.normalize is true or false, not 2; pass data."),
        (
            ["run", "data.width=64", "grid.dict_ratio=[1e300]"],
            "6.4e+301 latents, more than 2,147,483,647; use dict ratios <= 33,554,431",
        ),
        (["harvest", "prepend_bos=1.0"], "prepend_bos is true or false, not 1.0"),
    ],
)
def test_cli_errors_are_one_line_and_exit_nonzero(argv, needle, capsys, tmp_path):
    if not any(a.startswith("sweep_dir=") for a in argv) and "sweep_dir" not in needle:
        argv = [*argv, f"sweep_dir={tmp_path / 'x'}"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and needle in err
    assert len(err.splitlines()) == 1, err
    assert not (tmp_path / "x").exists()


def test_a_quoted_tilde_in_a_path_is_the_home_folder(short_tmp, monkeypatch, capsys):
    """``sweep_dir='~/x'`` (quoted for the shell, so the shell left the ``~``) is the home
    folder's x, not a folder named ``~`` beside the current one; so are the paths a command
    takes."""
    home = short_tmp  # (a launch.temp_dir under it must be short)
    monkeypatch.setenv("HOME", str(home))
    over = ("sweep_dir='~/sw'", "launch.temp_dir='~/ray'", "data=chunks", "data.path='~/a'")
    cfg = cfg_of(*over)
    assert (cfg.sweep_dir, cfg.data.path) == (f"{home}/sw", f"{home}/a")
    assert cfg.launch.temp_dir == f"{home}/ray"
    assert main(["status", "~/none"]) == 2
    assert f"{home}/none" in capsys.readouterr().err


def test_a_sweep_dir_that_is_a_file_is_named_so(tmp_path, capsys):
    path = tmp_path / "notes.txt"
    path.write_text("mine")
    assert main(["run", f"sweep_dir={path}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: sweep_dir {path} is a file, not a folder; choose another path"
    assert path.read_text() == "mine"


def test_a_field_added_with_plus_is_unknown_too(capsys):
    """'+' adds a key even to a structured config, which would then drop it unread."""
    assert main(["harvest", "+launch.nosuch=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "error: unknown config field 'launch.nosuch'; run 'sweep harvest --cfg job' to list the "
        "fields"
    )


@pytest.mark.parametrize(
    "argv, said",
    [
        (["run", "sea=topk"], "unknown config field 'sea' (did you mean 'sae'?); run 'sweep run"),
        (["run", "train.bach_size=4"], "'train.bach_size' (did you mean 'train.batch_size'?)"),
        (["run", "+grid.l2=[1]"], "'grid.l2' (did you mean 'grid.l1' or 'grid.lr'?); run"),
        (["run", "+grid.l11=[1]"], "'grid.l11' (did you mean 'grid.l1'?); run 'sweep run"),
        (["run", "data.hok=h"], "'data.hok' (did you mean 'data.hook' of data=harvest?)"),
        (["run", "data=harvest", "data.hok=h"], "'data.hok' (did you mean 'data.hook'?)"),
        (["run", "data=chunks", "data.pth=p"], "'data.pth' (did you mean 'data.path'?)"),
        (["run", "data=chunks", "+data.widht=8"], "(did you mean 'data.width' of data=synthetic?)"),
        (["harvest", "modle=m"], "'modle' (did you mean 'model'?); run 'sweep harvest --cfg job'"),
        (["run", "nosuch=1"], "unknown config field 'nosuch'; run"),
    ],
)
def test_a_mistyped_field_is_answered_with_the_nearest_one(argv, said, capsys):
    assert main([*argv, "sweep_dir=/nonexistent/x"]) == 2
    assert said in capsys.readouterr().err


def test_an_auxk_weight_on_a_relu_sae_is_a_warning_not_an_error():
    """It does nothing there; sweeps recorded with one must still resume."""
    assert "does nothing for sae=untied" in cfg_of("train.auxk_alpha=0").inert_note()
    assert cfg_of("sae=topk", "train.auxk_alpha=0").inert_note() is None
    assert cfg_of().inert_note() is None


def test_settings_that_do_nothing_for_the_architecture_are_named():
    """An L1 warm-up on a TopK-style SAE; a dead-latent window with no remedy on. Neither
    locks the sweep (planning._inert): a JumpReLU sweep given another dead_tokens, or a
    TopK one another l1_warmup, is the same sweep."""
    from sweep import planning

    note = cfg_of("sae=topk", "train.l1_warmup=0.1").inert_note()
    assert note == "train.l1_warmup=0.1 does nothing for sae=topk: it has no L1 coefficient " \
        "(grid.k sets its sparsity)"  # fmt: skip
    assert (
        "train.dead_tokens=5,000 does nothing here"
        in cfg_of("sae=jumprelu", "train.dead_tokens=5000").inert_note()
    )
    assert cfg_of("sae=topk", "train.dead_tokens=5000").inert_note() is None  # AuxK reads it
    assert cfg_of("train.resample_dead=50", "train.dead_tokens=5000").inert_note() is None
    for arch, field in (("jumprelu", "dead_tokens"), ("topk", "l1_warmup")):
        old = {"sae": {"name": arch}, "train": {field: 1000}}
        new = {"sae": {"name": arch}, "train": {field: 2000}}
        assert planning._differences(old, new) == [], arch
    old, new = ({"sae": {"name": "topk"}, "train": {"dead_tokens": v}} for v in (1000, 2000))
    assert [d.key for d in planning._differences(old, new)] == ["train.dead_tokens"]


def test_recipe_and_defaults_are_recorded_resolved():
    cfg = cfg_of()
    assert cfg.sae.recipe == "unit" and cfg.train.grad_clip == 1.0 and cfg.train.lr == 3e-3
    assert cfg_of("sae=untied", "sae.recipe=weighted").sae.architecture().weighted_l1
    assert cfg_of("sae=topk").grid.k == [16, 32, 64, 128] and cfg_of("sae=topk").grid.l1 is None


def test_cfg_job_prints_composed_config(capsys):
    assert main(["run", "--cfg", "job", "sweep_dir=/tmp/x", "grid.l1=[0.5]"]) == 0
    out = capsys.readouterr().out
    assert main(["run", "--cfg", "job", "train.init_seeding=bogus"]) == 2  # printed, then refused
    said = capsys.readouterr()
    assert "init_seeding: bogus" in said.out
    assert said.err.strip() == (
        "error: train.init_seeding must be one of per_ratio, shared, got 'bogus'; give "
        "train.init_seeding such a value, or leave it out for its default"
    )
    assert "l1:" in out and "0.5" in out and "dict_ratio" in out and "sweep_dir: /tmp/x" in out
    for args, knob, values in (([], "l1", DEFAULT_L1), (["sae=topk"], "k", DEFAULT_K)):
        assert main(["run", "--cfg", "job", *args]) == 0  # the defaults a run records
        grid = yaml.safe_load(capsys.readouterr().out)["grid"]
        assert grid[knob] == values and grid["k" if knob == "l1" else "l1"] is None


def test_cfg_job_with_an_interpolation_that_does_not_resolve_is_one_line(capsys):
    """The config as written, then the interpolation's error (no traceback)."""
    assert main(["run", "--cfg", "job", "sweep_dir=x", "train.lr=${train.nope}"]) == 2
    said = capsys.readouterr()
    assert "lr: ${train.nope}" in said.out
    assert said.err.strip() == "error: train.lr: Interpolation key 'train.nope' not found"


HARVEST = ["harvest", "model=m", "dataset=d.txt", "hooks=[a]", "rows=1000", "store_dir=h"]


@pytest.mark.parametrize(
    "args, said",
    [
        (["run", "sweep_dir=x", "~sae"], "error: sae is required: pass sae=..."),
        (["run", "sweep_dir=x", "sae.name=${oops}"], "error: sae.name: Interpolation key 'oops'"),
        (["run", "sweep_dir=x", "grid.l1=${oops}"], "error: grid.l1: Interpolation key 'oops'"),
        ([*HARVEST, "context=${oops}"], "error: context: Interpolation key 'oops' not found"),
        ([*HARVEST, "context=0"], "error: context must be >= 2, got 0"),
    ],
)
def test_cfg_job_of_a_deleted_group_or_unresolved_value_is_one_line(args, said, capsys):
    """(Tracebacks: the grid's default values were filled in from sae.name, and sweep harvest
    resolved its listing unguarded and checked nothing.)"""
    assert main([args[0], "--cfg", "job", *args[1:]]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(said) and "\n" not in err, err


def test_an_old_jumprelu_sweep_is_resumed_only_with_its_log_recipe(tmp_path):
    """JumpReLU's default recipe became ``linear``; a sweep recorded before (recipe null: the
    log-threshold math) is refused under the new default, naming the recipe it trained with,
    and resumes with it. A config names its recipe."""
    from omegaconf import OmegaConf

    from sweep import planning
    from sweep.errors import RunDirError
    from sweep.sweepdir import SweepFolder

    new = cfg_of("sae=jumprelu")
    assert new.sae.recipe == "linear" and cfg_of("sae=topk").sae.recipe is None
    assert planning.with_legacy({"sae": {"name": "jumprelu"}})["sae"]["recipe"] == "log"
    assert planning.with_legacy({"sae": {"name": "untied"}})["sae"]["recipe"] == "unit"
    tied = {"sae": {"name": "tied", "recipe": "unit"}}  # as configs recorded it before
    assert (
        cfg_of("sae=tied").sae.recipe is None
        and planning.with_legacy(tied)["sae"]["recipe"] is None
    )
    plain = OmegaConf.to_container(OmegaConf.structured(new), resolve=True)
    plain["sae"]["recipe"] = None  # config.yaml as the previous version wrote it
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(plain))
    folder = SweepFolder(tmp_path)
    with pytest.raises(RunDirError, match=r"sae.recipe log -> linear"):
        planning.check_compatible(folder, new)
    planning.check_compatible(folder, cfg_of("sae=jumprelu", "sae.recipe=log"))


@pytest.mark.parametrize("warmup,decay", [(0.0, 0.0), (0.0, 0.2), (0.1, 0.2), (0.5, 0.5)])
def test_mean_lr_scale_is_the_schedules_mean(warmup, decay):
    train = TrainConfig(lr_warmup=warmup, lr_decay=decay)
    total = 2000
    mean = sum(train.lr_scale(s, total) for s in range(total)) / total
    assert train.mean_lr_scale() == pytest.approx(mean, abs=1e-3)


@pytest.mark.parametrize("name", ["cfg", "my cfg,v2 [x]"])
def test_config_dir_adds_groups_whatever_its_path(tmp_path, monkeypatch, name):
    """Its own group options are found, also from a path with spaces, commas or brackets
    (quoted in Hydra's search path) or given with ~."""
    folder = tmp_path / name / "sae"
    folder.mkdir(parents=True)
    (folder / "mine.yaml").write_text("defaults:\n  - untied\n  - _self_\nrecipe: weighted\n")
    monkeypatch.setenv("HOME", str(tmp_path))
    for given in (str(tmp_path / name), f"~/{name}"):
        cfg = to_sweep_config(compose(["sweep_dir=/tmp/x", "sae=mine"], given))
        assert cfg.sae.name == "untied" and cfg.sae.recipe == "weighted"


@pytest.mark.parametrize(
    "name, text, says",
    [
        (
            "sae/topk.yaml",
            "name: batchtopk\n",
            "has sae/topk.yaml, named like sweep's own sae=topk",
        ),
        ("config.yaml", "sweep_dir: x\n", "has config.yaml, named like sweep's own top-level"),
        ("sae/broken.yaml", "recipe: [1\n", "broken.yaml (line 2, column 1) is not valid YAML"),
        ("sae/extra.yaml", "name: untied\nfoo: 1\n", "sae/extra.yaml sets sae.foo, which is not"),
        ("sae/typed.yaml", "name: untied\ninit_decoder_norm: abc\n", "typed.yaml: Value 'abc'"),
        (
            "sae/based.yaml",
            "defaults:\n  - untid\n",
            "sae/based.yaml lists 'untid' in its defaults, but neither sweep nor --config-dir "
            "has sae/untid.yaml; fix that list (sweep's own sae options: batchtopk, gated, jumprelu,",
        ),
    ],
)
def test_a_config_dir_file_that_would_not_work_is_one_line(tmp_path, capsys, name, text, says):
    """A file named like one of sweep's own (Hydra reads sweep's first: it would be ignored
    without a word), one that is not YAML, or one setting an unknown or mistyped field."""
    (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / name).write_text(text)
    choice = f"sae={Path(name).stem}" if "/" in name else "sae=untied"
    assert main(["run", "--plan", "--config-dir", str(tmp_path), "sweep_dir=x", choice]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and says in err and "\n" not in err, err


def test_another_choice_of_a_group_is_named_as_one_difference():
    """data=harvest -> data=chunks: one entry, not every field the two choices do not share."""
    from sweep import planning

    train = {"lr": 1e-3, "batch_size": 256}
    old = {"data": {"name": "harvest", "hook": "blocks.0.hook_resid_post", "context": 128},
           "sae": {"name": "untied"}, "train": train}  # fmt: skip
    new = {"data": {"name": "chunks", "path": "/s"}, "sae": {"name": "topk"}, "train": train}
    diffs = planning._differences(old, new)
    assert list(map(str, diffs)) == ["data harvest -> chunks", "sae untied -> topk"]
    assert [d.override() for d in diffs] == ["data=harvest", "sae=untied"]  # Hydra's choices
    new["data"] = {"name": "harvest", "hook": "blocks.0.hook_resid_post", "context": 64}
    assert str(planning._differences(old, new)[0]) == "data.context 128 -> 64"


def test_only_thread_counts_asked_for_are_refused(monkeypatch):
    """A job given 8 of a node's 128 CPUs (a cpuset): the defaults are not refused (the
    launcher warns of oversubscription); a count given that exceeds 8 per CPU is."""
    from sweep import planning
    from sweep.errors import SweepError

    monkeypatch.setattr(planning.os, "cpu_count", lambda: 128)
    monkeypatch.setattr(planning, "cpu_count", lambda: 8)

    def check(*overrides: str) -> None:
        planning.check_local_hardware(to_sweep_config(compose(["sweep_dir=x", *overrides])))

    check()
    check("launch.num_cpus=64")
    with pytest.raises(SweepError, match="would run 65 torch threads on this machine's 8 CPUs"):
        check("launch.num_cpus=65")
    with pytest.raises(SweepError, match="would run 100 torch threads"):
        check("train.threads=100")


def test_a_sweep_recorded_before_init_seeding_resumes_with_shared_starts(tmp_path):
    """Its unstarted runs must start as they would have: refused under the new default,
    naming the value it trained with; accepted with it (what `sweep resume` passes)."""
    from omegaconf import OmegaConf

    from sweep import planning
    from sweep.errors import RunDirError
    from sweep.sweepdir import SweepFolder

    new = cfg_of()
    assert new.train.init_seeding == "per_ratio"
    plain = OmegaConf.to_container(OmegaConf.structured(new), resolve=True)
    del plain["train"]["init_seeding"]  # config.yaml as the previous version wrote it
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(plain))
    folder = SweepFolder(tmp_path)
    with pytest.raises(
        RunDirError,
        match=r"train.init_seeding shared -> per_ratio\); use a new sweep_dir or restore those "
        r"values \(train.init_seeding=shared\)",
    ):
        planning.check_compatible(folder, new)
    planning.check_compatible(folder, cfg_of("train.init_seeding=shared"))
    with pytest.raises(ConfigError, match="train.init_seeding must be one of per_ratio, shared"):
        cfg_of("train.init_seeding=random")


def test_another_group_choice_is_restored_with_its_recorded_fields(tmp_path):
    """sae=tied on an untied sweep trained with sae.recipe=weighted: the overrides that restore
    it name the recipe too (the untied defaults would say unit), not only sae=untied."""
    from omegaconf import OmegaConf

    from sweep import planning
    from sweep.errors import RunDirError
    from sweep.sweepdir import SweepFolder

    recorded = cfg_of("sae.recipe=weighted", "data.noise=0.01")
    plain = OmegaConf.to_container(OmegaConf.structured(recorded), resolve=True)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(plain))
    folder = SweepFolder(tmp_path)
    restore = r"restore those values \(sae=untied sae.recipe=weighted\)"
    with pytest.raises(
        RunDirError, match=rf"different settings \(sae untied -> tied\); .*{restore}"
    ):
        planning.check_compatible(folder, cfg_of("sae=tied", "data.noise=0.01"))
    planning.check_compatible(
        folder, cfg_of("sae=untied", "sae.recipe=weighted", "data.noise=0.01")
    )


@pytest.mark.parametrize(
    "value",
    ["/d/my text (v2).txt", "/d/a,b.jsonl", "it's", "true", "123", "EleutherAI/pythia-70m",
     "C:\\data\\x y", ["blocks.0.hook_resid_post", "a,b"], 0.001, None, [0.9, 0.999]],
)  # fmt: skip
def test_the_override_that_restores_a_value_reads_back_as_it(value):
    """A refusal names the override that restores a recorded value: through the shell and
    Hydra's grammar it is that value (a text with spaces, commas or quotes; one that reads
    as a number or a bool)."""
    import shlex

    from hydra.core.override_parser.overrides_parser import OverridesParser

    from sweep.planning import Difference

    given = shlex.split(Difference("data.dataset", value, "other").override())
    assert len(given) == 1
    (parsed,) = OverridesParser.create().parse_overrides(given)
    assert parsed.key_or_group == "data.dataset" and parsed.value() == value


def test_a_worker_computes_in_its_architectures_dtype_and_evaluates_without_tf32():
    """``train.dtype=auto`` reaching a worker (tests, scripts) means the architecture's GPU
    dtype there too; TF32, switched on for training, is off again for the evaluation (as in
    ``sweep evaluate``'s fresh process). The flags are process-wide, and settable without a
    GPU: the device need only be named."""
    import torch

    from sweep.config import SAEConfig, TrainConfig
    from sweep.restore import compute_dtype, training_ended

    cuda, auto = torch.device("cuda"), TrainConfig(dtype="auto")
    log_recipe = SAEConfig(name="jumprelu", recipe="log").architecture()
    was = torch.backends.cuda.matmul.allow_tf32
    try:
        assert (
            compute_dtype(auto, cuda, SAEConfig(name="jumprelu").architecture()) is torch.bfloat16
        )
        assert not torch.backends.cuda.matmul.allow_tf32
        assert compute_dtype(auto, cuda, log_recipe) is None
        assert torch.backends.cuda.matmul.allow_tf32
        training_ended(cuda)
        assert not torch.backends.cuda.matmul.allow_tf32
        assert compute_dtype(auto, torch.device("cpu"), log_recipe) is None
    finally:
        torch.backends.cuda.matmul.allow_tf32 = was


def test_jumprelu_log_recipe_computes_in_tf32_where_auto_means_bfloat16(tmp_path, caplog):
    """Its 0.001-wide straight-through window is narrower than bfloat16's spacing of
    pre-activations (measured: per-feature threshold gradients at cosine 0.47 to fp32's)."""
    from sweep import driver

    on_gpu = ["train.device=cuda", f"sweep_dir={tmp_path / 'sw'}"]
    assert driver.compute_dtype(cfg_of("sae=jumprelu", *on_gpu), None) == "bfloat16"
    assert driver.compute_dtype(cfg_of("sae=untied", *on_gpu), None) == "bfloat16"
    log_recipe = cfg_of("sae=jumprelu", "sae.recipe=log", *on_gpu)
    assert driver.compute_dtype(log_recipe, None) == "tf32"
    cpus = SimpleNamespace(on_gpu=False, real_gpus=False)
    assert driver.compute_dtype(cfg_of("sae=jumprelu", "sae.recipe=log"), cpus) == "float32"
    asked = cfg_of("sae=jumprelu", "sae.recipe=log", "train.dtype=bfloat16", *on_gpu)
    assert driver.compute_dtype(asked, None) == "bfloat16"  # asked for: kept, and warned about
    driver._warn_too_coarse(asked)
    assert "train.dtype=bfloat16 is too coarse for sae=jumprelu sae.recipe=log" in caplog.text
    assert "use train.dtype=tf32" in caplog.text
    caplog.clear()
    driver._warn_too_coarse(cfg_of("sae=jumprelu", "train.dtype=bfloat16", *on_gpu))
    assert not caplog.text


def test_a_whole_number_written_as_a_float_sets_an_integer_field(tmp_path, capsys):
    """As the README writes defaults (``rows`` 1e6): Hydra reads ``1e5`` as a float."""
    cfg = cfg_of("data.rows=1e5", "train.dead_tokens=1e7", "train.batch_size=1.024e3")
    assert (cfg.data.rows, cfg.train.dead_tokens, cfg.train.batch_size) == (100000, 10**7, 1024)
    assert isinstance(cfg.data.rows, int)
    assert cfg_of("grid.l1=[1e2]").grid.l1 == [100.0]  # (a float field keeps its float)
    with pytest.raises(ConfigError, match=r"cannot set data.rows to '2.5'"):
        cfg_of("data.rows=2.5")
    for k in ("[16,1e2]", "[16, 1e2]"):
        assert cfg_of("sae=topk", f"grid.k={k}", "grid.dict_ratio=[8]").grid.k == [16, 100]
    with pytest.raises(ConfigError, match=r"cannot set grid.k to '\[16,1e2,2.5\]'"):
        cfg_of("sae=topk", "grid.k=[16,1e2,2.5]")
    with pytest.raises(ConfigError, match=r"cannot set grid.seeds to '\[0,1e0\]'"):
        cfg_of("grid.seeds=[0,1e0]")  # (a list for a number: refused, not rewritten forever)
    harvest = compose(["rows=1e4", "model=m", "dataset=d"], config_name="harvest")
    assert harvest.rows == 10000
    (tmp_path / "data").mkdir()  # in a config file of --config-dir: named, with the fix
    (tmp_path / "data" / "mine.yaml").write_text(
        "defaults:\n  - synthetic\n  - _self_\nrows: 1e5\n"
    )
    argv = ["run", "--plan", "--config-dir", str(tmp_path), "sweep_dir=x", "data=mine"]
    assert main(argv) == 2
    assert capsys.readouterr().err.strip() == (
        "error: config file data/mine.yaml: Value '100000.0' of type 'float' could not be "
        "converted to Integer (data.rows); write it as a whole number there (100000)"
    )


def test_a_batch_larger_than_a_chunk_is_refused_before_the_store_is_made(tmp_path, capsys):
    """(It was refused once the store was made, which then stood in the way of the fix.)"""
    sw = tmp_path / "sw"
    small = ["data.width=8", "data.rows=20000", "data.rows_per_chunk=4096", "data.eval_rows=2048"]
    assert main(["run", f"sweep_dir={sw}", *small, "train.batch_size=8192"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "error: train.batch_size=8192 is more than data.rows_per_chunk=4096: no chunk would "
        "hold a full batch (batches never span chunks); lower train.batch_size or raise "
        "data.rows_per_chunk"
    )
    assert not sw.exists()
    harvest = ["data=harvest", "data.model=m", "data.dataset=d", "data.hook=h", "data.rows=90000"]
    assert (
        main(
            [
                "run",
                f"sweep_dir={sw}",
                *harvest,
                "data.rows_per_chunk=1024",
                "train.batch_size=2048",
            ]
        )
        == 2
    )
    assert "more than data.rows_per_chunk=1024" in capsys.readouterr().err
    assert not sw.exists()


def test_a_temp_dir_too_long_for_rays_sockets_is_refused_with_the_config():
    """(Ray refused it once the store was made.)"""
    fits = "/tmp/" + "r" * 38  # 43 bytes: its sockets' paths are 107
    assert cfg_of(f"launch.temp_dir={fits}").launch.temp_dir == fits
    with pytest.raises(ConfigError, match=r"launch.temp_dir /tmp/r+ is too long for Ray's socket "):
        cfg_of(f"launch.temp_dir={fits}r")
    assert cfg_of(f"launch.temp_dir={fits}r", "launch.address=auto").launch.address == "auto"


def test_a_relative_model_and_dataset_recorded_by_an_older_version_are_the_same_place(
    tmp_path, monkeypatch
):
    """Older versions recorded data.model and data.dataset as given: a re-run from where the
    sweep began (now recording absolute paths) is the same sweep, and so is its spec.json
    read from another folder against the config.yaml that re-run wrote; another file is not."""
    from sweep import planning

    monkeypatch.chdir(tmp_path)
    (tmp_path / "tm").mkdir()
    old = {"data": {"name": "harvest", "model": "tm", "dataset": "docs.txt"}}
    new = {"data": {"name": "harvest", "model": str(tmp_path / "tm"),
                    "dataset": str(tmp_path / "docs.txt")}}  # fmt: skip
    assert planning._differences(old, new) == []
    monkeypatch.chdir(tmp_path / "tm")  # (its spec.json against a config.yaml rewritten since)
    assert planning._differences(old, new) == []
    new["data"]["dataset"] = "/elsewhere/other.txt"  # (a docs.txt elsewhere: the harvest's
    assert [d.key for d in planning._differences(old, new)] == ["data.dataset"]  # own check)


@pytest.mark.parametrize("field", ["data.model", "data.dataset"])
def test_an_empty_model_or_dataset_is_refused_not_taken_as_the_working_folder(field):
    given = {"data.model": "m", "data.dataset": "d.txt", field: ""}
    harvest = ["data=harvest", "data.hook=h", "data.rows=90000"]
    with pytest.raises(ConfigError, match=f"{field} is required"):
        cfg_of(*harvest, *(f"{k}={v}" for k, v in given.items()))


def test_a_number_given_to_a_text_field_is_kept_as_typed():
    """Hydra reads 1e-3 as a number and OmegaConf writes it back as 0.001: sweep_dir=1e-3
    made the folder 0.001, logger.group=2024.10 the group 2024.1. Numeric fields still take
    numbers."""
    from sweep.cli import compose
    from sweep.config import to_harvest_config

    cfg = cfg_of("sweep_dir=1e-3", "logger.group=2024.10", "train.lr=1e-3", "data.seed=007")
    assert (cfg.sweep_dir, cfg.logger.group) == ("1e-3", "2024.10")
    assert (cfg.train.lr, cfg.data.seed) == (0.001, 7)
    harvest = ["model=m", "dataset=d.txt", "hooks=[a]", "rows=1000", "store_dir=.5"]
    assert to_harvest_config(compose(harvest, config_name="harvest")).store_dir == ".5"


def test_snapshots_that_share_a_step_or_fall_on_the_last_are_said():
    """Fractions kept apart by no step (a duplicate, two that round alike) and one that
    rounds to the last step keep fewer snapshots than named: a warning, not an error (a sweep
    recorded with them must resume), from the check before training (schedule_notes)."""
    from sweep.driver import schedule_notes

    t = TrainConfig(snapshots=[0.5, 0.501, 0.25, 0.999])
    assert t.snapshots_note(126) == (
        "train.snapshots 0.5, 0.501 fall on step 63 of 126: one snapshot there; 0.999 falls "
        "on the last step (126): no snapshot, the run's own weights are that step's"
    )
    assert t.snapshots_note(100_000) is None
    assert TrainConfig().snapshots_note(10) is None
    notes = schedule_notes(cfg_of("train.snapshots=[0.5,0.5]"), 100)
    assert "train.snapshots 0.5, 0.5 fall on step 50 of 100: one snapshot there" in notes
