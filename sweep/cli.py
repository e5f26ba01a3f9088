"""The ``sweep`` command.

    sweep run [key=value ...] [--cfg job] [--config-dir DIR]   compose a Hydra config and run it
    sweep run [key=value ...] --plan                           what it would train, where: nothing runs
    sweep resume SWEEP_DIR [key=value ...]                     continue a sweep from its saved config
    sweep evaluate SWEEP_DIR [--runs ID ...]                   metrics of finished runs again, from their weights
    sweep status SWEEP_DIR [--state S,...] [--json]            state and progress of every run
    sweep stop SWEEP_DIR [--no-wait]                           ask its running driver to checkpoint and stop
    sweep report SWEEP_DIR [SWEEP_DIR ...] [--out DIR] [--matrix-runs N]  table, MMCS, plots, index.html in SWEEP_DIR/report
    sweep export SWEEP_DIR --to saelens OUT_DIR [--runs ID ...] [--finished] [--snapshots]  runs in SAELens format
    sweep harvest model=... hooks='[...]' dataset=... rows=N store_dir=DIR   activations into chunk stores

``run`` composes ``sweep/configs`` (groups data, sae, grid, train, launch, logger) with
Hydra's compose API, so every field is overridable and ``--cfg job`` prints the composed
config. Errors a user can fix print one line (``error: ...``) and exit with status 2.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import logging
import os
import re
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from sweep import __version__, configs
from sweep.config import (
    ConfigError,
    SweepConfig,
    near_field,
    one_line,
    register_configs,
    to_sweep_config,
)
from sweep.errors import SweepError, os_error_message, stdout_gone
from sweep.io import lift_file_size_limit
from sweep.rundir import MATRIX_RUNS

log = logging.getLogger("sweep")

USAGE = __doc__.split("\n\n")[1]


def compose(
    overrides: list[str], config_dir: str | None = None, config_name: str = "config"
) -> DictConfig:
    """Compose the sweep (or ``harvest``) config with Hydra; errors become one-line ConfigErrors."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException

    register_configs()
    GlobalHydra.instance().clear()
    _refuse_hydra_settings(overrides)
    _refuse_numbers_as_bools(overrides, config_name)
    overrides = _numbers_as_text(overrides, config_name)
    if config_dir:
        overrides = [*overrides, f"hydra.searchpath=['file://{_config_dir(config_dir)}']"]
    try:
        with initialize_config_module("sweep.configs", version_base="1.3"):
            return _composed(hydra_compose, config_name, overrides)
    except yaml.YAMLError as err:  # (a file of --config-dir)
        raise ConfigError(_yaml_message(err)) from err
    except (HydraException, OmegaConfBaseException, ValueError) as err:
        message = _unparsable(overrides) or _hydra_message(err, config_name)
        if config_name == "harvest":  # its fields are listed by its own command
            message = message.replace("'sweep run --cfg job'", "'sweep harvest --cfg job'")
        raise ConfigError(message) from err


def _refuse_hydra_settings(overrides: list[str]) -> None:
    """Hydra's own settings (``hydra.run.dir``, ``hydra/job_logging``) do nothing here: sweep
    composes its config with Hydra, it does not run a Hydra app."""
    for o in overrides:
        if _sets_hydra(o.split("=", 1)[0]):
            raise ConfigError(
                f"'{o}' sets Hydra's own settings, which sweep does not use (it runs no Hydra app); "
                "drop it (config files of your own: --config-dir DIR)"
            )


def _sets_hydra(key: str) -> bool:
    """Whether an override's ``key`` is one of Hydra's own settings (``hydra.run.dir``,
    ``+hydra/job_logging``)."""
    return key.lstrip("+~").split(".", 1)[0].split("/", 1)[0] == "hydra"


_NUMBER = re.compile(r"[+-]?(\d[\d_]*(\.[\d_]*)?|\.\d[\d_]*)([eE][+-]?\d+)?")
"""What Hydra reads as a number: for a text field, written back otherwise (``1e-3`` as
``0.001``, ``2024.10`` as ``2024.1``, ``007`` as ``7``)."""


def _numbers_as_text(overrides: list[str], config_name: str) -> list[str]:
    """Overrides giving a text field (``sweep_dir``, ``logger.group`` ...) a number, quoted:
    the text as typed."""
    from sweep.config import text_fields

    texts = text_fields(_schema(config_name))
    out = []
    for o in overrides:
        key, eq, value = o.partition("=")
        quoted = eq and key in texts and _NUMBER.fullmatch(value)
        out.append(f"{key}='{value}'" if quoted else o)
    return out


def _schema(config_name: str) -> type:
    """The dataclass a composed ``config_name`` (``config`` or ``harvest``) is read into."""
    from sweep.config import HarvestConfig, SweepConfig

    return HarvestConfig if config_name == "harvest" else SweepConfig


def _refuse_numbers_as_bools(overrides: list[str], config_name: str) -> None:
    """A bool field given a number other than 0 or 1 (OmegaConf reads any other as true:
    ``data.normalize=2``), refused."""
    from sweep.config import bool_fields

    bools = bool_fields(_schema(config_name))
    for o in overrides:
        key, eq, value = o.partition("=")
        name = key.lstrip("+")
        if eq and name in bools and _NUMBER.fullmatch(value) and value not in ("0", "1"):
            raise ConfigError(f"{name} is true or false, not {value}; pass {name}=true or false")


def _composed(hydra_compose: Callable, config_name: str, overrides: list[str]) -> DictConfig:
    """Hydra's composition, where a whole number written as a float (``data.rows=1e6``, as the
    README writes defaults; ``grid.k='[16,1e2]'``) sets an integer field: Hydra reads ``1e6``
    as a float, which OmegaConf refuses for an int field; that override is given again as
    ``1000000``."""
    from hydra.errors import HydraException

    overrides = list(overrides)
    while True:
        try:
            return hydra_compose(config_name, overrides=overrides)
        except HydraException as err:
            i = _whole_float_override(err, overrides)
            if i is None:
                raise
            key, value = overrides[i].split("=", 1)
            whole = _as_whole(value)
            if whole == value:
                raise  # (whole already: the field takes no such value, a list for a number)
            overrides[i] = f"{key}={whole}"


def _whole_float_override(err: Exception, overrides: list[str]) -> int | None:
    """The index of the override ``err`` refused as a float for an integer field, when its
    value is a whole number, or a list of them (None: not that error)."""
    head = re.match(r"Error merging override (.+)", str(err))
    refused = "of type 'float' could not be converted to Integer" in str(err.__cause__ or "")
    if not head or not refused or head[1] not in overrides:
        return None
    return overrides.index(head[1]) if _as_whole(head[1].split("=", 1)[1]) else None


def _as_whole(value: str) -> str | None:
    """``value`` (a number, or a list of them) with its whole floats written as integers;
    None when it holds something else."""
    items = value[1:-1].split(",") if value.startswith("[") and value.endswith("]") else [value]
    try:
        numbers = [float(v) for v in items]
    except ValueError:
        return None
    if not all(n.is_integer() and abs(n) < 2**63 for n in numbers):
        return None
    whole = ",".join(str(int(n)) for n in numbers)
    return f"[{whole}]" if len(items) > 1 or value.startswith("[") else whole


def _yaml_message(err: yaml.YAMLError) -> str:
    """A config file that is not YAML, in one line: where, and what the parser expected."""
    mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
    problem = getattr(err, "problem", None) or one_line(str(err))
    where = (
        f"{mark.name} (line {mark.line + 1}, column {mark.column + 1})" if mark else "a config file"
    )
    return f"{where} is not valid YAML: {problem}; fix that file"


def _config_dir(config_dir: str) -> Path:
    """``--config-dir`` as an absolute folder Hydra's search path can hold."""
    path = Path(config_dir).expanduser().absolute()
    if not path.is_dir():
        raise ConfigError(
            f"--config-dir {config_dir} is not a folder; pass a folder of config groups "
            "(e.g. DIR/sae/mine.yaml for sae=mine)"
        )
    if any(c in str(path) for c in "'\\"):
        raise ConfigError(
            f"--config-dir {path} has a quote or backslash, which Hydra's search path cannot "
            "hold; use a folder whose path has none"
        )
    _refuse_shadowed(path)
    return path


def _refuse_shadowed(path: Path) -> None:
    """Hydra searches ``--config-dir`` after sweep's own configs: a file named like one of
    them would be ignored without a word, so it is refused, naming the way that works."""
    own = Path(configs.__file__).parent
    for f in sorted([*path.glob("*.yaml"), *path.glob("*/*.yaml")]):  # (sweep's depth)
        name = f.relative_to(path)
        if not (own / name).is_file():
            continue
        if len(name.parts) == 1:
            raise ConfigError(
                f"--config-dir {path} has {name}, named like sweep's own top-level config, "
                "which is used instead; put its values in group options (e.g. "
                "DIR/train/mine.yaml, chosen as train=mine) or in overrides"
            )
        group, stem = name.parent.as_posix(), name.stem
        raise ConfigError(
            f"--config-dir {path} has {name}, named like sweep's own {group}={stem}, which "
            f"is used instead; rename yours (e.g. {group}/{stem}_mine.yaml, chosen as "
            f"{group}={stem}_mine)"
        )


def _unparsable(overrides: list[str]) -> str | None:
    """The message for the first override Hydra's grammar cannot read, if any."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    parser = OverridesParser.create()
    for o in overrides:
        try:
            parser.parse_overrides([o])
        except OverrideParseException as err:
            why = str(err).strip().splitlines()[0]
            return f"cannot read the override {o!r} ({why}); {_override_fix(o)}"
    return None


def _override_fix(override: str) -> str:
    """What is most likely wrong with an override Hydra's grammar cannot read."""
    key, eq, value = override.partition("=")
    if not eq or key != key.strip() or value != value.lstrip():
        return "write each override as key=value, with no spaces around '='"
    if value.startswith("~"):  # (Hydra's grammar has its own '~'; bash expands it, zsh not)
        return f"quote a path that starts with '~' inside the override: \"{key}='{value}'\""
    if any(c.isspace() for c in value) and value[:1] not in "'\"[":
        return (
            "quote a value with spaces inside the override, and the whole for the shell: "
            f"\"{key}='{value}'\""
        )
    return "check its brackets and quotes (a list: grid.l1='[0.01,0.02]', quoted for the shell)"


def _hydra_message(err: BaseException, config_name: str = "config") -> str:
    """Hydra's multi-line errors, reduced to one line that names the problem and the fix."""
    text = str(err).strip()
    readings = (_unknown_option, _not_a_list, _comma, _file_field, _file_default, _sweep_syntax)
    for reading in readings:
        said = reading(err, text)
        if said:
            return said
    if text.startswith("Could not override"):
        key = text.split("'", 2)[1]
        within = getattr(err.__cause__, "object_type", None)  # (the group's schema)
        near = near_field(key, config_name, within)
        return f"unknown config field '{key}'{near}; run 'sweep run --cfg job' to list the fields"
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    head = lines[0] if lines else type(err).__name__
    cause = [ln.strip() for ln in str(err.__cause__ or "").splitlines() if ln.strip()]
    why = cause[0] if cause else ""
    return _override_message(head, why) or (f"{head}: {why}" if why else head)


def _sweep_syntax(err: BaseException, text: str) -> str | None:
    """Hydra's sweep syntax (``grid.l1=range(1,3)``, ``choice(...)``), which asks for its
    ``--multirun``: sweep's grid is a list (one command trains it all)."""
    if not text.startswith("Sweep parameters '") or "--multirun" not in text:
        return None
    given = text.split("'", 2)[1]
    key = given.split("=", 1)[0]
    example = "[16,32]" if key.endswith(".k") else "[1e-3,3e-3]"
    return (
        f"{key} takes a list, not Hydra's sweep syntax ('{given}'): one command trains the "
        f"whole grid; give the values, e.g. {key}='{example}'"
    )


def _unknown_option(err: BaseException, text: str) -> str | None:
    """An option a config group does not have (``sae=nope``), with the ones it has."""
    from hydra.errors import MissingConfigException

    if not (isinstance(err, MissingConfigException) and "Could not find" in text):
        return None
    group = text.split("Could not find '", 1)[1].split("'", 1)[0]
    name = group.rsplit("/", 1)
    options = [o.strip() for o in getattr(err, "options", None) or [] if not o.endswith("_schema")]
    hint = f" (choose one of: {', '.join(sorted(options))})" if options else ""
    return f"unknown option '{name[-1]}' for config group '{name[0]}'{hint}"


def _not_a_list(err: BaseException, text: str) -> str | None:
    """A list field given one value (``grid.l1=1e-3``), or a quoted text."""
    listed = re.match(r"Error merging override ([\w.]+)=(.*)", text)
    if not (listed and "is not a ListConfig" in f"{text} {err.__cause__}"):
        return None
    key, value = listed.groups()
    if len(value) > 1 and value[0] == value[-1] and value[0] in "'\"":  # quoted: a text
        return (
            f"{key} takes a list, got the text {value} (quotes inside the override: from "
            f"a program, pass {key}={value[1:-1]}; in a shell, quote the whole override)"
        )
    shown = value or ("16,32" if key.endswith(".k") else "1e-3,3e-3")  # (empty: an example)
    return f"{key} takes a list: write {key}='[{shown}]' (brackets, quoted for the shell)"


def _comma(err: BaseException, text: str) -> str | None:
    """A comma outside brackets (Hydra's multirun syntax, which sweep does not use)."""
    comma = re.match(r"Ambiguous value for argument '([\w.]+)=(.*)'", text)
    if not comma:
        return None
    key, value = comma.groups()
    return (
        f"{key}={value} has a comma outside brackets; a list is written {key}='[{value}]', "
        f"a value holding a comma is quoted: {key}='\"{value}\"'"
    )


def _file_field(err: BaseException, text: str) -> str | None:
    """A field of a config file (--config-dir) that is no field, or of the wrong type: named
    on the lines after Hydra's first."""
    composing = re.match(r"In '([^']+)': \w+ raised while composing config:", text)
    if not composing:
        return None
    field = re.search(r"full_key: (\S+)", text)
    if field and " not in " in text:
        return (
            f"config file {composing[1]}.yaml sets {field[1]}, which is not a config field; "
            "remove it (run 'sweep run --cfg job' to list the fields)"
        )
    lines = [ln.strip() for ln in text.splitlines()[1:] if ln.strip()]
    if not lines:
        return None
    at = f" ({field[1]})" if field else ""
    fix = "fix that file"
    whole = re.match(r"Value '(-?\d+)\.0' of type 'float' could not be converted to Int", lines[0])
    if whole:  # (YAML's 1e5: a float; an override of it is taken, see _composed)
        fix = f"write it as a whole number there ({whole[1]})"
    return f"config file {composing[1]}.yaml: {lines[0]}{at}; {fix}"


def _file_default(err: BaseException, text: str) -> str | None:
    """A defaults list entry of a config file (--config-dir) that names no config."""
    missing = re.match(r"In '([^']+)': Could not load '([^']+)'", text)
    if not missing:
        return None
    group, _, name = missing[2].rpartition("/")
    own = sorted(f.stem for f in (Path(configs.__file__).parent / group).glob("*.yaml"))
    hint = f" (sweep's own {group} options: {', '.join(own)})" if group and own else ""
    return (
        f"config file {missing[1]}.yaml lists '{name}' in its defaults, but neither sweep "
        f"nor --config-dir has {missing[2]}.yaml; fix that list{hint}"
    )


def _override_message(head: str, why: str) -> str | None:
    """An override OmegaConf refused (a null, a deletion, a value of another type), as one line
    naming the field and the fix; None for other errors (``why``: the first line of its
    cause)."""
    group = re.match(r"Config group override must be a string.*Got NoneType", head)
    if group:
        return (
            f"a config group ({', '.join(CONFIG_GROUPS)}) cannot be null: choose one of its "
            "options, e.g. data=synthetic (the README's config groups table lists them)"
        )
    null = re.match(r"Could not delete from config. '([\w.]+)' does not exist", head)
    if null:  # (a field that is null: Hydra finds nothing to delete)
        key = null[1]
        return f"cannot delete {key} (~{key}): every field has a value; set it instead ({key}=...)"
    merging = re.match(r"Error merging override (~?)([\w.]+)=?(.*)", head)
    if not merging:
        return None
    deleted, key, value = merging.groups()
    if deleted:
        return f"cannot delete {key} (~{key}): every field has a value; set it instead ({key}=...)"
    if "is not Optional" in why:
        return (
            f"{key} cannot be null; give it a value ('sweep run --cfg job' shows each field "
            "and its default)"
        )
    return (
        f"cannot set {key} to {value!r} ({why}); pass a value of the field's type "
        "('sweep run --cfg job' shows each field)"
    )


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(message)s",
        handlers=[_stderr_handler()],
        force=True,
    )
    for noisy in ("ray", "filelock", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _stderr_handler() -> logging.Handler:
    """Rich's on a terminal; elsewhere (a pipe, a file: a SLURM job's output) each record on
    one line as written, neither wrapped at 80 columns (a path cut mid-word) nor padded."""
    from rich.console import Console
    from rich.logging import RichHandler

    console = Console(stderr=True)
    if console.is_terminal:
        return RichHandler(show_path=False, show_time=False, console=console)
    plain = logging.StreamHandler(sys.stderr)
    plain.setFormatter(logging.Formatter("%(levelname)-8s %(message)s"))
    return plain


def cmd_run(args: argparse.Namespace) -> int:
    cfg = compose(args.overrides, args.config_dir)
    if args.cfg:
        _print_config(_grid_filled(cfg))
        checked = cfg.copy()  # (a listing of the fields needs no sweep_dir)
        if OmegaConf.is_missing(checked, "sweep_dir"):
            checked.sweep_dir = "unnamed"
        to_sweep_config(checked)  # a bad value: the config, then the one-line error (exit 2)
        return 0
    if args.plan:
        from sweep import preview

        preview.print_preview(preview.preview(to_sweep_config(cfg)))
        return 0
    return _run(to_sweep_config(cfg))


def _print_config(cfg: DictConfig) -> None:
    """``--cfg job``'s listing: resolved; an interpolation that does not resolve as written
    (the check that follows names it)."""
    try:
        text = OmegaConf.to_yaml(cfg, resolve=True)
    except OmegaConfBaseException:
        text = OmegaConf.to_yaml(cfg)
    print(text, end="")


def _missing(cfg: DictConfig) -> bool:
    """Whether a required field has no value (an interpolation that does not resolve: no)."""
    try:
        return bool(OmegaConf.missing_keys(cfg))
    except OmegaConfBaseException:
        return False


def _grid_filled(cfg: DictConfig) -> DictConfig:
    """The composed config with the grid's default sparsity values for its architecture
    (``grid.l1`` or ``grid.k``) as a run records them, not as null."""
    from sweep.archs import REGISTRY
    from sweep.config import GridConfig

    cfg = cfg.copy()
    try:  # (a group deleted, or an interpolation that does not resolve: left as it is)
        arch = REGISTRY.get(OmegaConf.select(cfg, "sae.name", throw_on_resolution_failure=False))
        if arch is not None and OmegaConf.select(cfg, f"grid.{arch.knob}") is None:
            cfg.grid[arch.knob] = GridConfig().values(arch.knob)
    except Exception:  # noqa: BLE001 (omegaconf raises AttributeError on ~sae's leftover)
        pass
    return cfg


def _run(cfg: SweepConfig) -> int:
    from sweep import driver, sweepdir, table

    records = driver.run_sweep(cfg)
    table.print_table([r.row() for r in records], title=f"sweep summary: {cfg.sweep_dir}")
    print(f"summary: {Path(cfg.sweep_dir) / sweepdir.SUMMARY}")
    return 0


CONFIG_GROUPS = tuple(
    sorted(
        p.name
        for p in Path(configs.__file__).parent.iterdir()
        if p.is_dir() and not p.name.startswith(("_", "."))
    )
)
"""The config groups (the folders of ``sweep/configs``): a choice among their options composes
a config, which a saved sweep no longer is."""


def load_saved(sweep_dir: str, overrides: list[str], command: str = "resume") -> SweepConfig:
    """The config a sweep was run with (``SWEEP_DIR/config.yaml``), with dotlist overrides
    (for ``sweep <command>``)."""
    from sweep.planning import with_legacy
    from sweep.sweepdir import CONFIG, SweepFolder

    folder = SweepFolder(sweep_dir)
    plain = folder.load_config()  # a damaged one is a one-line error
    if plain is None:
        folder.run_ids()  # what this folder is instead, in one line (missing, a store, ...)
        raise SweepError(
            f"{sweep_dir} has no config.yaml (deleted?), so 'sweep {command}' cannot know its "
            f"settings: re-run the 'sweep run ... sweep_dir={sweep_dir}' command that started "
            "it (its runs' recorded settings are checked against it)"
        )
    _check_resume_overrides(overrides, command)
    data = OmegaConf.create(_own_store_as_own(with_legacy(plain)))  # (fields added since)
    choice = [f"data={data.data.name}", f"sae={data.sae.name}"]  # (sweep_dir: merged, not parsed)
    try:  # the file alone first, so that its own faults are named as its
        base = compose(choice)
        to_sweep_config(OmegaConf.merge(base, data, {"sweep_dir": sweep_dir}))  # type: ignore[arg-type]
    except (ConfigError, OmegaConfBaseException) as err:
        raise SweepError(
            f"{Path(sweep_dir) / CONFIG} is damaged or was edited ({one_line(str(err))}); "
            "restore it (every run's spec.json holds the recorded values)"
        ) from err
    merged = OmegaConf.merge(base, data)
    if overrides:  # read by Hydra (its one-line messages), as `sweep run` reads them
        composed = compose(choice + overrides)
        given = OmegaConf.to_container(composed, resolve=False)  # (resolved in merged below)
        for key in (o.split("=", 1)[0] for o in overrides):
            OmegaConf.update(merged, key, _at(given, key), merge=False)
    merged.sweep_dir = sweep_dir
    return to_sweep_config(merged)  # type: ignore[arg-type]


def _own_store_as_own(saved: dict) -> dict:
    """A saved config whose ``data.path`` is the sweep's own ``<sweep_dir>/store``, where it
    was (recorded so, absolute, before it was recorded as null), made or harvested there:
    the sweep's own store, wherever the folder is now."""
    from sweep.sweepdir import STORE

    data, where = saved.get("data"), saved.get("sweep_dir")
    if not isinstance(data, dict) or data.get("name") == "chunks" or not isinstance(where, str):
        return saved
    path, folder = data.get("path"), Path(where).expanduser().parts  # (relative: as given)
    if not isinstance(path, str) or not folder:  # ("." names no folder to compare)
        return saved
    if Path(path).expanduser().parts[-len(folder) - 1 :] == (*folder, STORE):
        return {**saved, "data": {**data, "path": None}}
    return saved


def _at(tree: object, key: str) -> object:
    """The value at dotted ``key`` of nested dicts, as written (``${...}`` unresolved: an
    override's interpolation resolves against the recorded config, not the defaults)."""
    for part in key.split("."):
        tree = tree[part]  # type: ignore[index]
    return tree


def _group_fix(override: str) -> str:
    """What to pass instead of a config group's choice to ``sweep resume`` or ``evaluate``:
    where to train is a field (``launch.name``), the rest is the sweep's own settings."""
    key, _, value = override.partition("=")
    if key == "launch" and value == "local":
        return "pass launch.name=local launch.address=null to run it on this machine"
    if key == "launch" and value == "cluster":
        return "pass launch.name=cluster launch.address=HOST:PORT (or auto)"
    return "pass the sweep's settings with that choice to 'sweep run' instead"


def _check_resume_overrides(overrides: list[str], command: str = "resume") -> None:
    """``sweep resume`` (or ``evaluate``) sets recorded fields (``train.log_every=10``),
    nothing else."""
    for o in overrides:
        key = o.split("=", 1)[0]
        if key.lstrip("+~") == "sweep_dir":
            raise ConfigError(
                f"sweep {command} works on the sweep folder it is given, so '{o}' has no place "
                f"here; drop it, or run 'sweep {command} OTHER_DIR' for another sweep"
            )
        if key.lstrip("+~") in CONFIG_GROUPS:
            raise ConfigError(
                f"sweep {command} takes field overrides (like launch.num_gpus=1), not '{o}'; "
                f"{_group_fix(o)}"
            )
        if _sets_hydra(key):
            raise ConfigError(
                f"sweep {command} takes overrides of the sweep's recorded fields, not Hydra's "
                f"own settings ('{o}'); drop it"
            )
        if "=" not in o or key.startswith(("+", "~")):
            raise ConfigError(
                f"sweep {command} takes field=value overrides of recorded fields (like "
                f"launch.num_gpus=1), not '{o}'"
            )


def cmd_resume(args: argparse.Namespace) -> int:
    return _run(load_saved(args.sweep_dir, args.overrides))


EVALUATE_KEYS = ("launch.", "logger.", "train.device", "progress", "data.path")
"""What ``sweep evaluate`` may override: where and how it runs (and where its store is now,
checked to be the same store), never what it computes."""


def cmd_evaluate(args: argparse.Namespace) -> int:
    from sweep import sweepdir, table
    from sweep.evaluate import evaluate_sweep

    runs = [r for r in args.runs or () if "=" not in r]  # (overrides after --runs: theirs)
    overrides = args.overrides + [r for r in args.runs or () if "=" in r]
    _check_evaluate_overrides(overrides)
    cfg = load_saved(args.sweep_dir, overrides, command="evaluate")
    records = evaluate_sweep(cfg, only=runs)
    table.print_table([r.row() for r in records], title=f"sweep summary: {cfg.sweep_dir}")
    print(f"summary: {Path(cfg.sweep_dir) / sweepdir.SUMMARY}")
    return 0


def _check_evaluate_overrides(overrides: list[str]) -> None:
    """``sweep evaluate`` sets where and how it runs (:data:`EVALUATE_KEYS`), never what it
    computes: the metrics come from the recorded settings."""
    _check_resume_overrides(overrides, "evaluate")  # (its messages for what is no field)
    for o in overrides:
        key = o.split("=", 1)[0]
        if key.startswith("grid."):
            raise ConfigError(
                f"sweep evaluate evaluates the finished runs of every grid the sweep ran, so "
                f"'{o}' has no place here; choose runs with --runs ID ..."
            )
        if not key.startswith(EVALUATE_KEYS):
            keys = ", ".join(k + "*" if k.endswith(".") else k for k in EVALUATE_KEYS)
            raise ConfigError(
                f"sweep evaluate computes the metrics with the sweep's recorded settings: it "
                f"takes {keys} overrides, not '{o}'"
            )


def _states(text: str) -> tuple[str, ...]:
    """``--state``'s comma-separated run states, each one a run can be in."""
    from sweep.rundir import RunState

    names = [s.value for s in RunState]
    states = tuple(dict.fromkeys(s.strip() for s in text.split(",") if s.strip()))
    unknown = [s for s in states if s not in names]
    if unknown or not states:
        raise argparse.ArgumentTypeError(
            f"unknown run state {', '.join(unknown) or repr(text)}; choose from {','.join(names)}"
        )
    return states


def cmd_status(args: argparse.Namespace) -> int:
    from sweep import status
    from sweep.sweepdir import Preparing, StoppedPreparing

    try:
        if args.json:
            print(status.status_json(Path(args.sweep_dir), args.state))
        else:
            status.print_status(Path(args.sweep_dir), args.state)
    except (Preparing, StoppedPreparing) as err:  # (a state, not a wrong folder)
        print(json.dumps(status.no_runs_yet(args.sweep_dir, err), indent=1) if args.json else err)
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    from sweep.stop_request import ask_to_stop

    return ask_to_stop(Path(args.sweep_dir), wait=not args.no_wait)


def cmd_report(args: argparse.Namespace) -> int:
    from sweep import report, table

    override = next((d for d in args.sweep_dir if "=" in d and not Path(d).exists()), None)
    if override is not None:
        raise SweepError(
            f"sweep report takes sweep folders and options, not overrides ({override}); see "
            "'sweep report --help'"
        )
    sweep_dir, *others = (Path(d) for d in args.sweep_dir)
    out, rows = report.build_report(
        sweep_dir,
        device=args.device,
        log_media=not args.no_wandb,
        out=args.out,
        compare=others,
        matrix_runs=args.matrix_runs,
    )
    table.print_table(rows, title=f"sweep summary: {sweep_dir}")
    print(f"report: {out / 'index.html'}")
    print(f"summary: {out / report.SUMMARY}")
    if others:
        print(f"frontier of {1 + len(others)} sweeps: {out / 'frontier.png'}")
    return 0


def cmd_harvest(args: argparse.Namespace) -> int:
    from sweep.activations.harvest import run_harvest
    from sweep.config import to_harvest_config

    cfg = compose(args.overrides, args.config_dir, config_name="harvest")
    if args.cfg:
        _print_config(cfg)
        if not _missing(cfg):  # (a listing of the fields needs none of them)
            to_harvest_config(cfg)  # a bad value: the config, then the one-line error (exit 2)
        return 0
    for hook, store in run_harvest(to_harvest_config(cfg)).items():
        print(f"{hook}: {store.path} ({store.total_rows} rows x {store.width}, {store.dtype})")
    return 0


EXPORTS_LISTED = 20
"""Exported folders named one per line: a sweep of hundreds says the rest in one line."""


def cmd_export(args: argparse.Namespace) -> int:
    from sweep import export

    paths = export.export_sweep(
        args.sweep_dir, args.out_dir, runs=args.runs, to=args.to, finished_only=args.finished,
        snapshots=args.snapshots,
    )  # fmt: skip
    for path in paths[:EXPORTS_LISTED]:
        print(f"exported: {path}")
    if len(paths) > EXPORTS_LISTED:
        print(f"... and {len(paths) - EXPORTS_LISTED} more in {args.out_dir}")
    snaps = sum(export.is_snapshot(p) for p in paths)
    also = f" (+ {snaps} snapshot(s))" if snaps else ""
    print(f"exported {len(paths) - snaps} run(s){also} to {args.out_dir}")  # last: in view
    return 0


def _compose_options(p: argparse.ArgumentParser) -> None:
    """The options of commands that compose a Hydra config."""
    p.add_argument(
        "--cfg", choices=["job", "all"], help="print the composed config and exit (all: the same)"
    )
    p.add_argument(
        "--config-dir",
        help="a folder of your own config group options beside sweep's own (DIR/GROUP/mine.yaml: "
        "GROUP=mine, e.g. sae=mine for run, launch=mine for harvest; named like one of "
        "sweep's own, refused)",
    )


class _Parser(argparse.ArgumentParser):
    """Command-line mistakes in the one-line form of every other error (exit status 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message}; see '{self.prog} --help'\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="sweep",
        description=f"Train grids of sparse autoencoders.\n\n{USAGE}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("--version", action="version", version=f"sweep {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    for add in (
        _add_run,
        _add_resume,
        _add_evaluate,
        _add_status,
        _add_stop,
        _add_report,
        _add_harvest,
        _add_export,
    ):
        add(sub)
    return p


def _add_run(sub: argparse._SubParsersAction) -> None:
    run = sub.add_parser("run", help="run a sweep (Hydra overrides: key=value ...)")
    run.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. grid.l1='[1e-3,1e-2]'")
    run.add_argument(
        "--plan",
        action="store_true",
        help="print the ensembles it would train and what each asks for; train and write nothing",
    )
    _compose_options(run)
    run.set_defaults(func=cmd_run)


def _add_resume(sub: argparse._SubParsersAction) -> None:
    res = sub.add_parser("resume", help="continue a sweep from its saved config")
    res.add_argument("sweep_dir", type=_user_path)
    res.add_argument(
        "overrides", nargs="*", default=[], help="dotlist overrides (e.g. launch.num_cpus=4)"
    )
    res.set_defaults(func=cmd_resume)


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    ev = sub.add_parser(
        "evaluate",
        help="compute the metrics of a sweep's finished runs again from their weights "
        "(those of this version of sweep; no training)",
    )
    ev.add_argument("sweep_dir", type=_user_path)
    ev.add_argument(
        "overrides", nargs="*", default=[], help="dotlist overrides (e.g. launch.num_gpus=1)"
    )
    ev.add_argument(
        "--runs", nargs="+", metavar="ID", help="run ids to evaluate (default: every finished run)"
    )
    ev.set_defaults(func=cmd_evaluate)


def _add_status(sub: argparse._SubParsersAction) -> None:
    st = sub.add_parser("status", help="state and progress of every run")
    st.add_argument("sweep_dir", type=_user_path)
    st.add_argument(
        "--state",
        type=_states,
        default=(),
        help="show only the runs in these states, comma-separated (e.g. failed,interrupted); "
        "the totals line still counts every run",
    )
    st.add_argument(
        "--json",
        action="store_true",
        help="print it as JSON (runs, states, rows, pace while training) for scripts",
    )
    st.set_defaults(func=cmd_status)


def _add_stop(sub: argparse._SubParsersAction) -> None:
    stop = sub.add_parser(
        "stop",
        help="ask a running sweep's driver (on any host that sees the folder) to stop; every "
        "running ensemble checkpoints first, as at Ctrl-C",
    )
    stop.add_argument("sweep_dir", type=_user_path)
    stop.add_argument(
        "--no-wait", action="store_true", help="return at once instead of when the driver ended"
    )
    stop.set_defaults(func=cmd_stop)


def _add_report(sub: argparse._SubParsersAction) -> None:
    rep = sub.add_parser(
        "report",
        help="summary table, MMCS, plots and index.html in SWEEP_DIR/report "
        "(several sweeps: the first one's report, with every sweep on the frontier plot)",
    )
    rep.add_argument(
        "sweep_dir",
        nargs="+",
        type=_user_path,
        help="sweep folder(s); with several, the frontier plot compares them all",
    )
    rep.add_argument(
        "--out",
        metavar="DIR",
        type=_user_path,
        help="write the report here instead of <first SWEEP_DIR>/report",
    )
    rep.add_argument(
        "--device", default="auto", help="device for MMCS between dictionaries (auto, cpu, cuda)"
    )
    rep.add_argument("--no-wandb", action="store_true", help="do not send the plots to wandb")
    rep.add_argument(
        "--matrix-runs",
        metavar="N",
        type=_count,
        default=MATRIX_RUNS,
        help=f"at most N runs of a dict ratio in its MMCS matrix and heatmap (default "
        f"{MATRIX_RUNS}; its pairs grow with N squared; 0: no matrices, only each run's values)",
    )
    rep.set_defaults(func=cmd_report)


def _add_harvest(sub: argparse._SubParsersAction) -> None:
    hv = sub.add_parser("harvest", help="harvest transformer_lens activations into chunk stores")
    hv.add_argument(
        "overrides",
        nargs="*",
        help="Hydra overrides, e.g. model=EleutherAI/pythia-70m hooks='[blocks.2.hook_resid_post]'",
    )
    _compose_options(hv)
    hv.set_defaults(func=cmd_harvest)


def _add_export(sub: argparse._SubParsersAction) -> None:
    exp = sub.add_parser("export", help="write finished runs in another library's format")
    exp.add_argument("sweep_dir", type=_user_path)
    exp.add_argument("--to", required=True, choices=["saelens"], help="target format")
    exp.add_argument("out_dir", type=_user_path, help="folder to write (one sub-folder per run)")
    exp.add_argument(
        "--runs", nargs="+", metavar="ID", help="run ids to export (default: every run)"
    )
    exp.add_argument(
        "--finished",
        action="store_true",
        help="export the finished runs of a sweep that is still running (others are listed)",
    )
    exp.add_argument(
        "--snapshots",
        action="store_true",
        help="also each exported run's snapshots (train.snapshots), as OUT_DIR/<run_id>-step<N>/",
    )
    exp.set_defaults(func=cmd_export)


def _count(text: str) -> int:
    """A whole number of at least 0 (``--matrix-runs``)."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 0; e.g. 12, or 0")
    return value


def _user_path(text: str) -> str:
    """A folder named on the command line, ``~`` expanded (quoted, the shell left it)."""
    return os.path.expanduser(text)


def parse(argv: list[str] | None) -> argparse.Namespace:
    """The command line; overrides may also follow options (``run a=1 --plan b=2``)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(_sweep_dir_first(sys.argv[1:] if argv is None else argv))
    if extra and hasattr(args, "overrides") and not any(e.startswith("-") for e in extra):
        args.overrides += extra
    elif extra:
        parser.parse_args(argv)  # argparse's one-line usage error (exit 2)
    return args


def _sweep_dir_first(argv: list[str]) -> list[str]:
    """``evaluate``/``export`` with a sweep folder among the words after ``--runs`` (which
    takes them all: ``evaluate --runs ID SWEEP_DIR``): that folder goes first, as the
    command's own argument."""
    if not argv or argv[0] not in ("evaluate", "export") or "--runs" not in argv:
        return argv
    at = argv.index("--runs") + 1
    end = next((i for i in range(at, len(argv)) if argv[i].startswith("-")), len(argv))
    found = [w for w in argv[at:end] if "=" not in w and _is_sweep(Path(w).expanduser())]
    if len(found) != 1 or any(_is_sweep(Path(w).expanduser()) for w in argv[1 : at - 1]):
        return argv
    return [argv[0], found[0], *(w for w in argv[1:] if w is not found[0])]


def _is_sweep(path: Path) -> bool:
    from sweep.sweepdir import MANIFEST, RUNS

    return (path / MANIFEST).is_file() or (path / RUNS).is_dir()


def main(argv: list[str] | None = None) -> int:
    from sweep.stop import Interrupted, StopNow, interruptible, raised_by

    args = None
    try:
        with interruptible():
            args = parse(argv)
            _setup_logging(args.verbose)
            lift_file_size_limit()  # (a store, a checkpoint, Ray's object store: GBs)
            code = args.func(args)
            sys.stdout.flush()  # (here, where a reader that left is caught: a pipe buffers)
            return code
    except (Interrupted, StopNow, SystemError) as err:
        stop = raised_by(err, (Interrupted, StopNow))
        if stop is None:
            raise
        print(f"interrupted: {stop}", file=sys.stderr)
        return 128 + stop.signum
    except (SweepError, ConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a full disk, a folder that vanished: details in SWEEP_DIR/sweep.log
        if isinstance(err, BrokenPipeError) and stdout_gone():
            return _reader_gone()
        trains = getattr(args, "command", "run") in ("run", "resume", "evaluate")
        print(f"error: {os_error_message(err, trains)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: re-run the same command to continue where it stopped", file=sys.stderr)
        return 130


def _reader_gone() -> int:
    """stdout's reader stopped reading (``| head``): nothing to say; exit 1, as rich does
    there. stdout now goes nowhere, so the interpreter's last flush cannot fail again."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 1


def entry() -> None:
    """Console-script entry point. After a SIGTERM/SIGINT stop it exits at once (os._exit):
    Ray's own processes may have been signalled too, and its exit hooks could wait on them."""
    code = main()
    if code > 128:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    _exit_done(code)


def _exit_done(code: int) -> None:
    """Exit a finished command with ``code``, as ``sys.exit`` would (its other threads
    joined, the exit hooks run: Ray's shutdown, wandb's, logging's), but a stop meanwhile
    exits at once with that code, and none comes after: the interpreter's own finalization,
    which would give the signals their default action (a SLURM SIGTERM there made a
    finished sweep's job exit 143, without a word), is skipped."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: _flushed_exit(code))
    _join_threads()
    atexit._run_exitfuncs()
    _flushed_exit(code)


def _join_threads() -> None:
    """What ``sys.exit`` does first: CPython's ``threading._shutdown`` (which wakes idle pool
    threads, then joins the non-daemon ones); elsewhere, the joins."""
    shutdown = getattr(threading, "_shutdown", None)
    if shutdown is not None:
        shutdown()
        return
    for thread in threading.enumerate():
        if thread is not threading.main_thread() and not thread.daemon:
            thread.join()


def _flushed_exit(code: int) -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


if __name__ == "__main__":
    entry()
