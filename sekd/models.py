"""Teacher and student: where they come from, that they share a tokenizer, and loading them."""
from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig

from sekd.config import ConfigError


def resolve_pair(cfg: DictConfig) -> tuple[str, str, str]:
    """(teacher, student, tokenizer) as hub names or folders; builds the embedded pair if needed."""
    m = cfg.model
    if m.source == "embedded":
        from omegaconf import OmegaConf

        from sekd.embedded.build import build_pair

        emb = OmegaConf.to_container(m.embedded, resolve=True)
        from sekd.config import is_task_data

        if is_task_data(cfg) and m.get("task"):  # a teacher that can do the task it is to teach (docs/method.md §10)
            from sekd.embedded.build import build_task_pair

            task = OmegaConf.to_container(m.task, resolve=True)
            teacher, student = build_task_pair(Path(cfg.paths.cache) / "embedded", emb, task)
            return str(teacher), str(student), str(student)
        teacher, student = build_pair(Path(cfg.paths.cache) / "embedded", emb)
        return str(teacher), str(student), str(student)
    return str(m.teacher), str(m.student), str(m.tokenizer or m.student)


def load_tokenizer(path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)


def check_same_tokenizer(teacher: str, student: str, tokenizer: str, trust_remote_code: bool = False):
    """Teacher and student must share the tokenizer (docs/method.md §1); returns it. Cheap: no weights load."""
    tok = load_tokenizer(tokenizer, trust_remote_code)
    for key, path in (("model.teacher", teacher), ("model.student", student)):
        if path == tokenizer:
            continue
        try:
            other = load_tokenizer(path, trust_remote_code)
        except (OSError, ValueError) as err:
            raise ConfigError(f"{key}={path!r}: cannot load its tokenizer ({type(err).__name__})") from None
        if other.get_vocab() != tok.get_vocab():
            diff = len(set(other.get_vocab().items()) ^ set(tok.get_vocab().items()))
            raise ConfigError(f"{key}={path!r}: its tokenizer differs from {tokenizer!r} "
                              f"({diff} vocabulary entries differ); teacher and student must share one")
    return tok


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but no CUDA device is available; choose one of: auto, cpu")
    return torch.device(name)


def pick_dtype(precision: str, device: torch.device) -> torch.dtype:
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]


def load_model(path: str, device: torch.device, dtype: torch.dtype, trust_remote_code: bool = False):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code)
    return model.to(device)


def shared_vocab(tok, *models) -> int:
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
