"""Build the offline teacher cache (docs/method.md §9): one teacher pass, RS-KD draws per sample, shard by shard.

Resumable and shareable between workers: a shard is written whole and atomically, then entered in
manifest.json with its sha256, and one already entered intact is skipped, so a killed build resumes to
byte-identical files; the manifest is merged and rewritten atomically under a file lock and sealed with its
own checksum; each shard is built under its own lock, so two builders given the same shards split them; a
folder holding another signature is refused, never overwritten. Draws use a generator seeded by (sample id,
seed) only; shard membership is int(sample_id, 16) % S.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
from filelock import FileLock, Timeout
from tqdm.auto import tqdm

from sekd.stores.teacher_cache import format as fmt
from sekd.selection.draws import rs_kd_draws, sample_generator
from sekd.stores.teacher_cache.store import (
    FORMAT,
    MANIFEST,
    check_signature,
    data_signature,
    encode_block,
    encode_shard,
    file_sha256,
    read_manifest,
    shard_name,
    shard_of,
    write_manifest,
)
from sekd.data.packing import PackedData
from sekd.core.files import atomic_write_bytes
from sekd.core.tensors import IGNORE


NUM_SHARDS = 8  # a cache's default number of shards: workers (processes, or a run's ranks) split them


def worker_shards(num_shards: int, worker_index: int, num_workers: int) -> list[int]:
    """The shards of worker i of W: i, i + W, i + 2W, ... (disjoint, covering all)."""
    if not 0 <= worker_index < num_workers:
        raise ValueError(f"worker_index must be in [0, {num_workers}), got {worker_index}")
    return list(range(worker_index, num_shards, num_workers))


def make_signature(
    *,
    teacher_name: str,
    tokenizer_sig: str,
    vocab_size: int,
    temperature: float,
    n_draws: int,
    seed: int,
    sample_ids: list[str],
    seq_len: int,
    num_shards: int,
    teacher_dtype: str,
    device_type: str,
) -> dict[str, Any]:
    """Everything the cached bytes depend on. dtype and device type change the draws (logit rounding,
    and CPU and CUDA generators differ), so a resumed build must use the same ones."""
    fmt.bytes_per_record(vocab_size, n_draws)  # validates n_draws
    return {
        "format": FORMAT,
        "teacher": teacher_name,
        "tokenizer": tokenizer_sig,
        "vocab_size": int(vocab_size),
        "temperature": float(temperature),
        "n_draws": int(n_draws),
        "seed": int(seed),
        "data": data_signature(sample_ids),
        "seq_len": int(seq_len),
        "num_shards": int(num_shards),
        "teacher_dtype": teacher_dtype,
        "device_type": device_type,
    }


def _manifest_lock(out: Path) -> FileLock:
    return FileLock(str(out / ".manifest.lock"))


def _shard_lock(out: Path, i: int) -> FileLock:
    return FileLock(str(out / f".shard-{i:05d}.lock"))


def _merge_manifest(out: Path, sig: dict[str, Any], n_samples: int, entry: dict[str, Any] | None) -> dict[str, Any]:
    """Under the manifest lock: read, check the signature, add `entry`, write atomically."""
    mpath = out / MANIFEST
    with _manifest_lock(out):
        if mpath.exists():
            man = read_manifest(out)
            check_signature(mpath, man["signature"], sig)
            check_signature(mpath, sig, man["signature"])  # no extra keys either
        else:
            man = {"format": FORMAT, "signature": sig, "samples": n_samples, "shards": []}
        if entry is not None:
            shards = {e["index"]: e for e in man["shards"]}
            shards[entry["index"]] = entry
            man["shards"] = [shards[i] for i in sorted(shards)]
        man["complete"] = len(man["shards"]) == sig["num_shards"]
        return write_manifest(out, man)


def _done(out: Path, i: int, num_shards: int) -> bool:
    """Entered in the manifest with the checksum of the file on disk."""
    man = read_manifest(out)
    entry = next((e for e in man["shards"] if e["index"] == i), None)
    path = out / shard_name(i, num_shards)
    return (
        entry is not None
        and path.exists()
        and path.stat().st_size == entry["bytes"]
        and file_sha256(path) == entry["sha256"]
    )


@torch.inference_mode()
def shard_bytes(
    teacher,
    data: PackedData,
    rows: list[int],
    *,
    n_draws: int,
    temperature: float,
    seed: int,
    vocab_size: int,
    batch_size: int,
    device: torch.device,
    bar: tqdm | None = None,
) -> tuple[bytes, dict[str, int]]:
    """Run the teacher over `rows` (sorted by sample id) and encode their draws as one shard file."""
    blocks, positions, records = [], 0, 0
    for start in range(0, len(rows), batch_size):
        idx = rows[start : start + batch_size]
        x = data.input_ids[idx].to(device)  # [B,L]
        z = teacher(input_ids=x).logits[..., :vocab_size]  # cut padding rows of the head      [B,L,V]
        for b, r in enumerate(idx):
            sid = data.sample_ids[r]
            valid = data.labels[r] != IGNORE  # [L]
            g = sample_generator(sid, seed)  # a CPU generator: the same draws on every device
            at = valid.to(device).nonzero().squeeze(1)  # the valid positions, read in place       [P]
            ids, counts, offsets = rs_kd_draws(z[b], n_draws, temperature, g, rows=at)  # [R],[R],[P+1]
            body, n_pos, n_rec = encode_block(
                valid.numpy(), ids.cpu().numpy(), counts.cpu().numpy(), offsets.cpu().numpy(), n_draws, vocab_size
            )
            blocks.append((sid, body, n_pos, n_rec))
            positions, records = positions + n_pos, records + n_rec
        if bar is not None:
            bar.update(len(idx))
    blob = encode_shard(blocks, n_draws=n_draws, seq_len=data.seq_len, vocab_size=vocab_size)
    return blob, {"samples": len(rows), "positions": positions, "records": records}


def build_cache(
    teacher,
    data: PackedData,
    out: str | Path,
    *,
    teacher_name: str,
    tokenizer_sig: str,
    n_draws: int = 64,
    temperature: float = 1.0,
    seed: int = 0,
    num_shards: int = NUM_SHARDS,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
    vocab_size: int | None = None,
    shards: list[int] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Build (or resume) the shards `shards` (default all) of the cache at `out`; returns the manifest."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(device)
    teacher, vocab_size = _ready_teacher(teacher, device, vocab_size)
    first = first_rows(data)
    sig = make_signature(
        teacher_name=teacher_name,
        tokenizer_sig=tokenizer_sig,
        vocab_size=vocab_size,
        temperature=temperature,
        n_draws=n_draws,
        seed=seed,
        sample_ids=list(first),
        seq_len=data.seq_len,
        num_shards=num_shards,
        teacher_dtype=str(next(teacher.parameters()).dtype).removeprefix("torch."),
        device_type=device.type,
    )
    _merge_manifest(out, sig, len(first), None)  # refuses a folder of another signature before any work
    members = shard_members(first, _checked_shards(shards, num_shards), num_shards)
    draw = {
        "n_draws": n_draws,
        "temperature": temperature,
        "seed": seed,
        "vocab_size": vocab_size,
        "batch_size": batch_size,
        "device": device,
    }
    with tqdm(
        total=sum(len(m) for m in members.values()),
        unit="sample",
        desc=f"cache {out.name}",
        disable=not progress,
        leave=False,
    ) as bar:
        _each_shard_once(
            out,
            sorted(members),
            lambda i: _build_shard(out, i, members[i], sig, len(first), teacher, data, bar, **draw),
        )
    return read_manifest(out)


def _ready_teacher(teacher, device: torch.device, vocab_size: int | None):
    """The teacher on `device` in eval mode, and the vocabulary to draw from (default: all its logits)."""
    teacher = teacher.to(device).eval()
    width = teacher.get_output_embeddings().weight.shape[0]
    vocab_size = int(vocab_size or width)
    if vocab_size > width:
        raise ValueError(f"vocab_size={vocab_size} exceeds the teacher's {width} logits")
    return teacher, vocab_size


def first_rows(data: PackedData) -> dict[str, int]:
    """sample id -> its first row: identical windows have one id, and one entry in the cache."""
    first: dict[str, int] = {}
    for r, sid in enumerate(data.sample_ids):
        first.setdefault(sid, r)
    return first


def _checked_shards(shards: list[int] | None, num_shards: int) -> list[int]:
    todo = sorted(set(range(num_shards) if shards is None else shards))
    if any(not 0 <= i < num_shards for i in todo):
        raise ValueError(f"shards must be in [0, {num_shards}), got {todo}")
    return todo


def shard_members(first: dict[str, int], todo: list[int], num_shards: int) -> dict[int, list[int]]:
    """shard -> the rows it holds (by sample id, sorted), for the shards in `todo`."""
    members: dict[int, list[int]] = {i: [] for i in todo}
    for sid, r in sorted(first.items()):
        s = shard_of(sid, num_shards)
        if s in members:
            members[s].append(r)
    return members


def _build_shard(
    out: Path, i: int, rows: list[int], sig: dict[str, Any], n_samples: int, teacher, data: PackedData, bar, **draw: Any
) -> None:
    """Shard i, unless the manifest already holds it intact: encoded, written atomically, then entered."""
    num_shards = sig["num_shards"]
    if _done(out, i, num_shards):
        bar.update(len(rows))
        return
    blob, counts = shard_bytes(teacher, data, rows, bar=bar, **draw)
    path = out / shard_name(i, num_shards)
    atomic_write_bytes(path, blob)
    entry = {"index": i, "file": path.name, "sha256": file_sha256(path), "bytes": len(blob), **counts}
    _merge_manifest(out, sig, n_samples, entry)


def _each_shard_once(out: Path, todo: list[int], build: Callable[[int], None]) -> None:
    """build(i) for every shard, each under its lock: first the shards no other builder holds, then
    (waiting for their locks) the others, so a shard whose builder died is built here."""
    deferred = []
    for i in todo:
        lock = _shard_lock(out, i)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            deferred.append(i)
            continue
        try:
            build(i)
        finally:
            lock.release()
    for i in deferred:
        with _shard_lock(out, i):
            build(i)
