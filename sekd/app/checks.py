"""Validate the composed Hydra config once, at the entry point, before anything heavy happens.

The schema (sekd/config/schema.py) types the tree while Hydra composes it and checks each node's own values when
`typed` converts it; what stays here are the checks that span nodes or ask a registry (names exist, a
criterion can take the class target, on-policy needs task data, files, an eval suite's packages), one
small function each. Every refusal is a ConfigError with one line naming the key and what is allowed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence, cast

from omegaconf import DictConfig, OmegaConf

from sekd.core.errors import ConfigError
from sekd.core.registry import RegistryError
from sekd.config.schema import DataConfig, RunConfig, choice


def unknown_key(key: str, allowed: Any) -> ConfigError:
    """The one line for a key that does not exist: it and the keys its node allows."""
    group, _, _ = key.rpartition(".")
    return ConfigError(
        f"unknown key {key!r}; allowed in {group or 'the top level'}: {', '.join(sorted(map(str, allowed))) or 'none'}"
    )


def typed(cfg: DictConfig) -> RunConfig:
    """The run's config as the schema's objects, converted once: every dataclass checks its own values
    here (Hydra's composition types the tree but runs no __post_init__). A config composed without the
    schema (a saved config.yaml) is merged into it first. Raises ConfigError."""
    from omegaconf.errors import ConfigKeyError, ValidationError

    if "hydra" in cfg:
        cfg = without_hydra(cfg.copy())
    missing = OmegaConf.missing_keys(cfg)
    if missing:
        key = sorted(missing)[0]
        raise ConfigError(f"{key} is required (set it on the command line: {key}=...)")
    if OmegaConf.get_type(cfg) is not RunConfig:
        from sekd.config.schema import OnPolicyRegime

        schema = OmegaConf.structured(RunConfig)
        if OmegaConf.select(cfg, "regime.name") == "on_policy":  # what conf/regime/on_policy.yaml extends
            schema = OmegaConf.merge(schema, {"regime": OmegaConf.structured(OnPolicyRegime)})
        try:
            cfg = cast(DictConfig, OmegaConf.merge(schema, cfg))  # two dict configs merge into one
        except (ConfigKeyError, ValidationError) as err:
            raise schema_error(err) from None
    _known_keys(cfg)
    run = OmegaConf.to_object(cfg)
    assert isinstance(run, RunConfig)  # the tree is typed by the schema (merged into it above)
    return run


def _known_keys(node: DictConfig, path: str = "") -> None:
    """Keys appended with `+key=...` get past Hydra into a typed node: each must be a field of its class."""
    import dataclasses

    kind = OmegaConf.get_type(node)
    if not (isinstance(kind, type) and dataclasses.is_dataclass(kind)):
        return  # a mapping the schema leaves open (data, options, the embedded pair's sizes)
    allowed = [f.name for f in dataclasses.fields(kind)]
    for key in node.keys():
        if key not in allowed:
            raise unknown_key(f"{path}{key!s}", allowed)
        child = node._get_node(key)
        if isinstance(child, DictConfig) and not (child._is_none() or child._is_missing() or child._is_interpolation()):
            _known_keys(child, f"{path}{key}.")


def schema_error(err: Exception, overrides: Sequence[str] = ()) -> ConfigError:
    """One line for OmegaConf's refusal of a key or a value's type, in the words of the schema's checks:
    `seed=True must be an integer`, `unknown key 'train.lrr'; allowed in train: ...`."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf.errors import ConfigKeyError

    from sekd.config.schema import rule

    key = str(getattr(err, "full_key", "") or "")
    if isinstance(err, ConfigKeyError):
        parent = key.rpartition(".")[0]
        return unknown_key(key, _fields_at(parent))
    given = [o.value() for o in OverridesParser.create().parse_overrides(list(overrides)) if o.key_or_group == key]
    what = rule(key)
    if key and what and given:
        return ConfigError(f"{key}={given[-1]!r} must be {what}")
    msg = str(err).splitlines()[0] if str(err) else type(err).__name__
    return ConfigError(f"{key}: {msg}" + (f" (must be {what})" if what else "") if key else msg)


def _fields_at(path: str) -> list[str]:
    """The field names of the schema's class at a dotted path ('' is the top)."""
    import dataclasses
    import typing

    kind: Any = RunConfig
    for part in filter(None, path.split(".")):
        kind = typing.get_type_hints(kind).get(part) if dataclasses.is_dataclass(kind) else None
    return [f.name for f in dataclasses.fields(kind)] if dataclasses.is_dataclass(kind) else []


def validate(cfg: DictConfig) -> RunConfig:
    """Every check that needs no model: the schema's (keys, types, each node's values), then the checks
    that span nodes or ask a registry. Returns the typed config; raises ConfigError."""
    from sekd.plugins import load

    run = typed(cfg)
    load(run.plugins)  # a plugin's names are valid below, as a built-in's are
    for check in (
        check_data,
        check_position,
        check_classes,
        check_samples,
        check_criterion,
        check_regime,
        check_eval,
        check_placement,
    ):
        check(run)
    return run


def _registry_check(check: Any, *args: Any, **kwargs: Any) -> Any:
    """A registry's refusal (an unknown name, an option's type or range) as a ConfigError."""
    try:
        return check(*args, **kwargs)
    except (RegistryError, OSError, ValueError) as err:  # DataError, or a data file that cannot be read
        raise ConfigError(str(err)) from None


def check_data(run: RunConfig) -> None:
    """The source exists and takes the data group's other keys; its local files read through."""
    from sekd.data.qa import QA_SOURCES, check_qa_source
    from sekd.data.sources import SOURCES, check_source

    d = run.data
    choice("data.name", d.name, [*SOURCES.names(), *QA_SOURCES.names()])
    _registry_check(check_qa_source if is_task_data(run) else check_source, d.name, dict(d.options))


def check_position(run: RunConfig) -> None:
    """The signal, policy and normalization exist; the policy takes position.options."""
    from sekd.selection.policies import POLICIES
    from sekd.selection.signals import NORMALIZATIONS, SIGNALS

    p = run.position
    if p.signal is not None:
        choice("position.signal", p.signal, SIGNALS.names())
    choice("position.policy", p.policy, POLICIES.names())
    choice("position.normalization", p.normalization, NORMALIZATIONS)
    _registry_check(POLICIES.check_kwargs, p.policy, policy_options(run), key="position.options")


def check_classes(run: RunConfig) -> None:
    """The class sampler exists and takes classes.options; a sparse target needs a criterion that can
    take it; a cache holds only a sampler that reads the teacher alone; a cache folder holds a teacher cache."""
    from sekd.selection.classes import CLASSES
    from sekd.selection.criteria import CRITERIA, sparse_divergence

    c = run.classes
    choice("classes.name", c.name, ["full", *CLASSES.names()])
    if c.name != "full":
        _registry_check(CLASSES.check_kwargs, c.name, dict(c.options), key="classes.options")
        if run.criterion.name in CRITERIA:
            form = CLASSES.get(c.name).form_of(dict(c.options))
            try:
                sparse_divergence(CRITERIA.get(run.criterion.name), f"classes.name={c.name}", form)
            except ValueError as err:  # its words, keyed by the config's names
                why = str(err).removeprefix(f"criterion {run.criterion.name!r}")
                raise ConfigError(f"criterion.name={run.criterion.name!r}{why}") from None
    if c.cache is not None and c.name in CLASSES and CLASSES.get(c.name).needs_student:
        from sekd.stores.teacher_cache.kinds import student_refusal

        raise ConfigError(student_refusal(c.name))
    if c.cache not in (None, "auto") and not (Path(c.cache) / "manifest.json").exists():
        raise ConfigError(
            f"classes.cache={c.cache!r}: no teacher cache there (no manifest.json); "
            f"build one with `sekd-cache build` or use classes.cache=auto"
        )


def check_samples(run: RunConfig) -> None:
    from sekd.selection.samples import SAMPLE_SELECTORS

    choice("samples.name", run.samples.name, SAMPLE_SELECTORS.names())


def check_criterion(run: RunConfig) -> None:
    from sekd.selection.criteria import CRITERIA

    choice("criterion.name", run.criterion.name, CRITERIA.names())
    _registry_check(CRITERIA.check_kwargs, run.criterion.name, dict(run.criterion.options), key="criterion.options")


def check_regime(run: RunConfig) -> None:
    """On-policy samples answers to task prompts; the teacher's classes drawn for the data do not apply."""
    if run.regime.name != "on_policy":
        return
    if not is_task_data(run):
        raise ConfigError(
            f"regime=on_policy samples answers to task prompts: it needs task data "
            f"(data=arith or data=gsm8k), not data={run.data.name}"
        )
    c = run.classes
    if c.name == "rs_kd" or c.cache is not None:  # docs/method.md §10
        raise ConfigError(
            f"classes.name={c.name} (cache={c.cache}) does not apply on-policy: the student's "
            "sampled answers are not in the data the teacher's classes were drawn for; use classes=full"
        )


def check_eval(run: RunConfig) -> None:
    """The suite exists, its scorer's packages are installed, and the split it scores exists."""
    import importlib.util

    from sekd.evaluation.suites import SUITES

    e = run.eval
    choice("eval.suite", e.suite, [*SUITES, "none"])
    if e.suite == "paper":  # IFEval's scorer imports packages lm-eval[hf] does not bring
        lacking = [m for m in ("langdetect", "immutabledict", "nltk") if importlib.util.find_spec(m) is None]
        if lacking:
            raise ConfigError(
                f"eval.suite=paper scores IFEval, which needs {', '.join(lacking)}: "
                f"pip install 'sekd[paper]' (and NLTK's punkt_tab data on offline nodes)"
            )
    if e.suite == "validation" and run.data.options.get("validation_size") == 0:
        raise ConfigError(
            "eval.suite=validation scores GSM8K's held-out train problems, but data.validation_size=0 holds none out"
        )


def check_placement(run: RunConfig) -> None:
    """model.teacher_device places the teacher of one process; ranks each hold their own teacher beside
    their student (LOCAL_RANK's card), so one fixed device for every rank's teacher would stack them on one
    card. Whether the device exists is sekd.models.loading.check_environment's (this machine's) question."""
    if run.model.teacher_device is not None and run.train.distributed != "none":
        raise ConfigError(
            f"model.teacher_device={run.model.teacher_device} places the teacher of one process; with "
            f"train.distributed={run.train.distributed} each rank holds its teacher on its own device: "
            "leave model.teacher_device null"
        )


# ---- the command line, before Hydra starts a job ---------------------------------------------

INFO_FLAGS = ("help", "hydra_help", "cfg", "info", "shell_completion", "experimental_rerun", "config_path")


def check_command_line(argv: list[str], config_dir: str, config_name: str) -> None:
    """Compose the config a `sekd-train` command line asks for, as Hydra will, and raise ConfigError with
    one line before Hydra makes a run folder: an unknown key names the keys its node allows (Hydra's own
    refusal is six lines and a hint about HYDRA_FULL_ERROR), any other composition error is folded into
    one line, and a single run's config is validated. A multirun's cells are validated by the sweeper.
    Flags that only print (--help, --cfg, --info, ...) are left to Hydra."""
    from hydra._internal.utils import get_args_parser
    from hydra.types import RunMode

    args = get_args_parser().parse_args(argv)
    if any(getattr(args, flag, None) for flag in INFO_FLAGS):
        return
    _strict_flags(list(args.overrides))
    loader = _config_loader(config_dir, args.config_dir)
    name, overrides = args.config_name or config_name, list(args.overrides)
    cfg = _compose(loader, name, overrides, RunMode.MULTIRUN)  # how Hydra reads hydra.mode
    multirun = bool(args.multirun or cfg.hydra.get("mode") == RunMode.MULTIRUN)
    if not multirun:
        cfg = _compose(loader, name, overrides, RunMode.RUN)
    check_hydra_folder(cfg, multirun)  # Hydra makes it before any job starts: a read-only disk is its traceback
    if not multirun:
        validate(without_hydra(cfg))


def check_hydra_folder(cfg: DictConfig, multirun: bool) -> None:
    """Hydra's output folder (hydra.run.dir, or hydra.sweep.dir for a multirun; under paths.root unless set)
    must be writable: Hydra makes it, and its log, before the job's own checks run."""
    from hydra.core.utils import setup_globals
    from omegaconf import OmegaConf

    from sekd.app.preflight import check_writable

    setup_globals()  # Hydra's resolvers (${now:...}), as its run registers them
    node = "sweep" if multirun else "run"
    raw = str(OmegaConf.select(cfg, f"hydra.{node}.dir", throw_on_resolution_failure=False) or "")
    root = str(OmegaConf.select(cfg, "paths.root", throw_on_resolution_failure=False) or "")
    if not raw or "${" in raw:  # a resolver Hydra alone knows: its job's own checks will see the disk
        return
    key = "paths.root" if root and Path(raw).absolute().is_relative_to(Path(root).absolute()) else f"hydra.{node}.dir"
    check_writable(key, Path(raw))


def _strict_flags(overrides: list[str]) -> None:
    """true or false only: Hydra would read `yes`, `on` or `1` as true for a boolean key (YAML 1.1), and
    `model.trust_remote_code=yes` is not a spelling to guess at."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    from sekd.config.schema import rule

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException:
        return  # composing names the override that does not parse
    for o in parsed:
        if not o.is_sweep_override() and rule(o.key_or_group) == "true or false" and not isinstance(o.value(), bool):
            raise ConfigError(f"{o.key_or_group}={o.value()!r} must be true or false")


def without_hydra(cfg: DictConfig) -> DictConfig:
    """The run's own keys: Hydra's node is filled in by the job itself (its ??? are not ours to check)."""
    from omegaconf import open_dict

    with open_dict(cfg):
        cfg.pop("hydra", None)
    return cfg


def _config_loader(config_dir: str, extra_dir: str | None):
    """Hydra's config loader over the same search path its app uses (plus --config-dir)."""
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra._internal.utils import create_config_search_path
    from hydra.core.config_search_path import SearchPathQuery

    search_path = create_config_search_path(config_dir)
    if extra_dir is not None:
        if not Path(extra_dir).is_dir():
            raise ConfigError(f"--config-dir {extra_dir}: no such folder")
        search_path.prepend(
            provider="command-line",
            path=f"file://{Path(extra_dir).resolve()}",
            anchor=SearchPathQuery(provider="schema"),
        )
    return ConfigLoaderImpl(config_search_path=search_path)


def _compose(loader, name: str, overrides: list[str], mode) -> DictConfig:
    """Compose as Hydra does in `mode` (a single run refuses sweeps like `seed=1,2`)."""
    from hydra.errors import HydraException, OverrideParseException
    from hydra.types import RunMode

    try:
        return loader.load_configuration(
            config_name=name, overrides=list(overrides), run_mode=mode, validate_sweep_overrides=mode == RunMode.RUN
        )
    except OverrideParseException as err:  # its message does not say which override
        raise ConfigError(f"cannot parse the override {err.override!r}: {_one_line(str(err))}") from None
    except HydraException as err:
        raise _composition_error(err, loader, name, overrides, mode) from None


def _composition_error(err: Exception, loader, name: str, overrides: list[str], mode) -> ConfigError:
    """One line for a failed composition. An override of a key that does not exist is composed again as
    an append (`+key=value`), so `validate` names it exactly as it names an appended unknown key."""
    import re

    from hydra.core.override_parser.overrides_parser import OverridesParser

    from omegaconf.errors import ConfigKeyError, ValidationError

    if isinstance(err.__cause__, (ConfigKeyError, ValidationError)) and not str(err).startswith("Could not"):
        return schema_error(err.__cause__, overrides)  # a value of the wrong type, a key no class has
    missing = re.match(r"Could not override '([^']+)'", str(err))
    if missing is None:
        return ConfigError(_one_line(str(err)))
    key = missing.group(1)
    parsed = OverridesParser.create().parse_overrides(overrides)
    appended = [f"+{o.input_line}" if o.key_or_group == key and not o.is_add() else o.input_line for o in parsed]
    try:
        cfg = without_hydra(
            loader.load_configuration(
                config_name=name, overrides=appended, run_mode=mode, validate_sweep_overrides=False
            )
        )
        validate(cfg)
    except ConfigError as named:
        if key in str(named):
            return named
    except Exception:  # noqa: BLE001 - the plain line below still names the key
        pass
    others = [o.input_line for o in parsed if o.key_or_group != key]
    parent = OmegaConf.select(
        loader.load_configuration(config_name=name, overrides=others, run_mode=mode, validate_sweep_overrides=False),
        key.rpartition(".")[0] or ".",
        default=None,
    )
    return unknown_key(key, parent.keys() if isinstance(parent, DictConfig) else [])


def _one_line(message: str) -> str:
    """Hydra's multi-line message as one line: its lines joined by '; ', a listing after a line that ends
    in ':' (Hydra's "Available options in 'experiment':") joined by commas."""
    pieces: list[str] = []
    listing = False
    for line in filter(None, (ln.strip() for ln in message.splitlines())):
        if line.startswith(("Config search path", "See https://")):
            break  # Hydra's own debugging aids
        if listing:
            pieces[-1] += (" " if pieces[-1].endswith(":") else ", ") + line
        else:
            pieces.append(line)
        listing = listing or line.endswith(":")
    return "; ".join(pieces) or "the config cannot be composed"


def is_task_data(cfg: DictConfig | RunConfig) -> bool:
    """Task-specific data (question/answer problems, KD on answer tokens) rather than packed documents."""
    from sekd.data.qa import is_task_source

    return is_task_source(cfg.data.name)


def source_options(cfg: DictConfig | RunConfig) -> dict[str, Any]:
    """The data group's keys that belong to its source (all but the keys every source shares)."""
    if isinstance(cfg, RunConfig):
        return dict(cfg.data.options)
    return DataConfig.of(cast(dict[str, Any], OmegaConf.to_container(cfg.data, resolve=True))).options


def policy_options(cfg: DictConfig | RunConfig) -> dict[str, Any]:
    """Keyword options for the position policy: k (where it takes one) plus position.options."""
    from sekd.selection.policies import POLICIES

    opts = dict(
        cfg.position.options
        if isinstance(cfg, RunConfig)
        else cast(dict[str, Any], OmegaConf.to_container(cfg.position.options, resolve=True)) or {}
    )
    if "k" in POLICIES.options(cfg.position.policy) and "k" not in opts:
        opts["k"] = float(cfg.position.k)
    return opts
