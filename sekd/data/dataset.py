"""Build packed datasets from a source and a tokenizer, cached on disk; and the deterministic batch order.

Cache layout: `<artifacts_dir>/<source>-<split>-<key>.pt` (PackedData.save) beside `<same>.json` (the
fields hashed into `key`, for humans) and `<same>.pt.lock` (while it is built). `key` hashes the source name
and options, the source's content signature, the tokenizer's signature, seq_len, token_budget,
split and FORMAT; change any and the cache misses. Built once, atomically, by sekd.core.artifacts.build_once.
"""

from __future__ import annotations

import hashlib
import json
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator

import torch
from tqdm.auto import tqdm

from sekd.core.artifacts import build_once, content_key
from sekd.data import packing
from sekd.data.packing import PackedData, pack_documents
from sekd.data.sources import SOURCES, DataError, check_source, source_signature
from sekd.core.files import atomic_write_json

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

TOKENIZE_BATCH = 256  # documents per tokenizer call; a streamed source is read at most this far past the budget


def tokenizer_signature(tokenizer: PreTrainedTokenizerBase) -> str:
    """16 hex chars of sha256 over the tokenizer's full json (vocab, merges, normalizer, specials) + eos id."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:  # a slow tokenizer: the vocabulary is the best we have
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(f"eos={tokenizer.eos_token_id}".encode())
    return h.hexdigest()[:16]


def separator_id(tokenizer: PreTrainedTokenizerBase, separator: str | None, *, ends: str) -> int:
    """The id of `separator` (a token of the tokenizer), or the tokenizer's eos when it is None."""
    sep_id = tokenizer.eos_token_id
    if separator is not None:
        sep_id = tokenizer.convert_tokens_to_ids(separator)
        if sep_id is None or sep_id == tokenizer.unk_token_id:
            raise DataError(f"data.separator={separator!r} is not a token of the tokenizer")
    if sep_id is None:
        raise DataError(f"the tokenizer has no eos token; set data.separator to the token that ends {ends}")
    return sep_id


def cache_fields(
    source: str,
    split: str,
    tokenizer: PreTrainedTokenizerBase,
    *,
    seq_len: int,
    token_budget: int | None,
    source_opts: dict[str, Any],
) -> dict[str, Any]:
    """Everything the packed result depends on (hashed into the cache key)."""
    return {
        "format": packing.FORMAT,
        "source": source,
        "options": {k: source_opts[k] for k in sorted(source_opts)},
        "content": source_signature(source, split, source_opts),
        "tokenizer": tokenizer_signature(tokenizer),
        "seq_len": seq_len,
        "token_budget": token_budget,
        "split": split,
    }


def cache_path(artifacts_dir: Path, fields: dict[str, Any]) -> Path:
    return Path(artifacts_dir) / f"{fields['source']}-{fields['split']}-{content_key(fields)}.pt"


def build_packed(
    source: str,
    split: str,
    tokenizer: PreTrainedTokenizerBase,
    *,
    seq_len: int,
    token_budget: int | None,
    artifacts_dir: Path,
    separator: str | None = None,
    **source_opts: Any,
) -> PackedData:
    """Tokenize and pack one split of a source (docs/method.md §1, §10), or load it from the cache.

    Documents end with `separator` (a token of the tokenizer; default its eos token). Chat-tuned
    tokenizers such as Qwen3's use <|im_end|> as eos, while <|endoftext|> separates documents.
    """
    check_source(source, source_opts)
    sep_id = separator_id(tokenizer, separator, ends="a document")
    fields = cache_fields(source, split, tokenizer, seq_len=seq_len, token_budget=token_budget, source_opts=source_opts)
    fields["separator_id"] = sep_id

    def pack() -> tuple[PackedData, dict[str, Any]]:
        texts = SOURCES.get(source)(split, **source_opts)
        with tqdm(total=token_budget, unit="tok", unit_scale=True, desc=f"pack {source}/{split}", leave=False) as bar:
            data = pack_documents(_tokenize(texts, tokenizer, bar), seq_len, sep_id, token_budget)
        if len(data) == 0:
            raise DataError(f"data source {source!r} split {split!r} holds fewer than {seq_len + 1} tokens")
        return data, {**fields, "n_samples": len(data)}

    return cached_packed(cache_path(artifacts_dir, fields), pack)


def cached_packed(path: Path, make: Callable[[], tuple[PackedData, dict[str, Any]]]) -> PackedData:
    """The PackedData at `path`, or `make()`'s (data, description), stored there once (sekd.core.artifacts)
    with the description beside it as `<path>.json`, for humans."""
    made: list[PackedData] = []

    def build(tmp: Path) -> None:
        data, about = make()
        data.save(tmp)
        atomic_write_json(path.with_suffix(".json"), about)
        made.append(data)

    build_once(path, build)
    return made[0] if made else PackedData.load(path)


def _tokenize(texts: Iterable[str], tokenizer: PreTrainedTokenizerBase, bar: tqdm) -> Iterator[list[int]]:
    """Batched tokenization, lazily: the packer stops pulling once its budget is met."""
    it = iter(texts)
    while raw := list(islice(it, TOKENIZE_BATCH)):
        batch = [t for t in raw if t]  # an empty document would only add a lone eos
        if not batch:
            continue
        enc = tokenizer(batch, add_special_tokens=False, return_attention_mask=False, verbose=False)
        for ids in enc["input_ids"]:
            bar.update(len(ids) + 1)
            yield ids


def epoch_order(n: int, *, seed: int, epoch: int = 0) -> torch.Tensor:
    """A seeded permutation of range(n), fresh per epoch, independent of the global RNG.  [n]"""
    mixed = int.from_bytes(hashlib.sha256(f"{seed}/{epoch}".encode()).digest()[:8], "big")
    return torch.randperm(n, generator=torch.Generator().manual_seed(mixed))


def batches(
    data: PackedData | int,
    *,
    micro_batch_size: int,
    seed: int,
    epoch: int = 0,
    start: int = 0,
    drop_last: bool = False,
) -> Iterator[list[int]]:
    """Index lists of micro_batch_size from epoch_order, from sample offset `start` (resume) on."""
    n = data if isinstance(data, int) else len(data)
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
    if not 0 <= start <= n or (start % micro_batch_size and start != n):
        # resuming mid-batch would shift every later batch boundary; start == n is a finished epoch
        raise ValueError(f"start={start} must be a multiple of micro_batch_size={micro_batch_size} in [0, {n}], or {n}")
    order = epoch_order(n, seed=seed, epoch=epoch).tolist()
    for i in range(start, n, micro_batch_size):
        idx = order[i : i + micro_batch_size]
        if drop_last and len(idx) < micro_batch_size:
            return
        yield idx
