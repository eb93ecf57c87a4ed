"""Build the offline teacher cache (docs/method.md §9): one teacher pass, shard by shard, writing the targets of
one or several kinds (class samplers, kinds.py), each into its own folder.

Resumable and shareable between workers: a shard is written whole and atomically, then entered in
manifest.json with its sha256, and one already entered intact is skipped, so a killed build resumes to
byte-identical files; the manifest is merged and rewritten atomically under a file lock and sealed with its
own checksum; each shard is built under its own lock, so two builders given the same shards split them; a
folder holding another signature is refused, never overwritten. Random kinds draw from a generator seeded by
(sample id, seed) only; shard membership is int(sample_id, 16) % S.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Callable

import torch
from filelock import FileLock, Timeout
from tqdm.auto import tqdm

from sekd.stores.teacher_cache import format as fmt
from sekd.selection.draws import rs_kd_draws, sample_generator
from sekd.stores.teacher_cache.kinds import CacheKind
from sekd.stores.teacher_cache.store import (
    FORMAT,
    MANIFEST,
    Block,
    Layout,
    check_signature,
    data_signature,
    encode_shard,
    make_block,
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
    kind: CacheKind,
    seed: int,
    sample_ids: list[str],
    seq_len: int,
    num_shards: int,
    teacher_dtype: str,
    device_type: str,
) -> dict[str, Any]:
    """Everything the cached bytes depend on, the kind (sampler, options, form) included. dtype and device
    type change the targets (logit rounding, and CPU and CUDA generators differ), so a resumed build must
    use the same ones."""
    if kind.records == "counts":
        fmt.bytes_per_record(vocab_size, int(kind.options["n_draws"]))  # validates n_draws
    return {
        "format": FORMAT,
        "teacher": teacher_name,
        "tokenizer": tokenizer_sig,
        "vocab_size": int(vocab_size),
        "temperature": float(temperature),
        **kind.signature(),
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


def layout_of(kind: CacheKind, vocab_size: int) -> Layout:
    n_draws = int(kind.options["n_draws"]) if kind.records == "counts" else 0
    return Layout(kind.records, vocab_size, n_draws, kind.form == "tail")


def sample_block(kind: CacheKind, sampler, z: torch.Tensor, valid: torch.Tensor, sid: str, **draw: Any) -> Block:
    """One sample's block of `kind` from its teacher logits z [L,V]: the sampler at the valid positions,
    a random one drawing from the sample's own generator (sample id, seed)."""
    g = sample_generator(sid, draw["seed"])  # a CPU generator: the same draws on every device
    at = valid.to(z.device).nonzero().squeeze(1)  # the valid positions                              [P]
    layout, valid_np = draw["layout"], valid.numpy()
    if kind.records == "counts":  # rs_kd's own draws, read in place; the sampler draws exactly these
        ids, counts, offsets = rs_kd_draws(z, layout.n_draws, draw["temperature"], g, rows=at)
        return make_block(sid, valid_np, ids.cpu().numpy(), counts.cpu().numpy(), offsets.cpu().numpy(), layout)
    t = sampler(z[at], temperature=draw["temperature"], generator=g)  # [P,K]
    lens = t.mask.sum(-1).cpu()
    offsets = torch.zeros(len(lens) + 1, dtype=torch.long)
    offsets[1:] = lens.cumsum(0)
    ids, probs = t.ids[t.mask].cpu().numpy(), t.probs[t.mask].double().cpu().numpy()  # row-major: K order kept
    tail = t.tail.double().cpu().numpy() if t.tail is not None else None
    return make_block(sid, valid_np, ids, probs, offsets.numpy(), layout, tail)


@torch.inference_mode()
def shard_bytes(
    teacher,
    data: PackedData,
    rows: list[int],
    *,
    kinds: list[CacheKind],
    temperature: float,
    seed: int,
    vocab_size: int,
    batch_size: int,
    device: torch.device,
    bar: tqdm | None = None,
) -> list[tuple[bytes, dict[str, int]]]:
    """Run the teacher once over `rows` (sorted by sample id) and encode each kind's targets as one shard
    file. -> per kind: (the file's bytes, its samples / positions / records)"""
    layouts = [layout_of(k, vocab_size) for k in kinds]
    samplers = [k.sampler() for k in kinds]
    blocks: list[list[Block]] = [[] for _ in kinds]
    for start in range(0, len(rows), batch_size):
        idx = rows[start : start + batch_size]
        x = data.input_ids[idx].to(device)  # [B,L]
        z = teacher(input_ids=x).logits[..., :vocab_size]  # cut padding rows of the head      [B,L,V]
        for b, r in enumerate(idx):
            valid = data.labels[r] != IGNORE  # [L]
            for j, kind in enumerate(kinds):
                blocks[j].append(
                    sample_block(
                        kind,
                        samplers[j],
                        z[b],
                        valid,
                        data.sample_ids[r],
                        seed=seed,
                        temperature=temperature,
                        layout=layouts[j],
                    )  # fmt: skip
                )
        if bar is not None:
            bar.update(len(idx))
    return [
        (
            encode_shard(blks, layout=lay, seq_len=data.seq_len),
            {"samples": len(rows), "positions": sum(b.n_pos for b in blks), "records": sum(b.n_rec for b in blks)},
        )
        for blks, lay in zip(blocks, layouts)
    ]


def build_cache(
    teacher,
    data: PackedData,
    out: str | Path,
    *,
    n_draws: int = 64,
    kind: CacheKind | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Build (or resume) the cache of one kind (default: rs_kd with `n_draws`) at `out`; returns its manifest.
    `options`: those of `build_caches`."""
    kind = kind or CacheKind("rs_kd", {"n_draws": int(n_draws)}, "draws")
    return build_caches(teacher, data, {Path(out): kind}, **options)[Path(out)]


def build_caches(
    teacher,
    data: PackedData,
    outs: dict[Path, CacheKind],
    *,
    teacher_name: str,
    tokenizer_sig: str,
    temperature: float = 1.0,
    seed: int = 0,
    num_shards: int = NUM_SHARDS,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
    vocab_size: int | None = None,
    shards: list[int] | None = None,
    progress: bool = True,
) -> dict[Path, dict[str, Any]]:
    """Build (or resume) the shards `shards` (default all) of one cache per kind, folder -> kind, in one
    teacher pass: each folder is byte for byte the one a build of its kind alone writes. -> folder -> manifest"""
    outs = {Path(o): k for o, k in outs.items()}
    device = torch.device(device)
    teacher, vocab_size = _ready_teacher(teacher, device, vocab_size)
    first = first_rows(data)
    dtype = str(next(teacher.parameters()).dtype).removeprefix("torch.")
    sigs = {
        out: make_signature(
            teacher_name=teacher_name,
            tokenizer_sig=tokenizer_sig,
            vocab_size=vocab_size,
            temperature=temperature,
            kind=kind,
            seed=seed,
            sample_ids=list(first),
            seq_len=data.seq_len,
            num_shards=num_shards,
            teacher_dtype=dtype,
            device_type=device.type,
        )  # fmt: skip
        for out, kind in outs.items()
    }
    for out, sig in sigs.items():
        out.mkdir(parents=True, exist_ok=True)
        _merge_manifest(out, sig, len(first), None)  # refuses a folder of another signature before any work
    members = shard_members(first, _checked_shards(shards, num_shards), num_shards)
    draw = dict(temperature=temperature, seed=seed, vocab_size=vocab_size, batch_size=batch_size, device=device)
    name = next(iter(outs)).name if len(outs) == 1 else f"{len(outs)} kinds"
    total = sum(len(m) for m in members.values())
    with tqdm(total=total, unit="sample", desc=f"cache {name}", disable=not progress, leave=False) as bar:
        _each_shard_once(
            sorted(outs),
            sorted(members),
            lambda i: _build_shard(outs, sigs, i, members[i], len(first), teacher, data, bar, **draw),
        )
    return {out: read_manifest(out) for out in outs}


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
    outs: dict[Path, CacheKind],
    sigs: dict[Path, dict[str, Any]],
    i: int,
    rows: list[int],
    n_samples: int,
    teacher,
    data: PackedData,
    bar,
    **draw: Any,
) -> None:
    """Shard i of every folder whose manifest does not already hold it intact: encoded, written atomically,
    then entered."""
    num_shards = next(iter(sigs.values()))["num_shards"]
    todo = [out for out in sorted(outs) if not _done(out, i, num_shards)]
    if not todo:
        bar.update(len(rows))
        return
    built = shard_bytes(teacher, data, rows, kinds=[outs[o] for o in todo], bar=bar, **draw)
    for out, (blob, counts) in zip(todo, built):
        path = out / shard_name(i, num_shards)
        atomic_write_bytes(path, blob)
        entry = {"index": i, "file": path.name, "sha256": file_sha256(path), "bytes": len(blob), **counts}
        _merge_manifest(out, sigs[out], n_samples, entry)


def _each_shard_once(outs: list[Path], todo: list[int], build: Callable[[int], None]) -> None:
    """build(i) for every shard, under its lock in every folder (taken in the folders' order, so two builders
    never deadlock): first the shards no other builder holds, then (waiting for their locks) the others, so
    a shard whose builder died is built here."""
    deferred = []
    for i in todo:
        with contextlib.ExitStack() as held:
            try:
                for out in outs:
                    held.enter_context(_shard_lock(out, i).acquire(timeout=0))
            except Timeout:
                deferred.append(i)
                continue
            build(i)
    for i in deferred:
        with contextlib.ExitStack() as held:
            for out in outs:
                held.enter_context(_shard_lock(out, i))
            build(i)
