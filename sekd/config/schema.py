"""The run's config as one tree of dataclasses: the schema Hydra composes conf/ against, and the typed
object the program reads.

Hydra merges every group's YAML into these classes (`base_config`, conf/config.yaml's first default), so it
refuses an unknown key or a value of the wrong type while composing; `OmegaConf.to_object` then builds the
objects and each class's `__post_init__` checks its own values (ConfigError, one line naming the key).
Checks across nodes or against a registry are sekd.app.checks's. A class's defaults are the embedded
profile's, and a field exists only where every YAML of its group has the key, so the composed tree and the
hashes naming run folders are what they were before the schema (sekd.app.checks.SCHEMA_ONLY names the one
exception). Two nodes' keys vary: `data` (each source's own, `options` once a DataConfig) and `regime`
(the on-policy keys of OnPolicyRegime, which conf/regime/on_policy.yaml extends).
"""

from __future__ import annotations

import dataclasses
import math
import re
import typing
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Dict, List, Optional

from sekd.core.errors import ConfigError

MODES = ("distill", "score_student", "score_teacher")
STAGES = ("all", "train", "score")
REGIMES = ("off_policy", "on_policy")  # one job does both, or training and scoring run as separate jobs
DISTRIBUTED = ("none", "ddp", "fsdp")
DEVICE = re.compile(r"cpu|cuda(:\d+)?")  # torch's spelling of the devices the harness runs on

# ---- one-line checks for __post_init__ ---------------------------------------------------------


def _number(value: Any, integer: bool = False) -> bool:
    kind = int if integer else (int, float)
    return isinstance(value, kind) and not isinstance(value, bool) and (integer or math.isfinite(value))


def choice(key: str, value: Any, allowed: Any) -> None:
    allowed = list(allowed)
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not allowed; choose one of: {', '.join(map(str, allowed))}")


def positive(key: str, value: Any, *, zero_ok: bool = False, integer: bool = False, optional: bool = False) -> None:
    """> 0 (>= 0 with zero_ok); `optional`: None passes."""
    if optional and value is None:
        return
    if not (_number(value, integer) and (value >= 0 if zero_ok else value > 0)):
        bound = ">= 0" if zero_ok else "> 0"
        raise ConfigError(f"{key}={value!r} must be {'an integer' if integer else 'a number'} {bound}")


def fraction(key: str, value: Any, *, zero_ok: bool = False) -> None:
    """In (0, 1], or [0, 1] with zero_ok."""
    if not (_number(value) and (0 <= value if zero_ok else 0 < value) and value <= 1):
        raise ConfigError(f"{key}={value!r} must be a fraction in {'[' if zero_ok else '('}0, 1]")


def flag(key: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"{key}={value!r} must be true or false")


def plain_name(key: str, value: Any) -> None:
    """A name that becomes part of a folder name: a non-empty string without path separators."""
    if not isinstance(value, str) or not value or "/" in value or value in (".", ".."):
        raise ConfigError(f"{key}={value!r} must be a plain name (letters, digits, -, _; no '/')")


def device_name(key: str, value: Any) -> None:
    """None, or a device as torch spells it (cpu, cuda, cuda:N); whether it exists is sekd.app.checks's check."""
    if value is not None and not (isinstance(value, str) and DEVICE.fullmatch(value)):
        raise ConfigError(f"{key}={value!r} is not a device; use cpu, cuda or cuda:N (null = the student's device)")


def mapping(key: str, value: Any) -> None:
    """An `options` node: a mapping of option to value ({} for none)."""
    if not isinstance(value, dict):
        raise ConfigError(f"{key}={value!r} must be a mapping of option: value ({{}} for none)")


# ---- the groups ----------------------------------------------------------------------------------


@dataclass
class PathsConfig:
    root: str = "outputs"  # run folders: <root>/runs/<preset>-s<seed>-<train hash>
    cache: str = ".sekd_cache"  # built tokenizers, models, packed data, eval tasks


@dataclass
class Resources:
    """What one job asks a cluster for (hydra/launcher=slurm reads these); not hashed."""

    partition: str = "debug"
    gpus: int = 0
    cpus: int = 1
    mem_gb: int = 4
    timeout_min: int = 60
    array_parallelism: int = 64
    nodes: int = 1  # nodes one run spans
    tasks_per_node: Optional[int] = None  # processes (ranks) per node; None = one per GPU (one without GPUs)

    def __post_init__(self) -> None:
        positive("resources.gpus", self.gpus, zero_ok=True, integer=True)
        positive("resources.nodes", self.nodes, integer=True)
        positive("resources.tasks_per_node", self.tasks_per_node, integer=True, optional=True)
        for key in ("cpus", "mem_gb", "timeout_min", "array_parallelism"):
            positive(f"resources.{key}", getattr(self, key), integer=True)


@dataclass
class ModelConfig:
    name: str = "embedded"
    source: str = "embedded"  # embedded (built by the harness) | pretrained (hub names or folders)
    teacher: Optional[str] = None
    student: Optional[str] = None
    tokenizer: Optional[str] = None  # pretrained: defaults to the student's
    trust_remote_code: bool = False
    embedded: Optional[Dict[str, Any]] = field(default_factory=dict)  # the embedded pair's sizes (conf/model/)
    task: Optional[Dict[str, Any]] = None  # with task data: the embedded teacher's fine-tuning first
    teacher_device: Optional[str] = None  # the teacher's own device (cuda:1); None = the student's

    def __post_init__(self) -> None:
        choice("model.source", self.source, ("embedded", "pretrained"))
        flag("model.trust_remote_code", self.trust_remote_code)
        device_name("model.teacher_device", self.teacher_device)
        if self.source == "pretrained":
            for who in ("teacher", "student"):
                if not getattr(self, who):
                    raise ConfigError(f"model.{who} is required for model.source=pretrained (a hub name or a folder)")
        elif self.embedded is None:
            raise ConfigError("model.embedded is required for model.source=embedded")
        else:
            for who in ("teacher", "student"):
                spec = self.embedded.get(who) or {}
                choice(f"model.embedded.{who}.keep", spec.get("keep", "last"), ("last", "best_validation"))
                positive(f"model.embedded.{who}.eval_every", spec.get("eval_every", 50), integer=True)


# Keys of the data group that every source shares; the rest are the source's own (DataConfig.options).
DATA_COMMON = ("name", "seq_len", "separator", "token_budget", "max_samples", "answer_tokens")


@dataclass
class DataConfig:
    """One data source: the keys every source shares, typed here; the source's own keys (files, hub path,
    text field, ...) in `options`, checked against the source's signature in its registry."""

    name: str = "embedded"
    seq_len: int = 128
    separator: Optional[str] = None  # the token that ends a document or answer; None: the tokenizer's eos
    token_budget: Optional[int] = None  # packed sources: training tokens; None: the whole train split
    max_samples: Optional[int] = None  # task sources: cap on training problems
    answer_tokens: Optional[int] = None  # task sources, on-policy: the most tokens sampled per answer
    options: Dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, node: typing.Mapping[str, Any]) -> DataConfig:
        """From the data group's mapping: the shared keys by name, every other key into `options`."""
        node = dict(node)
        return cls(**{k: node.pop(k) for k in DATA_COMMON if k in node}, options=node)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str):
            raise ConfigError(f"data.name={self.name!r} must be a string")
        positive("data.seq_len", self.seq_len, integer=True)
        positive("data.token_budget", self.token_budget, integer=True, optional=True)
        if self.token_budget is not None and self.token_budget < self.seq_len:  # packing: budget // seq_len sequences
            raise ConfigError(
                f"data.token_budget={self.token_budget} is less than one sequence of "
                f"data.seq_len={self.seq_len} tokens: training would see no data"
            )
        positive("data.max_samples", self.max_samples, integer=True, optional=True)
        positive("data.answer_tokens", self.answer_tokens, integer=True, optional=True)


@dataclass
class PositionConfig:
    """Which positions a sequence's loss covers: a signal u(t) and a policy over it (docs/method.md §4)."""

    signal: Optional[str] = None
    policy: str = "all"
    k: float = 1.0  # the budget: a fraction of each sequence's valid positions
    normalization: str = "sum"  # how combined signals add their terms
    options: Dict[str, Any] = field(default_factory=dict)  # the policy's own (sekd.selection.policies)

    def __post_init__(self) -> None:
        mapping("position.options", self.options)
        fraction("position.k", self.k)
        if self.policy != "all" and self.signal is None:
            raise ConfigError(f"position.signal is required for position.policy={self.policy}")


@dataclass
class ClassesConfig:
    """Which classes the divergence covers: the whole vocabulary, or a sparse target (docs/method.md §6)."""

    name: str = "full"
    options: Dict[str, Any] = field(default_factory=dict)  # the class sampler's own (sekd.selection.classes)
    cache: Optional[str] = None  # a sparse sampler's: None (online), auto, or a `sekd-cache build` folder

    def __post_init__(self) -> None:
        mapping("classes.options", self.options)
        if self.name == "full" and self.options:
            raise ConfigError(f"classes.options={self.options} given, but classes.name=full takes none")
        if self.cache is not None and self.name == "full":
            raise ConfigError("classes.cache holds a sparse target: it needs a class sampler, not classes.name=full")


@dataclass
class SamplesConfig:
    """Which training samples are kept (docs/method.md §7)."""

    name: str = "all"
    l: float = 1.0  # noqa: E741 - the paper's name: the fraction of samples kept
    batch_size: int = 16  # the pre-pass batch of selectors that score samples

    def __post_init__(self) -> None:
        fraction("samples.l", self.l)
        positive("samples.batch_size", self.batch_size, integer=True)


@dataclass
class CriterionConfig:
    name: str = "forward_kl"
    options: Dict[str, Any] = field(default_factory=dict)  # the criterion's own (sekd.selection.criteria)

    def __post_init__(self) -> None:
        mapping("criterion.options", self.options)


@dataclass
class RegimeConfig:
    """Off-policy: the teacher supervises the data's own tokens (docs/method.md §10)."""

    name: str = "off_policy"

    def __post_init__(self) -> None:
        choice("regime.name", self.name, REGIMES)
        if self.name == "on_policy" and not isinstance(self, OnPolicyRegime):
            raise ConfigError("regime.name=on_policy needs the on-policy keys: choose regime=on_policy")


@dataclass
class OnPolicyRegime(RegimeConfig):
    """On-policy: the student samples answers, the teacher scores them (docs/method.md §10)."""

    name: str = "on_policy"
    mix: float = 1.0  # fraction of optimizer steps on the student's own answers
    temperature: float = 0.7  # sampling; 0 = greedy
    top_p: float = 0.9
    max_new_tokens: int = 256

    def __post_init__(self) -> None:
        super().__post_init__()
        fraction("regime.mix", self.mix, zero_ok=True)
        positive("regime.temperature", self.temperature, zero_ok=True)
        fraction("regime.top_p", self.top_p)
        positive("regime.max_new_tokens", self.max_new_tokens, integer=True)


FSDP_MESH = re.compile(r"([1-9]\d*)x([1-9]\d*)")  # replicas x shard size, e.g. 2x8


@dataclass
class FsdpConfig:
    """train.distributed=fsdp's device mesh (sekd/distributed/fsdp.py). flat: one 1-D mesh over every rank (each weight
    sharded over all of them); hybrid: a 2-D (replicate, shard) mesh, each weight sharded over the ranks of a
    node and replicated across nodes (HSDP: reduce-scatter within a node, all-reduce across); "RxS": that 2-D
    mesh given explicitly, R replicas x S ranks per shard group (R x S = the world size)."""

    mesh: str = "flat"  # flat | hybrid | RxS

    def __post_init__(self) -> None:
        if self.mesh not in ("flat", "hybrid") and not (isinstance(self.mesh, str) and FSDP_MESH.fullmatch(self.mesh)):
            raise ConfigError(
                f"train.fsdp.mesh={self.mesh!r} is not allowed; choose one of: flat, hybrid, or RxS "
                "(replicas x shard size, e.g. 2x8, with R x S = the number of ranks)"
            )


@dataclass
class TrainConfig:
    steps: Optional[int] = 300  # optimizer steps, the same for every method; None = `epochs` passes over the samples
    epochs: int = 2
    micro_batch_size: int = 8
    grad_accum: int = 2
    optimizer: str = "adamw"
    lr: float = 2.0e-3
    weight_decay: float = 0.0
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    max_grad_norm: Optional[float] = 1.0  # None = no clipping
    lam: float = 1.0  # l(t) = lam * KD + (1 - lam) * CE
    temperature: float = 1.0  # KD temperature T; the KD term is scaled by T^2
    normalization: str = "per_sequence"
    flow: str = "chunked"
    # positions per LM-head chunk: "auto" or an integer (Any: OmegaConf's Union[int, str] would refuse 1.5 or
    # true itself, before the one-line check below)
    chunk_size: Any = "auto"
    precision: str = "auto"
    device: str = "auto"
    threads: Optional[int] = None  # torch CPU threads; None = torch's default
    ckpt_every: int = 25  # optimizer steps between resumable checkpoints; 0 = only at the end
    log_every: int = 5
    trace_selection_steps: int = 0
    distributed: str = "none"  # none | ddp | fsdp: how one run spans the ranks a launcher (torchrun, Slurm) starts
    fsdp: FsdpConfig = field(default_factory=FsdpConfig)  # train.distributed=fsdp's mesh
    profile_steps: int = (
        0  # optimizer steps traced by torch.profiler after one warm-up step (profile-rank<r>.json); 0 = none
    )

    def __post_init__(self) -> None:
        choice("train.distributed", self.distributed, DISTRIBUTED)
        positive("train.lr", self.lr)
        positive("train.weight_decay", self.weight_decay, zero_ok=True)
        self._check_betas()
        positive("train.micro_batch_size", self.micro_batch_size, integer=True)
        positive("train.grad_accum", self.grad_accum, integer=True)
        positive("train.steps", self.steps, integer=True, optional=True)
        positive("train.epochs", self.epochs, integer=True)
        choice("train.optimizer", self.optimizer, ("adamw", "adam8bit"))
        choice("train.lr_schedule", self.lr_schedule, ("constant", "cosine"))
        positive("train.warmup_steps", self.warmup_steps, zero_ok=True, integer=True)
        positive("train.max_grad_norm", self.max_grad_norm, optional=True)
        if not _number(self.lam) or not 0 <= self.lam <= 1:
            raise ConfigError(f"train.lam={self.lam!r} must be in [0, 1]")
        positive("train.temperature", self.temperature)
        choice("train.normalization", self.normalization, ("per_sequence", "batch_tokens"))
        choice("train.precision", self.precision, ("auto", "fp32", "bf16"))
        choice("train.flow", self.flow, ("chunked", "dense"))
        if self.chunk_size != "auto":
            positive("train.chunk_size", self.chunk_size, integer=True)
        choice("train.device", self.device, ("auto", "cpu", "cuda"))
        positive("train.ckpt_every", self.ckpt_every, zero_ok=True, integer=True)
        positive("train.log_every", self.log_every, integer=True)
        positive("train.trace_selection_steps", self.trace_selection_steps, zero_ok=True, integer=True)
        positive("train.profile_steps", self.profile_steps, zero_ok=True, integer=True)
        positive("train.threads", self.threads, integer=True, optional=True)

    def _check_betas(self) -> None:
        """Adam's (beta1, beta2), each in [0, 1)."""
        pair = list(self.betas) if isinstance(self.betas, (list, tuple)) else None
        if pair is None or len(pair) != 2 or not all(_number(b) and 0 <= b < 1 for b in pair):
            raise ConfigError(
                f"train.betas={pair if pair is not None else self.betas!r} must be two numbers "
                "[beta1, beta2], each in [0, 1)"
            )


@dataclass
class EvalConfig:
    suite: str = "embedded"  # a suite of sekd.evaluation.suites, or none
    split: str = "test"
    batch_size: int = 16
    seed: int = 42  # lm-eval's seeds: fixed, not the run's, so the spread over seeds is training variance
    limit: Optional[int] = None  # items per task; None = all
    device: str = "auto"

    def __post_init__(self) -> None:
        choice("eval.split", self.split, ("test", "validation"))
        positive("eval.batch_size", self.batch_size, integer=True)
        positive("eval.seed", self.seed, zero_ok=True, integer=True)
        positive("eval.limit", self.limit, integer=True, optional=True)


@dataclass
class LoggingConfig:
    wandb: str = "offline"
    project: str = "sekd"
    entity: Optional[str] = None
    group: Optional[str] = None
    verbose: bool = False  # the libraries' INFO lines and loading bars on the console (lm-eval's: lm_eval.log)

    def __post_init__(self) -> None:
        choice("logging.wandb", self.wandb, ("offline", "online", "disabled"))
        flag("logging.verbose", self.verbose)


@dataclass
class RunConfig:
    """One run: a teacher/student pair x data x the three selection axes x a criterion x training x scoring."""

    preset: str = "custom"  # short name of the preset; results are grouped by it; a name, not hashed
    label: str = "Custom"  # the method's name as in the paper's tables; a name, not hashed
    mode: str = "distill"
    stage: str = "all"  # train and score in one job, or as two
    seed: int = 1337
    force: bool = False  # re-run even when this config's record already exists
    plugins: List[str] = field(default_factory=list)  # a researcher's modules of pieces, imported first (sekd.plugins)
    resources: Resources = field(default_factory=Resources)
    paths: PathsConfig = field(default_factory=PathsConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    # Each source has its own keys: Hydra holds a mapping (Any to OmegaConf), __post_init__ makes it a DataConfig.
    if TYPE_CHECKING:
        data: DataConfig = field(default_factory=DataConfig)
    else:
        data: Any = field(default_factory=dict)
    position: PositionConfig = field(default_factory=PositionConfig)
    classes: ClassesConfig = field(default_factory=ClassesConfig)
    samples: SamplesConfig = field(default_factory=SamplesConfig)
    criterion: CriterionConfig = field(default_factory=CriterionConfig)
    regime: RegimeConfig = field(default_factory=RegimeConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def __post_init__(self) -> None:
        choice("mode", self.mode, MODES)
        choice("stage", self.stage, STAGES)
        if not _number(self.seed, integer=True):
            raise ConfigError(f"seed={self.seed!r} must be an integer")
        flag("force", self.force)
        plain_name("preset", self.preset)
        if not isinstance(self.data, DataConfig):
            if not isinstance(self.data, typing.Mapping):
                raise ConfigError(f"data={self.data!r} must be a mapping (choose a data group: data=...)")
            self.data = DataConfig.of(self.data)


# ---- what Hydra's type errors mean, in the words of the checks above ---------------------------------


def rule(key: str) -> str | None:
    """What the schema allows at a dotted key (`train.lr` -> 'a number'), for Hydra's type errors;
    None for a key the schema does not type."""
    kind: Any = RunConfig
    for part in key.split("."):
        if not (isinstance(kind, type) and dataclasses.is_dataclass(kind)):
            return None
        hints = typing.get_type_hints(kind)
        if part not in hints:
            if kind is RegimeConfig:  # the on-policy keys
                hints = typing.get_type_hints(OnPolicyRegime)
            if part not in hints:
                return None
        kind = hints[part]
        if typing.get_origin(kind) is typing.Union:  # Optional[X]
            kind = next(a for a in typing.get_args(kind) if a is not type(None))
    origin = typing.get_origin(kind)
    if origin in (dict, typing.Dict) or kind is dict or dataclasses.is_dataclass(kind):
        return "a mapping of option: value ({} for none)" if key.endswith("options") else "a mapping"
    if origin in (list, typing.List):
        return "a list"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string", Any: "any value"}.get(kind)


def register() -> None:
    """Put the schema in Hydra's ConfigStore: `base_config` (conf/config.yaml's first default) and the
    on-policy regime's keys (conf/regime/on_policy.yaml extends `/schema/regime/on_policy`)."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    store.store(name="base_config", node=RunConfig)
    store.store(group="schema/regime", name="on_policy", node=OnPolicyRegime, package="regime")


register()
