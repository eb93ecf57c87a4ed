"""Validate the composed Hydra config once, at the entry point, before anything heavy happens.

Validators raise `ConfigError` with one line naming the key and the allowed values; they never edit
the config. The rest of the program reads plain values from the (read-only) DictConfig.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from sekd.errors import ConfigError  # noqa: F401  (re-exported: callers import it from here)
from sekd.registry import RegistryError
# the run's identity (resolved config, hashes, folders) lives with the run folder; re-exported for callers
from sekd.run import (UNHASHED, config_hash, eval_hash, resolved, run_dir,  # noqa: F401
                      scores_dir, train_hash)

MODES = ("distill", "score_student", "score_teacher")
STAGES = ("all", "train", "score")
REGIMES = ("off_policy", "on_policy")  # one job does both, or training and scoring run as separate jobs

# Keys each group may hold; anything else is a typo and fails with the key's name.
SCHEMA: dict[str, set[str]] = {
    "": {"defaults", "preset", "label", "mode", "stage", "seed", "force", "paths", "model", "data", "position",
         "classes", "samples", "criterion", "regime", "train", "eval", "logging", "resources", "hydra",
         "experiment"},
    "paths": {"root", "cache"},
    "model": {"name", "source", "teacher", "student", "tokenizer", "trust_remote_code", "embedded", "task"},
    "position": {"signal", "policy", "k", "normalization", "options"},
    "classes": {"name", "options", "cache"},
    "samples": {"name", "l", "batch_size"},
    "criterion": {"name", "options"},
    "regime": {"name", "mix", "temperature", "top_p", "max_new_tokens"},
    "train": {"steps", "epochs", "micro_batch_size", "grad_accum", "optimizer", "lr", "weight_decay",
              "betas", "lr_schedule", "warmup_steps", "max_grad_norm", "lam", "temperature",
              "normalization", "precision", "device", "threads", "flow", "chunk_size", "ckpt_every", "log_every",
              "trace_selection_steps"},
    "eval": {"suite", "split", "batch_size", "seed", "limit", "device"},
    "logging": {"wandb", "project", "entity", "group"},
    "resources": {"partition", "gpus", "cpus", "mem_gb", "timeout_min", "array_parallelism"},
}


def _choice(key: str, value: Any, allowed: Any) -> None:
    allowed = list(allowed)
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not allowed; choose one of: {', '.join(map(str, allowed))}")


def _positive(key: str, value: Any, *, zero_ok: bool = False, integer: bool = False) -> None:
    kind = int if integer else (int, float)
    ok = isinstance(value, kind) and not isinstance(value, bool) and (value >= 0 if zero_ok else value > 0)
    if not ok:
        bound = ">= 0" if zero_ok else "> 0"
        raise ConfigError(f"{key}={value!r} must be {'an integer' if integer else 'a number'} {bound}")


def _fraction(key: str, value: Any) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value <= 1:
        raise ConfigError(f"{key}={value!r} must be a fraction in (0, 1]")


def _flag(key: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"{key}={value!r} must be true or false")


def _betas(key: str, value: Any) -> None:
    """Adam's (beta1, beta2), each in [0, 1)."""
    pair = list(value) if OmegaConf.is_list(value) or isinstance(value, (list, tuple)) else None
    if pair is None or len(pair) != 2 or not all(
            isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in pair):
        shown = pair if pair is not None else value
        raise ConfigError(f"{key}={shown!r} must be two numbers [beta1, beta2], each in [0, 1)")


def _name(key: str, value: Any) -> None:
    """A name that becomes part of a folder name: a non-empty string without path separators."""
    if not isinstance(value, str) or not value or "/" in value or value in (".", ".."):
        raise ConfigError(f"{key}={value!r} must be a plain name (letters, digits, -, _; no '/')")


def _mapping(key: str, value: Any) -> None:
    """An `options` node: a mapping of option to value ({} for none)."""
    if not isinstance(value, DictConfig) or value._is_none():
        raise ConfigError(f"{key}={OmegaConf.to_container(value) if OmegaConf.is_config(value) else value!r} "
                          "must be a mapping of option: value ({} for none)")


def unknown_key(key: str, allowed: Any) -> ConfigError:
    """The one line for a key that does not exist: it and the keys its node allows."""
    group, _, _ = key.rpartition(".")
    return ConfigError(f"unknown key {key!r}; allowed in {group or 'the top level'}: "
                       f"{', '.join(sorted(map(str, allowed))) or 'none'}")


def _known_keys(cfg: DictConfig) -> None:
    for group, allowed in SCHEMA.items():
        node = cfg if not group else cfg.get(group)
        if not isinstance(node, DictConfig):
            continue
        for key in node.keys():
            if key not in allowed and not (group == "" and key == "hydra"):
                raise unknown_key(f"{group}.{key}" if group else str(key), allowed)


def validate(cfg: DictConfig) -> None:
    """Every check that needs no model: keys, names, ranges, files. Raises ConfigError."""
    from sekd.data.qa import QA_SOURCES, check_qa_source
    from sekd.data.sources import SOURCES, check_source
    from sekd.evaluation.suites import SUITES
    from sekd.selection.classes import CLASSES
    from sekd.selection.criteria import CRITERIA, sparse_capable
    from sekd.selection.samples import SAMPLERS
    from sekd.selection.policies import POLICIES
    from sekd.selection.signals import NORMALIZATIONS, SIGNALS

    missing = OmegaConf.missing_keys(cfg)
    if missing:
        key = sorted(missing)[0]
        raise ConfigError(f"{key} is required (set it on the command line: {key}=...)")
    _known_keys(cfg)
    _choice("mode", cfg.mode, MODES)
    _choice("stage", cfg.stage, STAGES)
    if not isinstance(cfg.seed, int) or isinstance(cfg.seed, bool):
        raise ConfigError(f"seed={cfg.seed!r} must be an integer")
    _flag("force", cfg.force)
    _name("preset", cfg.preset)

    m = cfg.model
    _choice("model.source", m.source, ("embedded", "pretrained"))
    _flag("model.trust_remote_code", m.trust_remote_code)
    if m.source == "pretrained":
        for who in ("teacher", "student"):
            if not m.get(who):
                raise ConfigError(f"model.{who} is required for model.source=pretrained (a hub name or a folder)")
    elif not m.get("embedded"):
        raise ConfigError("model.embedded is required for model.source=embedded")

    d = cfg.data
    _choice("data.name", d.name, [*SOURCES.names(), *QA_SOURCES.names()])
    _positive("data.seq_len", d.seq_len, integer=True)
    if d.get("token_budget") is not None:
        _positive("data.token_budget", d.token_budget, integer=True)
        if d.token_budget < d.seq_len:  # packing makes token_budget // seq_len sequences
            raise ConfigError(f"data.token_budget={d.token_budget} is less than one sequence of "
                              f"data.seq_len={d.seq_len} tokens: training would see no data")
    if d.get("max_samples") is not None:
        _positive("data.max_samples", d.max_samples, integer=True)
    try:
        (check_qa_source if is_task_data(cfg) else check_source)(d.name, source_options(cfg))
    except (RegistryError, OSError, ValueError) as err:  # DataError, or a data file that cannot be read
        raise ConfigError(str(err)) from None

    p = cfg.position
    for group in ("position", "classes", "criterion"):
        _mapping(f"{group}.options", cfg[group].get("options"))
    if p.signal is not None:
        _choice("position.signal", p.signal, SIGNALS.names())
    _choice("position.policy", p.policy, POLICIES.names())
    _fraction("position.k", p.k)
    _choice("position.normalization", p.normalization, NORMALIZATIONS)
    try:
        POLICIES.check_kwargs(p.policy, policy_options(cfg), key="position.options")
    except RegistryError as err:
        raise ConfigError(str(err)) from None
    if p.policy != "all" and p.signal is None:
        raise ConfigError(f"position.signal is required for position.policy={p.policy}")

    c = cfg.classes
    _choice("classes.name", c.name, ["full", *CLASSES.names()])
    if c.name != "full":
        try:
            CLASSES.check_kwargs(c.name, dict(c.options or {}), key="classes.options")
        except RegistryError as err:
            raise ConfigError(str(err)) from None
        if cfg.criterion.name not in sparse_capable():  # what each criterion declares (its `sparse` form)
            raise ConfigError(f"criterion.name={cfg.criterion.name!r} cannot use a sparse class target "
                              f"(classes.name={c.name}); choose one of: {', '.join(sparse_capable())}")
    elif c.options:
        raise ConfigError(f"classes.options={dict(c.options)} given, but classes.name=full takes none")
    if c.cache is not None:
        if c.name != "rs_kd":
            raise ConfigError(f"classes.cache is only for classes.name=rs_kd (got {c.name!r})")
        if c.cache != "auto" and not (Path(c.cache) / "manifest.json").exists():
            raise ConfigError(f"classes.cache={c.cache!r}: no teacher cache there (no manifest.json); "
                              f"build one with `sekd-cache build` or use classes.cache=auto")
    _choice("samples.name", cfg.samples.name, SAMPLERS.names())
    _fraction("samples.l", cfg.samples.l)
    _positive("samples.batch_size", cfg.samples.batch_size, integer=True)
    _choice("criterion.name", cfg.criterion.name, CRITERIA.names())
    try:
        CRITERIA.check_kwargs(cfg.criterion.name, dict(cfg.criterion.options or {}), key="criterion.options")
    except RegistryError as err:
        raise ConfigError(str(err)) from None

    t = cfg.train
    _positive("train.lr", t.lr)
    _positive("train.weight_decay", t.weight_decay, zero_ok=True)
    _betas("train.betas", t.betas)
    _positive("train.micro_batch_size", t.micro_batch_size, integer=True)
    _positive("train.grad_accum", t.grad_accum, integer=True)
    if t.steps is not None:
        _positive("train.steps", t.steps, integer=True)
    _positive("train.epochs", t.epochs, integer=True)
    _choice("train.optimizer", t.optimizer, ("adamw", "adam8bit"))
    _choice("train.lr_schedule", t.lr_schedule, ("constant", "cosine"))
    _positive("train.warmup_steps", t.warmup_steps, zero_ok=True, integer=True)
    if t.max_grad_norm is not None:
        _positive("train.max_grad_norm", t.max_grad_norm)
    if not isinstance(t.lam, (int, float)) or not 0 <= t.lam <= 1:
        raise ConfigError(f"train.lam={t.lam!r} must be in [0, 1]")
    _positive("train.temperature", t.temperature)
    _choice("train.normalization", t.normalization, ("per_sequence", "batch_tokens"))
    _choice("train.precision", t.precision, ("auto", "fp32", "bf16"))
    _choice("train.flow", t.flow, ("chunked", "dense"))
    if t.chunk_size != "auto":
        _positive("train.chunk_size", t.chunk_size, integer=True)
    _choice("train.device", t.device, ("auto", "cpu", "cuda"))
    _positive("train.ckpt_every", t.ckpt_every, zero_ok=True, integer=True)
    _positive("train.log_every", t.log_every, integer=True)
    _positive("train.trace_selection_steps", t.trace_selection_steps, zero_ok=True, integer=True)
    if t.threads is not None:
        _positive("train.threads", t.threads, integer=True)

    r = cfg.regime
    _choice("regime.name", r.name, REGIMES)
    if r.name == "on_policy":
        if not is_task_data(cfg):
            raise ConfigError(f"regime=on_policy samples answers to task prompts: it needs task data "
                              f"(data=arith or data=gsm8k), not data={d.name}")
        if not isinstance(r.mix, (int, float)) or isinstance(r.mix, bool) or not 0 <= r.mix <= 1:
            raise ConfigError(f"regime.mix={r.mix!r} must be a fraction in [0, 1]")
        _positive("regime.temperature", r.temperature, zero_ok=True)
        _fraction("regime.top_p", r.top_p)
        _positive("regime.max_new_tokens", r.max_new_tokens, integer=True)
        if c.name == "rs_kd" or c.cache is not None:  # docs/method.md §10
            raise ConfigError(f"classes.name={c.name} (cache={c.cache}) does not apply on-policy: the student's "
                              "sampled answers are not in the data the teacher's classes were drawn for; use classes=full")

    e = cfg.eval
    _choice("eval.suite", e.suite, [*SUITES, "none"])
    _choice("eval.split", e.split, ("test", "validation"))
    if e.suite == "paper":  # IFEval's scorer imports packages lm-eval[hf] does not bring
        import importlib.util

        lacking = [m for m in ("langdetect", "immutabledict", "nltk") if importlib.util.find_spec(m) is None]
        if lacking:
            raise ConfigError(f"eval.suite=paper scores IFEval, which needs {', '.join(lacking)}: "
                              f"pip install 'sekd[paper]' (and NLTK's punkt_tab data on offline nodes)")
    _positive("eval.batch_size", e.batch_size, integer=True)
    _positive("eval.seed", e.seed, zero_ok=True, integer=True)
    if e.suite == "validation" and d.get("validation_size") == 0:
        raise ConfigError("eval.suite=validation scores GSM8K's held-out train problems, but data.validation_size=0 "
                          "holds none out")
    if e.limit is not None:
        _positive("eval.limit", e.limit, integer=True)
    _choice("logging.wandb", cfg.logging.wandb, ("offline", "online", "disabled"))
    res = cfg.get("resources")
    if res is not None:
        _positive("resources.gpus", res.gpus, zero_ok=True, integer=True)
        for key in ("cpus", "mem_gb", "timeout_min", "array_parallelism"):
            _positive(f"resources.{key}", res[key], integer=True)


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
    loader = _config_loader(config_dir, args.config_dir)
    name, overrides = args.config_name or config_name, list(args.overrides)
    cfg = _compose(loader, name, overrides, RunMode.MULTIRUN)  # how Hydra reads hydra.mode
    if args.multirun or cfg.hydra.get("mode") == RunMode.MULTIRUN:
        return
    validate(without_hydra(_compose(loader, name, overrides, RunMode.RUN)))


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
        search_path.prepend(provider="command-line", path=f"file://{Path(extra_dir).resolve()}",
                            anchor=SearchPathQuery(provider="schema"))
    return ConfigLoaderImpl(config_search_path=search_path)


def _compose(loader, name: str, overrides: list[str], mode) -> DictConfig:
    """Compose as Hydra does in `mode` (a single run refuses sweeps like `seed=1,2`)."""
    from hydra.errors import HydraException, OverrideParseException
    from hydra.types import RunMode

    try:
        return loader.load_configuration(config_name=name, overrides=list(overrides), run_mode=mode,
                                         validate_sweep_overrides=mode == RunMode.RUN)
    except OverrideParseException as err:  # its message does not say which override
        raise ConfigError(f"cannot parse the override {err.override!r}: {_one_line(str(err))}") from None
    except HydraException as err:
        raise _composition_error(err, loader, name, overrides, mode) from None


def _composition_error(err: Exception, loader, name: str, overrides: list[str], mode) -> ConfigError:
    """One line for a failed composition. An override of a key that does not exist is composed again as
    an append (`+key=value`), so `validate` names it exactly as it names an appended unknown key."""
    import re

    from hydra.core.override_parser.overrides_parser import OverridesParser

    missing = re.match(r"Could not override '([^']+)'", str(err))
    if missing is None:
        return ConfigError(_one_line(str(err)))
    key = missing.group(1)
    parsed = OverridesParser.create().parse_overrides(overrides)
    appended = [f"+{o.input_line}" if o.key_or_group == key and not o.is_add() else o.input_line for o in parsed]
    try:
        cfg = without_hydra(loader.load_configuration(config_name=name, overrides=appended, run_mode=mode,
                                                      validate_sweep_overrides=False))
        validate(cfg)
    except ConfigError as named:
        if key in str(named):
            return named
    except Exception:  # noqa: BLE001 - the plain line below still names the key
        pass
    others = [o.input_line for o in parsed if o.key_or_group != key]
    parent = OmegaConf.select(loader.load_configuration(config_name=name, overrides=others, run_mode=mode,
                                                        validate_sweep_overrides=False),
                              key.rpartition(".")[0] or ".", default=None)
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


def is_task_data(cfg: DictConfig) -> bool:
    """Task-specific data (question/answer problems, KD on answer tokens) rather than packed documents."""
    from sekd.data.qa import QA_SOURCES

    return cfg.data.name in QA_SOURCES.names()


def source_options(cfg: DictConfig) -> dict[str, Any]:
    """The data group's keys that belong to its source (all but name, seq_len, budget, caps, separator)."""
    d = OmegaConf.to_container(cfg.data, resolve=True)
    return {k: v for k, v in d.items()
            if k not in ("name", "seq_len", "token_budget", "max_samples", "separator", "answer_tokens")}


def policy_options(cfg: DictConfig) -> dict[str, Any]:
    """Keyword options for the position policy: k (where it takes one) plus position.options."""
    from sekd.selection.policies import POLICIES

    opts = dict(OmegaConf.to_container(cfg.position.options, resolve=True) or {})
    if "k" in POLICIES.options(cfg.position.policy) and "k" not in opts:
        opts["k"] = float(cfg.position.k)
    return opts
