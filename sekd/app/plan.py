"""Will it fit? The memory of a run, per device, before anything loads (`sekd-train ... --plan`, `sekd-plan`).

    sekd-train experiment=se_kd model=qwen3_8b_to_1.7b train=paper --plan --card 80GB
    sekd-plan experiment=se_kd model=qwen3_8b_to_1.7b train=paper train.distributed=fsdp --world 8 --card 24GB

The run is composed from the real Hydra config (a bad override is refused in one line, as a run's is), but no
weights load and the hub is never asked: a model's shape comes from its config.json (a local folder or the
local Hugging Face cache), the embedded pair's own config, or the built-in table KNOWN (the output says which);
a Qwen3's parameters are counted from its config, any other model's on the meta device. What each row holds
and why the peak is not their sum (the step's PHASES): docs/method.md §9, "Will it fit?".
`benchmarks/plan_check.py` checks it against measured CPU peaks.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from sekd.core.errors import ConfigError

if TYPE_CHECKING:
    from transformers import PretrainedConfig

    from sekd.config.schema import RunConfig, TrainConfig

GIB = 2**30

# Known shapes of hub models, used when their config.json is not on local disk (offline, or never downloaded).
KNOWN: dict[str, dict[str, Any]] = {
    "Qwen/Qwen3-8B": dict(
        model_type="qwen3",
        vocab_size=151936,
        hidden_size=4096,
        intermediate_size=12288,
        num_hidden_layers=36,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        tie_word_embeddings=False,
    ),
    "Qwen/Qwen3-1.7B": dict(
        model_type="qwen3",
        vocab_size=151936,
        hidden_size=2048,
        intermediate_size=6144,
        num_hidden_layers=28,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=128,
        tie_word_embeddings=True,
    ),
}
# CUDA: the context and the caching allocator's slack. CPU: the code of the kernels the first step runs, paged
# in (10-12 MiB measured for the tiny pair; the interpreter and the loaded libraries are not counted)
RESERVE_GIB = {"cuda": 1.0, "cpu": 10 / 1024}
OPTIMIZER_BYTES = {"adamw": 8, "adam8bit": 2}  # per trainable parameter
UNITS = {
    "": 10**9,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


# ---- model shapes -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    """One decoder-only causal LM, as far as memory goes."""

    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    tied: bool
    params: int  # every parameter once (a tied head counted once)
    layer_params: int  # the decoder layers' parameters
    source: str = ""  # where the shape came from

    @property
    def embed_params(self) -> int:
        return self.vocab * self.hidden

    @staticmethod
    def of_config(cfg: PretrainedConfig, source: str) -> "Shape":
        """From a transformers config (nothing allocated, see of_fields)."""
        fields = {key: getattr(cfg, key) for key in FIELDS if hasattr(cfg, key)}
        return Shape.of_fields(fields, source, lambda: meta_params(cfg))

    @staticmethod
    def of_fields(c: dict[str, Any], source: str, count: Callable[[], tuple[int, int]] | None = None) -> "Shape":
        """From a model config's fields (FIELDS). A Qwen3's parameters are counted from them (qwen3_params: no
        import of transformers' modeling, which costs a process seconds); any other model's by `count`."""
        heads = c["num_attention_heads"]
        head_dim = c.get("head_dim") or c["hidden_size"] // heads
        if c.get("model_type") == "qwen3":
            params, layer_params = qwen3_params(c)
        else:
            assert count is not None, f"no parameter count for model_type={c.get('model_type')!r}"
            params, layer_params = count()
        return Shape(
            vocab=c["vocab_size"],
            hidden=c["hidden_size"],
            intermediate=c["intermediate_size"],
            layers=c["num_hidden_layers"],
            heads=heads,
            kv_heads=c.get("num_key_value_heads", heads),
            head_dim=head_dim,
            tied=bool(c.get("tie_word_embeddings", False)),
            params=params,
            layer_params=layer_params,
            source=source,
        )


# What Shape reads of a model's config (a transformers config's attributes, or the embedded pair's fields)
FIELDS = (
    "model_type",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "tie_word_embeddings",
    "attention_bias",
)


def qwen3_params(c: dict[str, Any]) -> tuple[int, int]:
    """(every parameter once, the decoder layers') of the Qwen3ForCausalLM transformers builds from these
    fields, as nn.Module.parameters() counts them (a tied head once): tests/test_plan.py holds it to the
    count on the meta device."""
    d, inter, heads = c["hidden_size"], c["intermediate_size"], c["num_attention_heads"]
    head_dim = c.get("head_dim") or d // heads
    q, kv = heads * head_dim, (c.get("num_key_value_heads") or heads) * head_dim
    biases = q + 2 * kv + d if c.get("attention_bias") else 0
    attention = 2 * d * q + 2 * d * kv + biases + 2 * head_dim  # q, k, v, o projections; q and k RMSNorms
    layer = attention + 3 * d * inter + 2 * d  # the MLP's gate, up and down; two RMSNorms
    layers = c["num_hidden_layers"] * layer
    embed = c["vocab_size"] * d
    return embed + layers + d + (0 if c.get("tie_word_embeddings") else embed), layers  # + the final RMSNorm


def meta_params(cfg: PretrainedConfig) -> tuple[int, int]:
    """(every parameter once, the decoder layers') of the model built from `cfg` on the meta device."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    layers = model.get_decoder().layers
    return sum(p.numel() for p in model.parameters()), sum(p.numel() for p in layers.parameters())


def model_config(key: str, name: str, trust_remote_code: bool = False) -> tuple[PretrainedConfig, str]:
    """(transformers config, where it came from) for a local folder or hub name; never asks the hub."""
    from pathlib import Path

    from transformers import AutoConfig

    try:
        cfg = AutoConfig.from_pretrained(name, local_files_only=True, trust_remote_code=trust_remote_code)
        where = "config.json in the folder" if Path(name).expanduser().is_dir() else "config.json, local HF cache"
        return cfg, where
    except (OSError, ValueError, KeyError):
        pass
    if name in KNOWN:
        known = dict(KNOWN[name])
        return AutoConfig.for_model(known.pop("model_type"), **known), "built-in table (not on local disk)"
    raise ConfigError(
        f"{key}={name!r}: its config.json is not on local disk and the plan never asks the hub; "
        f"point {key} at a local folder, download it (`hf download {name} config.json`), or use a "
        f"model of the built-in table ({', '.join(KNOWN)})"
    )


def pair_shapes(cfg: RunConfig) -> tuple[Shape, Shape]:
    """(teacher, student) shapes of the run's pair, without building or loading either."""
    m = cfg.model
    if m.source == "embedded":
        from sekd.data.qa import is_task_source
        from sekd.embedded.build import qwen3_fields

        emb = m.embedded
        assert emb is not None  # ModelConfig requires it for source=embedded
        vocab = int(emb["vocab_size"])
        where = "embedded pair's config" + (" (task fine-tuned)" if is_task_source(cfg.data.name) and m.task else "")
        teacher, student = (
            Shape.of_fields({"model_type": "qwen3", **qwen3_fields(emb[role], vocab, 0)}, where)
            for role in ("teacher", "student")
        )
        return teacher, student
    out = []
    for key, name in (("model.teacher", m.teacher), ("model.student", m.student)):
        conf, where = model_config(key, str(name), m.trust_remote_code)
        out.append(Shape.of_config(conf, where))
    return out[0], out[1]


# ---- bytes ------------------------------------------------------------------------------------


def layer_bytes(s: Shape, autocast: bool) -> int:
    """Bytes one Hugging Face Qwen3/Llama decoder layer saves for the backward per token (no checkpointing,
    SDPA attention with grouped KV heads: no [T,T] matrix). Counted from the saved tensors of
    Qwen3DecoderLayer (torch.autograd.graph.saved_tensors_hooks), q = heads x head_dim, kv = kv_heads x
    head_dim, I = intermediate:

      fp32 (no autocast): 4 x (6d + 4q + 4kv + 4I + 2 heads + kv_heads + 2)
          two RMSNorms (input, 1/rms, normed, output: 3d + 1 each), q/k norms (in, 1/rms, normed), SDPA's
          q, k, v, out and logsumexp, the MLP's gate, silu(gate), up and their product
      bf16 autocast over fp32 weights: 26d + 10q + 10kv + 8I + 8 heads + 4 kv_heads + 8
          the residual stream and the RMSNorms stay fp32; each linear saves its own bf16 copy of its input
          (q, k, v: three; gate, up: two); q/k norms upcast to fp32; the MLP in bf16"""
    d, q, kv, inter = s.hidden, s.heads * s.head_dim, s.kv_heads * s.head_dim, s.intermediate
    if not autocast:
        return 4 * (6 * d + 4 * q + 4 * kv + 4 * inter + 2 * s.heads + s.kv_heads + 2)
    return 26 * d + 10 * q + 10 * kv + 8 * inter + 8 * s.heads + 4 * s.kv_heads + 8


def activation_bytes(s: Shape, tokens: int, autocast: bool) -> int:
    """The student's saved activations over a micro-batch of `tokens` positions: every layer's, the final
    RMSNorm's (input, 1/rms, normed) and its output h_s, the input ids; under autocast also the bf16
    copies of the layers' weights autocast keeps until the backward."""
    per_token = s.layers * layer_bytes(s, autocast) + 4 * (3 * s.hidden + 1) + 8
    return tokens * per_token + (2 * s.layer_params if autocast else 0)


def teacher_forward_bytes(t: Shape, tokens: int, tbytes: int) -> int:
    """The teacher's forward, no grad: its last hidden states [B,T,d_t] (kept until the loss is done), the
    residual stream and one layer's largest transient (the MLP: silu(gate), up and their product)."""
    return tokens * tbytes * (3 * t.hidden + 3 * t.intermediate)


def chunk_for(train: TrainConfig, vocab: int, device_type: str) -> int:
    from sekd.kd.flows import auto_chunk_size

    return auto_chunk_size(vocab, device_type) if train.chunk_size == "auto" else int(train.chunk_size)


# ---- the plan ---------------------------------------------------------------------------------


@dataclass
class Device:
    """What one device holds (bytes), and its estimated peak."""

    name: str
    rows: dict[str, float] = field(default_factory=dict)
    peak: float = 0.0
    count: int = 1  # devices like this one (the ranks of ddp/fsdp)
    phase: str = ""  # the step's phase the peak is in


@dataclass
class Plan:
    teacher: Shape | None  # None: no teacher in memory (an offline cache)
    student: Shape
    device_type: str
    dtype: str
    mode: str
    world: int
    micro_batch: int
    seq_len: int
    chunk: int
    optimizer: str
    placed: bool
    devices: list[Device]
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> float:
        return sum(d.peak * d.count for d in self.devices)

    @property
    def worst(self) -> float:
        return max(d.peak for d in self.devices)


# The phases of a step whose largest sets the peak (`estimate`), on top of weights, optimizer state, reserve:
#   teacher forward   the teacher's last hidden states and one layer's work (no grad; before the student's)
#   scoring           activations + h_t + the head's blocks + the signal's temporaries
#   selective head    activations + h_t + the head's blocks + the [V,d_s] weight gradient (+ its copy, autocast)
#   backward end      every gradient (+ a tied embedding's dense gradient, added to the head's)
#   optimizer step    every gradient + the step's temporaries (foreach AdamW on a GPU: one P-sized sqrt; one
#                     parameter at a time on CPU: two of the largest parameter)
# Under ddp every gradient lives in one persistent flat buffer (sekd.distributed.process_group.GradBuckets: each .grad a view
# of it, all-reduced in place, kept from step to step), held through the whole step; under fsdp 1/N of the
# student's and teacher's weights, gradients and optimizer state (`shard`: ranks per shard group), plus the
# units gathered whole while they run.
PHASES = ("teacher forward", "scoring", "selective head", "backward end", "optimizer step")


def teacher_bytes(teacher: Shape | None, tokens: int, cbytes: int, shard: int | None) -> tuple[float, float, float]:
    """(weights, forward work, last hidden states) of the teacher on a student's card; under fsdp (`shard`: its
    ranks per shard group, None without fsdp) its share of the weights (its head stays replicated) plus the
    units it gathers whole."""
    if teacher is None:
        return 0.0, 0.0, 0.0
    weights: float = cbytes * teacher.params
    fwd: float = teacher_forward_bytes(teacher, tokens, cbytes)
    if shard is not None:
        head = teacher.vocab * teacher.hidden * cbytes  # the teacher's head stays replicated (untied)
        weights = (cbytes * teacher.params - head) / shard + head
        fwd += cbytes * (2 * teacher.layer_params / teacher.layers + teacher.embed_params)
    return weights, fwd, cbytes * teacher.hidden * tokens


def head_bytes(student: Shape, chunk: int, tokens: int, cbytes: int, selected: float) -> tuple[int, int, int, float]:
    """The selective LM head's memory: (one float32 [C,V] block, the [V,d_s] fp32 weight gradient, W and a chunk's
    logits in the compute dtype under autocast, the [N,d_s] gradient of h at the selected positions)."""
    V, d = student.vocab, student.hidden
    w_copy = (cbytes * V * d + 2 * chunk * V * cbytes) if cbytes < 4 else 0
    return chunk * V * 4, 4 * V * d, w_copy, 4 * d * tokens * selected


def gathered_bytes(student: Shape, cbytes: int) -> float:
    """What fsdp's units gather whole while they run: the root unit (fp32 under any precision: embeddings, norm,
    head) all step, and a layer and its prefetched successor in the compute dtype (MixedPrecisionPolicy)."""
    return 4 * student.embed_params + 2 * cbytes * student.layer_params / student.layers


@dataclass(frozen=True)
class StudentBytes:
    """What a student's card holds through a step, its teacher aside (bytes): the rows `student_card` adds
    up by phase. Under fsdp the weights, gradients and optimizer state are this rank's shard."""

    optimizer: str
    weights: float  # fp32 master weights
    grads: float
    opt: float  # optimizer state
    opt_tmp: float  # the optimizer step's temporaries
    held: float  # ddp's gradient buffer, held all step (GradBuckets); 0 otherwise
    tied_tmp: float  # a tied embedding's dense gradient at the backward's end
    act: float  # saved activations
    block: float  # one float32 [C,V] block of the head
    w_grad: float  # the head's [V,d_s] fp32 weight gradient
    w_copy: float  # W and a chunk's logits in the compute dtype (autocast)
    h_grad: float  # the gradient of h at the selected positions
    score_blocks: int  # [C,V] temporaries per chunk while scoring
    gathered: float  # fsdp's units gathered whole while they run
    reserve: float
    kept: float  # CPU keeps the head's blocks from step to step; a GPU gives them back

    @property
    def blocks(self) -> float:
        return 3 * self.block


def student_bytes(
    student: Shape,
    *,
    tokens: int,
    chunk: int,
    cbytes: int,
    device_type: str,
    optimizer: str,
    mode: str,
    world: int,
    shard: int,
    selected: float,
    score_blocks: int,
) -> StudentBytes:
    """The student's side of `estimate`: its card's rows for a micro-batch of `tokens` positions."""
    P, largest = student.params, student.vocab * student.hidden  # the largest parameter: the embedding
    block, w_grad, w_copy, h_grad = head_bytes(student, chunk, tokens, cbytes, selected)
    grads = 4 * P / shard
    fused = optimizer == "adamw" and device_type == "cuda"
    return StudentBytes(
        optimizer=optimizer,
        weights=4 * P / shard,
        grads=grads,
        opt=OPTIMIZER_BYTES[optimizer] * P / shard,
        opt_tmp=4 * P / shard if fused else 2 * 4 * largest / shard,
        held=grads if mode == "ddp" and world > 1 else 0.0,
        tied_tmp=4 * student.embed_params / shard if student.tied else 0.0,
        act=activation_bytes(student, tokens, autocast=cbytes < 4),  # a compute dtype below fp32: autocast
        block=block,
        w_grad=w_grad,
        w_copy=w_copy,
        h_grad=h_grad,
        score_blocks=score_blocks,
        gathered=gathered_bytes(student, cbytes) if mode == "fsdp" else 0.0,
        reserve=RESERVE_GIB[device_type] * GIB,
        kept=3 * block if device_type == "cpu" else 0.0,
    )


def student_card(name: str, b: StudentBytes, t_w: float, t_hid: float, t_f: float, t_copy: float = 0.0) -> Device:
    """A device holding a student (and the teacher's weights `t_w`, last hidden states `t_hid`, forward work
    `t_f`, head copy `t_copy` where they live on it): its rows and its peak, the largest of the PHASES."""
    phases = {
        "teacher forward": t_f + t_hid + b.kept,
        "scoring": b.act + t_hid + b.blocks + b.score_blocks * b.block,
        "selective head": b.act + t_hid + b.blocks + b.w_grad + b.h_grad + b.w_copy,
        "backward end": b.grads - b.held + b.tied_tmp + b.kept,
        "optimizer step": b.grads - b.held + b.opt_tmp + b.kept,
    }
    persistent = t_w + t_copy + b.weights + b.opt + b.gathered + b.reserve + b.held
    rows = {
        "teacher weights": t_w,
        "teacher head copy": t_copy,
        "student weights (fp32)": b.weights,
        "gradients (fp32)": b.grads,
        f"optimizer ({b.optimizer})": b.opt,
        "LM head (blocks, dW, W copy)": b.blocks + b.w_grad + b.w_copy,
        "LM head scoring temporaries": b.score_blocks * b.block,
        "activations": b.act,
        "teacher forward": t_f + t_hid,
        "fsdp gathered units": b.gathered,
        "runtime reserve": b.reserve,
    }
    worst = max(phases, key=lambda p: phases[p])
    return Device(name, {k: v for k, v in rows.items() if v}, persistent + phases[worst], phase=worst)


def plan_devices(
    b: StudentBytes,
    teacher: Shape | None,
    t_bytes: tuple[float, float, float],
    cbytes: int,
    *,
    mode: str,
    world: int,
    placed: bool,
) -> list[Device]:
    """The plan's devices: the student's card (one, or each rank's, with the teacher's `t_bytes` on it) or,
    with the teacher placed on a device of its own, the student's card and the teacher's."""
    t_weights, t_fwd, t_hidden = t_bytes
    if placed and teacher is not None:
        teacher_card = Device(
            "teacher card",
            {"teacher weights": t_weights, "teacher forward": t_fwd + t_hidden, "runtime reserve": b.reserve},
            t_weights + t_fwd + t_hidden + b.reserve,
            phase="teacher forward",
        )
        head_copy = teacher.vocab * teacher.hidden * cbytes
        return [student_card("student card", b, 0.0, t_hidden, 0.0, head_copy), teacher_card]
    card = student_card({"none": "one device"}.get(mode, f"each of {world} ranks"), b, t_weights, t_hidden, t_fwd)
    card.count = world if mode in ("ddp", "fsdp") else 1
    return [card]


def estimate(
    teacher: Shape | None,
    student: Shape,
    *,
    micro_batch: int,
    seq_len: int,
    device_type: str = "cuda",
    dtype: str = "bf16",
    optimizer: str = "adamw",
    chunk: int | None = None,
    mode: str = "none",
    world: int = 1,
    placed: bool = False,
    selected: float = 1.0,
    score_blocks: int = 0,
    shard: int | None = None,
) -> Plan:
    """The plan of one run's training, per device (bytes). `teacher` None: no teacher (an offline cache).
    `selected`: the fraction of positions the head runs at with gradient; `score_blocks`: the [C,V] float32
    temporaries the position signal makes per chunk while scoring (0 without a computed signal). The peak is
    the weights, the optimizer state and the reserve plus the largest of the step's PHASES."""
    from sekd.kd.flows import auto_chunk_size

    cbytes = 4 if dtype == "fp32" else 2
    tokens = micro_batch * seq_len
    chunk = min(chunk or auto_chunk_size(student.vocab, device_type), tokens)  # a block holds at most every position
    shard = (shard or world) if mode == "fsdp" else 1
    b = student_bytes(
        student,
        tokens=tokens,
        chunk=chunk,
        cbytes=cbytes,
        device_type=device_type,
        optimizer=optimizer,
        mode=mode,
        world=world,
        shard=shard,
        selected=selected,
        score_blocks=score_blocks,
    )
    t_bytes = teacher_bytes(teacher, tokens, cbytes, shard if mode == "fsdp" else None)
    devices = plan_devices(b, teacher, t_bytes, cbytes, mode=mode, world=world, placed=placed)
    return Plan(
        teacher=teacher,
        student=student,
        device_type=device_type,
        dtype=dtype,
        mode=mode,
        world=world,
        micro_batch=micro_batch,
        seq_len=seq_len,
        chunk=chunk,
        optimizer=optimizer,
        placed=placed,
        devices=devices,
    )


def cpu_above_loaded(
    teacher: Shape | None,
    student: Shape,
    *,
    micro_batch: int,
    seq_len: int,
    chunk: int,
    optimizer: str = "adamw",
    selected: float = 1.0,
    score_blocks: int = 0,
) -> float:
    """What benchmarks/plan_check.py measures: a CPU fp32 step's peak above the process's loaded baseline
    (which already holds both models' weights and the batch), bytes."""
    p = estimate(
        teacher,
        student,
        micro_batch=micro_batch,
        seq_len=seq_len,
        device_type="cpu",
        dtype="fp32",
        optimizer=optimizer,
        chunk=chunk,
        selected=selected,
        score_blocks=score_blocks,
    )
    d = p.devices[0]
    return d.peak - d.rows.get("teacher weights", 0.0) - d.rows["student weights (fp32)"]  # the reserve stays


def max_micro_batch(fit: Callable[[int], Plan], card: float, limit: int = 4096) -> int:
    """The largest micro-batch whose worst device fits `card` bytes (0: not even one); fit(mb) -> Plan."""
    if fit(1).worst > card:
        return 0
    lo, hi = 1, 2
    while hi <= limit and fit(hi).worst <= card:
        lo, hi = hi, hi * 2
    hi = min(hi, limit + 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fit(mid).worst <= card else (lo, mid)
    return lo


# ---- the command line -------------------------------------------------------------------------


def parse_size(text: str) -> float:
    """'24GB', '80 GiB', '512MB', '24' (GB) -> bytes; a bad value is one line."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]I?B|B)?\s*", text, flags=re.I)
    if m is None or float(m.group(1)) <= 0:
        raise ConfigError(
            f"--card {text!r}: give the card's memory as a number with GB, GiB, MB, MiB or TB "
            "(e.g. --card 24GB, --card 80GiB)"
        )
    return float(m.group(1)) * UNITS[(m.group(2) or "").upper()]


@dataclass
class Args:
    overrides: list[str]
    card: float | None = None
    card_text: str | None = None
    world: int | None = None
    json: str | None = None


def parse_args(argv: list[str]) -> Args:
    """Our flags (--card, --world; --plan is dropped) out of argv; the rest are Hydra overrides."""
    out, rest, i = Args([]), [], 0
    while i < len(argv):
        a = argv[i]
        flag, eq, val = a.partition("=")
        if flag in ("--card", "--world", "--json"):
            if not eq:
                if i + 1 >= len(argv):
                    example = {"--card": "24GB", "--world": "8", "--json": "plan.json"}[flag]
                    raise ConfigError(f"{flag} needs a value (e.g. {flag} {example})")
                val, i = argv[i + 1], i + 1
            if flag == "--json":
                out.json = val
            elif flag == "--card":
                out.card, out.card_text = parse_size(val), val
            else:
                if not val.isdigit() or int(val) < 1:
                    raise ConfigError(f"--world {val!r}: give the number of ranks, an integer >= 1")
                out.world = int(val)
        elif a == "--plan":
            pass
        elif a in ("-m", "--multirun"):
            raise ConfigError("--plan plans one run: give one value per key (no -m, no sweeps)")
        else:
            rest.append(a)
        i += 1
    out.overrides = rest
    return out


def compose_run(overrides: list[str]) -> RunConfig:
    """The run's typed config, composed and checked as `sekd-train` would (ConfigError in one line)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from sekd.app.compose import check_fsdp
    from sekd.config.folders import CONF
    from sekd.app.checks import check_command_line, validate, without_hydra

    check_command_line(list(overrides), CONF, "config")
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        tree = compose(config_name="config", overrides=list(overrides))
    cfg = validate(without_hydra(tree))
    if cfg.train.distributed == "fsdp":
        check_fsdp(cfg)
    return cfg


def plan_run(
    cfg: RunConfig, world: int | None = None, micro_batch: int | None = None, shapes: tuple[Shape, Shape] | None = None
) -> Plan:
    """The plan of a composed run (`world`: ranks under ddp/fsdp)."""
    mode = cfg.train.distributed
    if mode == "none" and (world or 1) > 1:
        raise ConfigError(
            f"--world {world} with train.distributed=none: one process trains alone; set "
            "train.distributed=ddp or fsdp to plan for several ranks"
        )
    if mode != "none" and (world or 0) < 2:
        raise ConfigError(f"train.distributed={mode} needs ranks: pass --world N (N >= 2)")
    device_type = "cpu" if cfg.train.device == "cpu" else "cuda"  # auto plans for the card
    dtype = {"auto": "bf16" if device_type == "cuda" else "fp32"}.get(cfg.train.precision, cfg.train.precision)
    teacher, student = shapes or pair_shapes(cfg)
    needs_teacher = cfg.mode == "distill" and cfg.classes.cache is None
    selected, score_blocks = position_work(cfg)
    shard, note = fsdp_shard(cfg, world or 1)
    plan = estimate(
        teacher if needs_teacher else None,
        student,
        micro_batch=micro_batch or cfg.train.micro_batch_size,
        seq_len=run_seq_len(cfg),
        device_type=device_type,
        dtype=dtype,
        optimizer=cfg.train.optimizer,
        chunk=chunk_for(cfg.train, student.vocab, device_type),
        mode=mode,
        world=world or 1,
        placed=cfg.model.teacher_device is not None,
        selected=selected,
        score_blocks=score_blocks,
        shard=shard,
    )
    if note:
        plan.notes.append(note)
    if not needs_teacher:
        plan.notes.append("no teacher in memory (classes.cache: targets read from the offline teacher cache)")
    return plan


def fsdp_shard(cfg: RunConfig, world: int) -> tuple[int | None, str]:
    """Ranks per shard group under train.distributed=fsdp (train.fsdp.mesh, where the config has it): flat =
    every rank; RxS = S; hybrid = the ranks of one node (taken as min(world, 8) here)."""
    mesh = str(getattr(getattr(cfg.train, "fsdp", None), "mesh", "flat"))
    if cfg.train.distributed != "fsdp" or mesh == "flat":
        return None, ""
    m = re.fullmatch(r"(\d+)x(\d+)", mesh)
    if m:
        if int(m.group(1)) * int(m.group(2)) != world:
            raise ConfigError(
                f"train.fsdp.mesh={mesh} needs {int(m.group(1)) * int(m.group(2))} ranks; --world is {world}"
            )
        return int(m.group(2)), f"fsdp mesh {mesh}: each weight sharded over {m.group(2)} ranks"
    shard = min(world, 8)
    return shard, f"fsdp mesh hybrid: each weight sharded over the {shard} ranks of a node (taken as min(world, 8))"


def position_work(cfg: RunConfig) -> tuple[float, int]:
    """(fraction of positions the head runs at with gradient, [C,V] temporaries per chunk while scoring): a
    signal computed from one head's logits makes three (log-softmax, its exp, their product), one that
    needs the teacher's too makes five."""
    from sekd.selection.signals import SIGNALS

    p = cfg.position
    selected = 1.0 if p.policy == "all" else float(p.k)
    if not p.signal:
        return selected, 0
    sig = SIGNALS.get(p.signal)
    return selected, 0 if sig.random else (5 if sig.needs_teacher else 3) + len(sig.terms) - 1


def run_seq_len(cfg: RunConfig) -> int:
    """Positions per training row: the data's packed length (task data: the on-policy rollouts' or the rows')."""
    return int(cfg.data.seq_len)


def shape_line(role: str, s: Shape) -> str:
    tie = "tied" if s.tied else "untied"
    return (
        f"  {role}: {s.params / 1e9:.3f}B params, V={s.vocab}, d={s.hidden}, I={s.intermediate}, "
        f"{s.layers} layers, {s.heads}/{s.kv_heads} heads x {s.head_dim}, head {tie}  [{s.source}]"
    )


def render(plan: Plan, card: float | None, card_text: str | None, best: int | None) -> str:
    from tabulate import tabulate

    names = list(dict.fromkeys(k for d in plan.devices for k in d.rows))
    head = [d.name for d in plan.devices] + (["total"] if len(plan.devices) > 1 or plan.devices[0].count > 1 else [])
    rows = []
    for k in names:
        vals = [d.rows.get(k) for d in plan.devices]
        row = [k] + ["-" if v is None else f"{v / GIB:.2f}" for v in vals]
        if len(head) > len(plan.devices):
            row.append(f"{sum((v or 0) * d.count for v, d in zip(vals, plan.devices)) / GIB:.2f}")
        rows.append(row)
    peak = ["estimated peak"] + [f"{d.peak / GIB:.2f}" for d in plan.devices]
    if len(head) > len(plan.devices):
        peak.append(f"{plan.total / GIB:.2f}")
    rows.append(peak)
    mode = {
        "none": "one process",
        "ddp": f"ddp, {plan.world} ranks (micro-batch per rank)",
        "fsdp": f"fsdp, {plan.world} ranks",
    }[plan.mode] + (", teacher on its own device" if plan.placed else "")
    lines = [
        "sekd plan (estimates; no weights loaded)",
        shape_line("teacher", plan.teacher) if plan.teacher else "  teacher: none in memory",
        shape_line("student", plan.student),
        f"  {mode}; device {plan.device_type}, compute {plan.dtype}, optimizer {plan.optimizer}; "
        f"micro-batch {plan.micro_batch} x {plan.seq_len} tokens; LM-head chunk C={plan.chunk}",
        *[f"  note: {n}" for n in plan.notes],
        "",
        tabulate(rows, headers=["GiB"] + head, stralign="right", disable_numparse=True),
        "",
    ]
    lines.append(
        "estimated peak = weights + optimizer state + reserve + the step's largest phase (the peak's "
        "phase: " + ", ".join(f"{d.name}: {d.phase}" for d in plan.devices) + "); activations and "
        "gradients never peak together, so the rows add up to more"
    )
    if card is not None:
        fits = "fits" if plan.worst <= card else "does NOT fit"
        lines.append(
            f"card {card_text} = {card / GIB:.2f} GiB: micro-batch {plan.micro_batch} {fits} "
            f"(worst device {plan.worst / GIB:.2f} GiB)"
        )
        if best == 0:
            lines.append(f"largest train.micro_batch_size that fits {card_text}: none (micro-batch 1 needs more)")
        else:
            lines.append(f"largest train.micro_batch_size that fits {card_text}: {best}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """`sekd-plan <overrides> [--card 24GB] [--world N]` (also `sekd-train <overrides> --plan ...`)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parse_args(argv)
        cfg = compose_run(args.overrides)
        shapes = pair_shapes(cfg)
        plan = plan_run(cfg, args.world, shapes=shapes)
        best = None
        if args.card is not None:
            best = max_micro_batch(lambda mb: plan_run(cfg, args.world, micro_batch=mb, shapes=shapes), args.card)
    except ConfigError as err:
        print(f"sekd: config error: {err}", file=sys.stderr)
        return 2
    print(render(plan, args.card, args.card_text, best))
    if args.json:
        from sekd.core.files import atomic_write_json

        atomic_write_json(Path(args.json), plan_json(plan, args.card, best))
    return 0


def plan_json(plan: Plan, card: float | None, best: int | None) -> dict[str, Any]:
    """The plan as data (GiB): per device its rows, its estimated peak, and the peak without the runtime
    reserve, which is what torch.cuda.max_memory_allocated measures (the CUDA context is not allocated)."""

    def gib(x: float) -> float:
        return round(x / GIB, 3)

    return {
        "mode": plan.mode,
        "world": plan.world,
        "device_type": plan.device_type,
        "dtype": plan.dtype,
        "micro_batch": plan.micro_batch,
        "seq_len": plan.seq_len,
        "chunk": plan.chunk,
        "devices": [
            {
                "name": d.name,
                "count": d.count,
                "phase": d.phase,
                "rows_gib": {k: gib(v) for k, v in d.rows.items()},
                "peak_gib": gib(d.peak),
                "allocated_gib": gib(d.peak - d.rows.get("runtime reserve", 0.0)),
            }
            for d in plan.devices
        ],
        "card_gib": gib(card) if card is not None else None,
        "largest_micro_batch": best,
        "notes": plan.notes,
    }


def main_exit() -> None:
    """The `sekd-plan` console script."""
    sys.exit(main())


if __name__ == "__main__":
    main_exit()
