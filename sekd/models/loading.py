"""Teacher and student: where they come from, that they share a tokenizer, and loading them."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from sekd.data.qa import is_task_source
from sekd.core.errors import ConfigError
from sekd.config.schema import RunConfig

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


def resolve_pair(cfg: RunConfig) -> tuple[str, str, str]:
    """(teacher, student, tokenizer) as hub names or folders; builds the embedded pair if needed."""
    m = cfg.model
    if m.source == "embedded":
        from sekd.embedded.build import build_pair

        emb = m.embedded
        assert emb is not None  # ModelConfig requires it for source=embedded
        if (
            is_task_source(cfg.data.name) and m.task
        ):  # a teacher that can do the task it is to teach (docs/method.md §10)
            from sekd.embedded.build import build_task_pair

            teacher, student = build_task_pair(Path(cfg.paths.cache) / "embedded", emb, m.task)
            return str(teacher), str(student), str(student)
        teacher, student = build_pair(Path(cfg.paths.cache) / "embedded", emb)
        return str(teacher), str(student), str(student)
    return str(m.teacher), str(m.student), str(m.tokenizer or m.student)


def load_tokenizer(path: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)


def check_same_tokenizer(
    teacher: str, student: str, tokenizer: str, trust_remote_code: bool = False
) -> PreTrainedTokenizerBase:
    """Teacher and student must share the tokenizer (docs/method.md §1); returns it. Cheap: no weights load."""
    tok = _tokenizer_of(
        "model.tokenizer" if tokenizer not in (teacher, student) else "model.student", tokenizer, trust_remote_code
    )
    for key, path in (("model.teacher", teacher), ("model.student", student)):
        if path == tokenizer:
            continue
        other = _tokenizer_of(key, path, trust_remote_code)
        if other.get_vocab() != tok.get_vocab():
            diff = len(set(other.get_vocab().items()) ^ set(tok.get_vocab().items()))
            raise ConfigError(
                f"{key}={path!r}: its tokenizer differs from {tokenizer!r} "
                f"({diff} vocabulary entries differ); teacher and student must share one"
            )
    return tok


def _tokenizer_of(key: str, path: str, trust_remote_code: bool) -> PreTrainedTokenizerBase:
    try:
        return load_tokenizer(path, trust_remote_code)
    except (OSError, ValueError, TypeError) as err:  # no tokenizer files, or files transformers cannot read
        first = str(err).strip().splitlines()[0][:200] if str(err).strip() else ""
        raise ConfigError(f"{key}={path!r}: cannot load its tokenizer ({type(err).__name__}: {first})") from None


def pick_device(name: str, key: str = "train.device") -> torch.device:
    """The torch device for `<key>=name` (auto: CUDA when there is one); cuda without CUDA is a ConfigError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"{key}=cuda but this machine has no CUDA device (torch.cuda.is_available() is False); "
            "choose one of: auto, cpu"
        )
    return torch.device(name)


def teacher_device(name: str | None, student: torch.device) -> torch.device:
    """The teacher's device for model.teacher_device=name (None: the student's); a CUDA device this machine
    lacks is a ConfigError. `cuda` is the current CUDA device, spelled with its index, so that cuda and
    cuda:0 are one device."""
    if name is None:
        return student
    device = torch.device(name)
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(
                f"model.teacher_device={name} but this machine has no CUDA device "
                "(torch.cuda.is_available() is False); use cpu, or null for the student's device"
            )
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if device.index >= count:
            raise ConfigError(
                f"model.teacher_device={name} but this machine has {count} CUDA device(s): cuda:0 .. cuda:{count - 1}"
            )
    return device


def canonical_device(device: torch.device | str, current: int | None = None) -> torch.device:
    """One spelling per device: `cuda` is the current card, cuda:<current> (`current`: that card's index,
    None: torch's); every other device as it is."""
    d = torch.device(device)
    if d.type == "cuda" and d.index is None:
        return torch.device("cuda", torch.cuda.current_device() if current is None else current)
    return d


def same_device(a: torch.device, b: torch.device) -> bool:
    """cuda and cuda:<current> are one device."""
    return a.type == b.type and (a.type != "cuda" or canonical_device(a) == canonical_device(b))


class PlacedTeacher(torch.nn.Module):
    """The frozen teacher on its own device (model.teacher_device), as the loss sees it from the student's
    device: token ids go to the teacher's device, and what it returns is moved to the student's by the step,
    after the student's body is queued (sekd.training.trainer.arrived), so both cards compute at once.

    The chunked flow moves the decoder's hidden states [B,T,d_t] and runs the teacher's head on the
    student's device, from a copy of the head made once. Per position that moves d_t numbers, where
    running the head on the teacher's device and moving its logits back would move V at every position
    the head runs (k of them with budget k): at Qwen3-8B's shapes (d_t=4096, V=151936) the hidden states
    are fewer bytes for any k above 2.7%, and 37x fewer for a signal that needs the teacher everywhere.
    The copy costs the head's weights once on the student's device (V x d_t: 1.2 GB in bf16 for Qwen3-8B).
    The dense flow and the sample pre-pass need the logits [B,T,V] anyway: those move as they are."""

    def __init__(self, model: torch.nn.Module, device: torch.device):
        super().__init__()
        self.model, self.device = model, device
        self.home = next(model.parameters()).device
        self.head = None  # the copy of the teacher's head on the student's device, made on first use

    def forward(self, input_ids: torch.Tensor, **kwargs):
        """The teacher's output where it computed it: the student's step moves it (sekd.training.trainer.arrived) once its
        own body is queued, so the two cards overlap; whoever else reads it calls .to(device) itself."""
        return self.model(input_ids=input_ids.to(self.home, non_blocking=True), **kwargs)

    def get_decoder(self):
        decoder = self.model.get_decoder()

        def run(input_ids: torch.Tensor, **kwargs):
            return decoder(input_ids=input_ids.to(self.home, non_blocking=True), **kwargs)

        return run

    def get_output_embeddings(self):
        if self.head is None:
            import copy

            self.head = copy.deepcopy(self.model.get_output_embeddings()).to(self.device).requires_grad_(False)
        return self.head


def place_teacher(model: torch.nn.Module, student: torch.device) -> torch.nn.Module:
    """The teacher as the student's loss uses it: itself when it is on the student's device, else wrapped."""
    home = next(model.parameters()).device
    return model if same_device(home, student) else PlacedTeacher(model, student)


def check_environment(cfg: RunConfig) -> None:
    """What this machine must offer the run, checked before anything loads: CUDA where a device key asks
    for it, and every pretrained model and tokenizer on local disk when the hub is offline. Raises
    ConfigError. (A sweep's submitting host checks this only for local launchers: a Slurm job's node
    may have the GPU the login node lacks; the job checks again.)"""
    train = cfg.mode == "distill" and cfg.stage != "score"
    score = cfg.eval.suite != "none" and cfg.stage != "train"
    for key, device, used in (("train.device", cfg.train.device, train), ("eval.device", cfg.eval.device, score)):
        if used:
            pick_device(str(device), key)
    if train:
        teacher_device(cfg.model.teacher_device, torch.device("cpu"))
    m = cfg.model
    if m.source == "pretrained":
        wanted = {"model.teacher": m.teacher, "model.student": m.student}
        if m.tokenizer:
            wanted["model.tokenizer"] = m.tokenizer
        for key, name in wanted.items():
            check_on_disk(key, str(name), tokenizer_only=key == "model.tokenizer")


def check_on_disk(key: str, name: str, *, tokenizer_only: bool = False) -> None:
    """A model named by `key` is a local folder, or a hub name; offline, the hub name must be in the
    local Hugging Face cache. Downloads nothing."""
    from huggingface_hub import is_offline_mode, try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    need = "tokenizer_config.json" if tokenizer_only else "config.json"
    folder = Path(name).expanduser()
    if folder.is_dir():
        files = ("tokenizer_config.json", "tokenizer.json") if tokenizer_only else ("config.json",)
        if not any((folder / f).is_file() for f in files):
            raise ConfigError(
                f"{key}={name!r} is a folder without {' or '.join(files)}: not a Hugging Face "
                f"{'tokenizer' if tokenizer_only else 'model'} folder"
            )
        return
    if name.startswith(("/", ".", "~")) or folder.exists():
        raise ConfigError(f"{key}={name!r}: no such folder")
    try:
        cached = try_to_load_from_cache(name, need)
    except HFValidationError:
        raise ConfigError(f"{key}={name!r} is neither a local folder nor a hub name (owner/name)") from None
    if is_offline_mode() and not isinstance(cached, str):
        var = next((v for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE") if os.environ.get(v)), "HF_HUB_OFFLINE")
        raise ConfigError(
            f"{key}={name!r} is not on local disk and the hub is offline ({var}="
            f"{os.environ.get(var, '1')}): download it on a connected machine "
            f"(`hf download {name}`, into this machine's HF_HOME) or set {key} to a local folder"
        )


def pick_dtype(precision: str, device: torch.device) -> torch.dtype:
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]


def load_model(path: str, device: torch.device, dtype: torch.dtype, trust_remote_code: bool = False) -> PreTrainedModel:
    """The model in `dtype` on `device`. On a card its weights are read from the files straight onto it
    (device_map), not built whole in host RAM first: eight ranks of a node each holding an 8B teacher in
    host RAM on the way to their cards would need 8 x 16 GB of it at once."""
    from transformers import AutoModelForCausalLM

    device = torch.device(device)
    direct = {"device_map": {"": device}} if device.type == "cuda" else {}
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code, **direct)
    return model.to(device)  # type: ignore[arg-type]  # transformers' wrapped .to stub drops Module.to's signature


def shared_vocab(tok: PreTrainedTokenizerBase, *models) -> int:
    """Logit widths may differ only by padding rows (Qwen-style heads): keep the tokenizer's real size."""
    V = len(tok)
    for model in models:
        width = model.get_output_embeddings().weight.shape[0]
        if width < V:
            raise ConfigError(f"model {model.name_or_path!r} has {width} logits but the tokenizer has {V} tokens")
    return V


def model_signature(path: str) -> str:
    """Identity of a model for score and cache keys: a hub name as is; a local folder by the content
    of its config and weight files (size + a hash of their first and last MiB, cheap even at 16 GB)."""
    import hashlib

    folder = Path(path)
    if not folder.is_dir():
        return str(path)
    h = hashlib.sha256()
    for f in sorted(folder.iterdir()):
        if f.suffix not in (".json", ".safetensors", ".bin") or f.name.startswith("."):
            continue
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with f.open("rb") as fh:
            h.update(fh.read(2**20))
            if size > 2**21:
                fh.seek(-(2**20), 2)
                h.update(fh.read())
    return f"{folder.name}:{h.hexdigest()[:16]}"
