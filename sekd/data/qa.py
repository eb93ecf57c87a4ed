"""Task-specific data (docs/method.md §10): question/answer problems, one per row, KD on the answer tokens only.

A task source yields problems {"question", "answer"} for a split. `build_qa` lays each out with
qa_format, one problem per row, right-padded with eos:

    w = prompt ids + target ids + [sep]      (prompt and target tokenized apart: the boundary is exact)
    input_ids = w[:-1], labels = w[1:], labels = -100 except where the next token is a target token
    or the sep that ends the answer.

A problem longer than seq_len + 1 tokens is dropped (counted in the cache's .json). Cache layout as
build_packed: `<artifacts_dir>/qa-<source>-<split>-<key>.pt` beside `.json` (and `.pt.lock` while it is built).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import Tensor

from sekd.core.artifacts import content_key
from sekd.data import arith, qa_format
from sekd.data.dataset import cached_packed, separator_id, tokenizer_signature
from sekd.data.packing import IGNORE, PackedData, sample_id
from sekd.data.sources import SPLITS, DataError, _check_split, _file_sig, _jsonl_file, check_jsonl_file, jsonl_records
from sekd.core.registry import Registry, RegistryError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

Problem = dict[str, str]
QA_SOURCES: Registry[Callable[..., list[Problem]]] = Registry("task source")  # (split, **options)
FORMAT = 1  # bump when the row layout changes
GSM8K = "openai/gsm8k"
GSM8K_VALIDATION = 500  # GSM8K has no validation split: ours is the last 500 train problems (data.validation_size)
FILE_KEYS = tuple(f"{s}_file" for s in SPLITS)
FIELDS = ("question", "answer")


@QA_SOURCES.register("arith")
def arith_source(split: str) -> list[Problem]:
    """The embedded arithmetic word problems (sekd.data.arith)."""
    _check_split(split)
    return arith.problems(split)


@QA_SOURCES.register("gsm8k")
def gsm8k(
    split: str,
    *,
    path: str = GSM8K,
    train_file: str | None = None,
    validation_file: str | None = None,
    test_file: str | None = None,
    validation_size: int = GSM8K_VALIDATION,
) -> list[Problem]:
    """GSM8K from the hub (config "main"), or local jsonl files of its schema, one per split.

    Without a validation set (the hub, or no validation_file) validation is the last `validation_size`
    train problems (at most a tenth of them) and train the rest, so the two never overlap: the hub's
    7,473 train problems give 6,973 to train on. validation_size=0 trains on all of them.
    """
    _check_split(split)
    files = {"train_file": train_file, "validation_file": validation_file, "test_file": test_file}
    if any(files.values()):
        if split == "validation" and validation_file:
            return _read_jsonl(_qa_file("validation", files))
        if split == "test":
            return _read_jsonl(_qa_file("test", files))
        return _carve(_read_jsonl(_qa_file("train", files)), split, validation_size if not validation_file else 0)
    import datasets

    if split == "test":
        return _records(datasets.load_dataset(path, "main", split="test"), path)
    return _carve(_records(datasets.load_dataset(path, "main", split="train"), path), split, validation_size)


def _carve(train: list[Problem], split: str, size: int) -> list[Problem]:
    """train's last `size` problems (at most a tenth of them, for small files) as validation, the rest as
    train; size 0: all of them as train (a validation file, or validation_size=0)."""
    if not size:
        return train if split == "train" else []
    cut = len(train) - min(size, len(train) // 10)
    return train[cut:] if split == "validation" else train[:cut]


def _records(ds: Any, path: str) -> list[Problem]:
    missing = [f for f in FIELDS if f not in ds.column_names]
    if missing:
        raise DataError(f"data.path: {path} has no column {missing[0]!r}; columns: {', '.join(ds.column_names)}")
    return [{"question": q, "answer": a} for q, a in zip(ds["question"], ds["answer"])]


def _read_jsonl(path: Path) -> list[Problem]:
    return [{"question": r["question"], "answer": r["answer"]} for r in jsonl_records(path, FIELDS)]


def _qa_file(split: str, files: dict[str, Any]) -> Path:
    return _jsonl_file(split, files, why="the gsm8k source reads local files when any data.*_file is set")


def is_task_source(name: str) -> bool:
    """Task-specific data (question/answer problems, KD on answer tokens) rather than packed documents."""
    return name in QA_SOURCES.names()


def check_qa_source(name: str, opts: dict[str, Any], key: str = "data") -> None:
    """Validate a task source's options: unknown names and keys, missing or malformed local files
    (read through; nothing is downloaded)."""
    try:
        QA_SOURCES.check_kwargs(name, opts, key=key)
    except RegistryError as e:
        raise DataError(str(e)) from None
    if name == "gsm8k":
        size = opts.get("validation_size", GSM8K_VALIDATION)
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise DataError(
                f"{key}.validation_size={size!r} must be an integer >= 0 (the last train problems "
                "held out as validation; 0 trains on all)"
            )
        files = {k: opts.get(k) for k in FILE_KEYS}
        for k, v in files.items():
            if v:  # every record of every file given, read now: a bad line stops the run before models load
                check_jsonl_file(_qa_file(k.removesuffix("_file"), files), FIELDS)
        path = str(opts.get("path", GSM8K))
        looks_local = path.startswith(("/", ".", "~")) or Path(path).expanduser().exists()
        if not any(files.values()) and looks_local and not Path(path).expanduser().is_dir():
            raise DataError(f"{key}.path: no such folder {path!r}")


def qa_signature(name: str, split: str, opts: dict[str, Any]) -> dict[str, Any]:
    """What identifies the problems of a split for caches: generator signature, files, or hub name."""
    if name == "arith":
        return {"arith": arith.signature()}
    if name == "gsm8k":
        files = {k: opts.get(k) for k in FILE_KEYS}
        if any(files.values()):
            which = split if split == "test" or (split == "validation" and files["validation_file"]) else "train"
            return {"file": _file_sig(_qa_file(which, files))}
        path = Path(str(opts.get("path", GSM8K))).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
            return {"folder": str(path.resolve()), "files": [_file_sig(p) for p in found]}
        return {"hub": str(opts.get("path", GSM8K))}
    # a new source must say what its content is, or its caches would go stale silently
    raise DataError(f"task source {name!r} has no cache signature; add one to qa_signature")


def qa_row(
    prompt: list[int], target: list[int], sep_id: int, pad_id: int, seq_len: int
) -> tuple[Tensor, Tensor] | None:
    """(input_ids, labels) [seq_len] of one problem, or None when it needs more than seq_len + 1 tokens."""
    w = [*prompt, *target, sep_id]
    if len(w) > seq_len + 1:
        return None
    w += [pad_id] * (seq_len + 1 - len(w))
    w_t = torch.tensor(w, dtype=torch.long)
    labels = torch.full((seq_len,), IGNORE, dtype=torch.long)
    first = len(prompt) - 1  # the position whose next token is the first target token
    last = len(prompt) + len(target)  # exclusive: the last supervised position predicts sep
    labels[first:last] = w_t[first + 1 : last + 1]
    return w_t[:-1].clone(), labels


def build_qa(
    source: str,
    split: str,
    tokenizer: PreTrainedTokenizerBase,
    *,
    seq_len: int,
    artifacts_dir: Path,
    max_samples: int | None = None,
    separator: str | None = None,
    **opts: Any,
) -> PackedData:
    """One split of a task source as rows [N, seq_len], labels on the answer tokens only, or from the cache.

    `max_samples` caps the rows (the first that fit, in the source's order). The answer ends with
    `separator` (a token of the tokenizer; default its eos), as in build_packed; padding is eos.
    """
    check_qa_source(source, opts)
    _check_split(split)
    if seq_len < 1:
        raise DataError(f"data.seq_len must be >= 1, got {seq_len}")
    if max_samples is not None and max_samples < 1:
        raise DataError(f"data.max_samples must be >= 1 or null, got {max_samples}")
    sep_id = separator_id(tokenizer, separator, ends="an answer")
    pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else sep_id
    fields = {
        "format": FORMAT,
        "layout": [qa_format.PROMPT, qa_format.TARGET],
        "source": source,
        "options": {k: opts[k] for k in sorted(opts)},
        "content": qa_signature(source, split, opts),
        "tokenizer": tokenizer_signature(tokenizer),
        "seq_len": seq_len,
        "max_samples": max_samples,
        "split": split,
        "separator_id": sep_id,
        "pad_id": pad_id,
    }
    path = Path(artifacts_dir) / f"qa-{source}-{split}-{content_key(fields)}.pt"

    def pack() -> tuple[PackedData, dict[str, Any]]:
        problems = QA_SOURCES.get(source)(split, **opts)
        data, dropped = qa_rows(
            problems,
            tokenizer,
            source=source,
            split=split,
            sep_id=sep_id,
            pad_id=pad_id,
            seq_len=seq_len,
            max_samples=max_samples,
        )
        return data, {**fields, "n_samples": len(data), "n_dropped": dropped, "n_problems": len(problems)}

    return cached_packed(path, pack)


def qa_rows(
    problems: list[Problem],
    tokenizer: PreTrainedTokenizerBase,
    *,
    source: str,
    split: str,
    sep_id: int,
    pad_id: int,
    seq_len: int,
    max_samples: int | None,
) -> tuple[PackedData, int]:
    """The problems of `source`'s `split` as rows (`fitting_rows`), and how many were dropped for length;
    none fitting is a DataError, some dropped a warning."""
    prompts = _encode(tokenizer, [qa_format.prompt_text(p["question"]) for p in problems])
    targets = _encode(tokenizer, [qa_format.target_text(p["answer"]) for p in problems])
    rows, dropped = fitting_rows(prompts, targets, sep_id, pad_id, seq_len, max_samples)
    if not rows:
        shortest = min((len(p) + len(t) + 1 for p, t in zip(prompts, targets)), default=0)
        raise DataError(
            f"task source {source!r} split {split!r}: none of its {len(problems)} problems fits "
            f"data.seq_len={seq_len} (the shortest needs seq_len >= {shortest - 1})"
        )
    if dropped:
        log.warning(
            "%s/%s: dropped %d of %d problems longer than seq_len + 1 = %d tokens",
            source,
            split,
            dropped,
            len(rows) + dropped,
            seq_len + 1,
        )
    input_ids = torch.stack([r[0] for r in rows])  # [N,L]
    labels = torch.stack([r[1] for r in rows])  # [N,L]
    return PackedData(input_ids, labels, [sample_id(input_ids[i], labels[i]) for i in range(len(rows))]), dropped


def fitting_rows(
    prompts: list[list[int]], targets: list[list[int]], sep_id: int, pad_id: int, seq_len: int, max_samples: int | None
) -> tuple[list[tuple[Tensor, Tensor]], int]:
    """The rows (`qa_row`) of the problems that fit seq_len, in order, at most `max_samples` of them, and how
    many were dropped for length before the cap was reached."""
    rows: list[tuple[Tensor, Tensor]] = []
    dropped = 0
    for p, t in zip(prompts, targets):
        if max_samples is not None and len(rows) >= max_samples:
            break
        row = qa_row(p, t, sep_id, pad_id, seq_len)
        if row is None:
            dropped += 1
        else:
            rows.append(row)
    return rows, dropped


def _encode(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[list[int]]:
    if not texts:
        return []
    return tokenizer(texts, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]


def prompt_lengths(data: PackedData) -> Tensor:
    """Prompt tokens per row: the index of the first supervised label + 1.  [N]"""
    supervised = data.labels != IGNORE  # [N,L]
    if not bool(supervised.any(dim=1).all()):
        raise ValueError("a row has no supervised label: not task data built by build_qa")
    return supervised.long().argmax(dim=1) + 1  # argmax finds the first True


def prompt_ids(data: PackedData, i: int) -> Tensor:
    """The prompt tokens of row i (what the on-policy student continues).  [prompt_len]"""
    n = int(prompt_lengths(data.subset([i]))[0])
    return data.input_ids[i, :n].clone()
