"""The cache on disk (docs/method.md §9, with its files' byte layout): a manifest plus shard files, and the
reader the trainer uses.

`manifest.json` holds the signature (the kind: class sampler, options, form), num_shards, one entry per
finished shard (sha256, bytes, counts) and a `checksum` over the rest; `shard-<i>-of-<S>.bin` holds the
samples with int(sample_id, 16) % S == i: a header, an index by sample id, and one block per sample (its
valid mask, the number of classes at each valid position, a tail form's tail masses, then the records of
format.py: (id, count) for rs_kd, (id, float16 probability) otherwise). A shard is keyed by content
(sample id), never by batch, step or position in the dataset (docs/method.md §13).
"""

from __future__ import annotations

import hashlib
import json
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from sekd.stores.teacher_cache import format as fmt
from sekd.core.tensors import IGNORE

if TYPE_CHECKING:
    from torch import Tensor

    from sekd.selection.classes import SparseTarget

FORMAT = 3  # bump when the manifest or shard layout changes (2: a sealed manifest; 3: a kind per class sampler)
MAGIC = b"SEKDRSKD"
# magic, format, records (0 counts, 1 probabilities), wide, bytes per len, tail, n_draws, seq_len, samples, V
HEADER = struct.Struct("<8sHBBBB2xIIII")  # 32 bytes
RECORDS = ("counts", "probs")
INDEX = np.dtype([("sid", "<u8"), ("offset", "<u8"), ("nbytes", "<u8"), ("n_pos", "<u4"), ("n_rec", "<u4")])
MANIFEST = "manifest.json"
TAIL = np.dtype("<f2")  # a tail form's mass outside C_t, one per valid position
SUM_SLACK = 2e-3  # float16 rounding of a position's probabilities (2^-11 relative each) stays well inside
SUMS_TO_ONE = ("draws", "renormalized", "tail")  # forms whose p~ (with its tail) is a distribution
# the signature's own fields (build.make_signature); a kind's options sit beside them under their own names
BASE_KEYS = frozenset(
    "format teacher tokenizer vocab_size temperature seed data seq_len num_shards teacher_dtype device_type "
    "kind form records".split()
)


class CacheError(ValueError):
    """A cache that cannot be used as asked; the message is one line and names the file."""


def shard_of(sample_id: str, num_shards: int) -> int:
    """int(sample_id, 16) % num_shards: by content, so it never depends on batch, order or worker."""
    return sid_int(sample_id) % num_shards


def sid_int(sample_id: str) -> int:
    if len(sample_id) != 16:
        raise CacheError(f"sample id {sample_id!r}: expected 16 hex chars (sekd.data.packing.sample_id)")
    try:
        return int(sample_id, 16)
    except ValueError:
        raise CacheError(f"sample id {sample_id!r}: not hexadecimal") from None


def shard_name(index: int, num_shards: int) -> str:
    return f"shard-{index:05d}-of-{num_shards:05d}.bin"


def data_signature(sample_ids: list[str]) -> str:
    """16 hex chars of sha256 over the sorted distinct sample ids, newline-joined."""
    return hashlib.sha256("\n".join(sorted(set(sample_ids))).encode()).hexdigest()[:16]


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def lens_dtype(most: int) -> np.dtype:
    """Classes per position <= most: one byte while most <= 255, two while <= 65,535, else four."""
    return np.dtype("u1") if most <= 0xFF else np.dtype("<u2") if most <= 0xFFFF else np.dtype("<u4")


def valid_bytes(seq_len: int) -> int:
    return (seq_len + 7) // 8


@dataclass(frozen=True)
class Layout:
    """How a cache's records are stored: counts (rs_kd) or probabilities, their width, a tail per position."""

    records: str
    vocab_size: int
    n_draws: int = 0  # counts only
    tail: bool = False

    @classmethod
    def of(cls, sig: dict[str, Any]) -> "Layout":
        records = sig.get("records", "counts")
        n = int(sig.get("n_draws", 0)) if records == "counts" else 0
        return cls(records, int(sig["vocab_size"]), n, sig.get("form") == "tail")

    @property
    def wide(self) -> bool:
        if self.records == "counts":
            return fmt.is_wide(self.vocab_size, self.n_draws)
        return fmt.ids_wide(self.vocab_size)

    @property
    def record_bytes(self) -> int:
        if self.records == "counts":
            return fmt.bytes_per_record(self.vocab_size, self.n_draws)
        return fmt.prob_record_bytes(self.vocab_size)

    def pack(self, ids, values) -> bytes:
        if self.records == "counts":
            return fmt.pack(ids, values, self.n_draws, self.vocab_size)
        return fmt.pack_probs(ids, values, self.vocab_size)

    def unpack(self, buf, n: int) -> tuple[np.ndarray, np.ndarray]:
        if self.records == "counts":
            return fmt.unpack(buf, n, self.wide)
        return fmt.unpack_probs(buf, n, self.wide)


# ---------------------------------------------------------------- writing


@dataclass
class Block:
    """One sample's target before encoding: valid [L] bool, the classes per valid position (lens [P]),
    their records' bytes, the tail mass per valid position (a tail form) or None."""

    sample_id: str
    valid: np.ndarray
    lens: np.ndarray
    records: bytes
    tail: np.ndarray | None = None

    @property
    def n_pos(self) -> int:
        return len(self.lens)

    @property
    def n_rec(self) -> int:
        return int(self.lens.sum())


def make_block(sample_id: str, valid: np.ndarray, ids, values, offsets, layout: Layout, tail=None) -> Block:
    """A sample's flat target (ids/values [R], offsets [P+1] over its valid positions) as a Block."""
    lens = np.diff(np.asarray(offsets, dtype=np.int64))
    if len(lens) != int(valid.sum()):
        raise ValueError(f"{len(lens)} positions of classes for {int(valid.sum())} valid positions")
    if layout.tail != (tail is not None):
        raise ValueError(f"a {'tail' if layout.tail else 'tail-less'} cache, given tail={tail is not None}")
    half = None if tail is None else fmt.half_codes(tail).view(np.float16).astype(TAIL)
    return Block(sample_id, valid.astype(bool), lens, layout.pack(ids, values), half)


def encode_shard(blocks: list[Block], *, layout: Layout, seq_len: int) -> bytes:
    """The shard file's bytes: samples sorted by id; each len stored in the fewest bytes the shard's widest
    position needs (so the bytes follow from the content alone)."""
    blocks = sorted(blocks, key=lambda b: sid_int(b.sample_id))
    widest = max((int(b.lens.max()) for b in blocks if b.n_pos), default=0)
    lens_t = lens_dtype(widest)
    bodies = [
        np.packbits(b.valid, bitorder="little").tobytes()
        + b.lens.astype(lens_t).tobytes()
        + (b.tail.tobytes() if b.tail is not None else b"")
        + b.records
        for b in blocks
    ]
    index = np.zeros(len(blocks), dtype=INDEX)
    offset = HEADER.size + INDEX.itemsize * len(blocks)
    for i, (b, body) in enumerate(zip(blocks, bodies)):
        index[i] = (sid_int(b.sample_id), offset, len(body), b.n_pos, b.n_rec)
        offset += len(body)
    code = RECORDS.index(layout.records)
    header = HEADER.pack(
        MAGIC, FORMAT, code, int(layout.wide), lens_t.itemsize, int(layout.tail), layout.n_draws, seq_len,
        len(blocks), layout.vocab_size,
    )  # fmt: skip
    return b"".join([header, index.tobytes(), *bodies])


# ---------------------------------------------------------------- reading


@dataclass
class SampleDraws:
    """One sample's cached target: valid [L] bool, ids [R] int64 with counts [R] int64 (counts records) or
    probs [R] float32 (probability records), offsets [n_pos+1] int64, tail [n_pos] float32 or None."""

    valid: np.ndarray
    ids: np.ndarray
    counts: np.ndarray | None
    offsets: np.ndarray
    nbytes: int
    probs: np.ndarray | None = None
    tail: np.ndarray | None = None


class Shard:
    """A shard file, memory-mapped; its header checked against the manifest, its index against the file's size."""

    def __init__(self, path: Path, sig: dict[str, Any]):
        self.path = path
        with open(path, "rb") as f:
            size = f.seek(0, 2)
            self.buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
        if size < HEADER.size:
            raise CacheError(f"{path}: truncated: {size} bytes, shorter than the {HEADER.size}-byte header")
        magic, version, code, wide, lens_bytes, tail, n_draws, seq_len, n, vocab = HEADER.unpack_from(self.buf, 0)
        if magic != MAGIC:
            raise CacheError(f"{path}: not a sekd cache shard (magic {magic!r})")
        if version != FORMAT:
            raise CacheError(f"{path}: shard format {version}, this sekd reads {FORMAT}")
        self.layout = Layout.of(sig)
        self.seq_len, self.vocab = seq_len, vocab
        self._check_header(sig, code, wide, lens_bytes, tail, n_draws)
        self.lens_dtype = lens_dtype({1: 0xFF, 2: 0xFFFF, 4: 0xFFFF + 1}[lens_bytes])
        end_index = HEADER.size + INDEX.itemsize * n
        if size < end_index:
            raise CacheError(f"{path}: truncated: {size} bytes, the index of {n} samples ends at {end_index}")
        self.index = np.frombuffer(self.buf, dtype=INDEX, count=n, offset=HEADER.size)
        self._check_index(size, end_index)

    def _check_header(self, sig: dict[str, Any], code: int, wide: int, lens_bytes: int, tail: int, n_draws: int):
        path, lay = self.path, self.layout
        found = {"seq_len": self.seq_len, "vocab_size": self.vocab}
        if lay.records == "counts":
            found["n_draws"] = n_draws
        for key, value in found.items():
            if sig.get(key) != value:
                raise CacheError(f"{path}: header {key}={value} disagrees with the manifest's {sig.get(key)}")
        if code >= len(RECORDS) or RECORDS[code] != lay.records or bool(tail) != lay.tail:
            shown = RECORDS[code] if code < len(RECORDS) else code
            raise CacheError(
                f"{path}: header records={shown}, tail={bool(tail)} disagree with the manifest's kind "
                f"{sig.get('kind')!r} (records={lay.records}, form={sig.get('form')})"
            )
        if bool(wide) != lay.wide or lens_bytes not in (1, 2, 4):
            raise CacheError(
                f"{path}: header record width wide={bool(wide)}, lens {lens_bytes} B are wrong for V={self.vocab}"
            )

    def _check_index(self, size: int, end_index: int) -> None:
        n, path = len(self.index), self.path
        expect = (
            valid_bytes(self.seq_len)
            + self.index["n_pos"].astype(np.int64) * (self.lens_dtype.itemsize + TAIL.itemsize * self.layout.tail)
            + self.index["n_rec"].astype(np.int64) * self.layout.record_bytes
        )
        ends = self.index["offset"].astype(np.int64) + self.index["nbytes"].astype(np.int64)
        starts = np.concatenate([[end_index], ends[:-1]]).astype(np.int64)
        if n and (np.any(self.index["nbytes"].astype(np.int64) != expect) or np.any(self.index["offset"] != starts)):
            raise CacheError(f"{path}: corrupt index (block sizes or offsets inconsistent)")
        sid = self.index["sid"]
        if n and np.any(sid[1:] <= sid[:-1]):  # (np.diff of uint64 would wrap instead of going negative)
            raise CacheError(f"{path}: corrupt index (sample ids not strictly ascending)")
        last = int(ends[-1]) if n else end_index
        if size != last:
            raise CacheError(
                f"{path}: {'truncated' if size < last else 'trailing bytes'}: {size} bytes, blocks end at {last}"
            )

    def __len__(self) -> int:
        return len(self.index)

    def find(self, sample_id: str) -> int | None:
        key = np.uint64(sid_int(sample_id))
        i = int(np.searchsorted(self.index["sid"], key))
        return i if i < len(self.index) and self.index["sid"][i] == key else None

    def sample_ids(self) -> list[str]:
        return [f"{int(s):016x}" for s in self.index["sid"]]

    def read(self, i: int) -> SampleDraws:
        off, nbytes, n_pos, n_rec = (int(self.index[k][i]) for k in ("offset", "nbytes", "n_pos", "n_rec"))
        vb = valid_bytes(self.seq_len)
        valid = np.unpackbits(np.frombuffer(self.buf, np.uint8, vb, off), count=self.seq_len, bitorder="little").astype(
            bool
        )
        lens = np.frombuffer(self.buf, self.lens_dtype, n_pos, off + vb).astype(np.int64)
        at = off + vb + n_pos * self.lens_dtype.itemsize
        tail = None
        if self.layout.tail:
            tail = np.frombuffer(self.buf, TAIL, n_pos, at).astype(np.float32)
            at += n_pos * TAIL.itemsize
        ids, values = self.layout.unpack(memoryview(self.buf)[at : at + n_rec * self.layout.record_bytes], n_rec)
        offsets = np.zeros(n_pos + 1, dtype=np.int64)
        np.cumsum(lens, out=offsets[1:])
        if self.layout.records == "counts":
            return SampleDraws(valid, ids, values, offsets, nbytes)
        return SampleDraws(valid, ids, None, offsets, nbytes, probs=values, tail=tail)

    def check_block(self, i: int, form: str | None = None) -> None:
        """Decodable: valid bits match n_pos, lens sum to n_rec, ids in [0,V); counts: >= 1, summing to N,
        ids ascending per position; probabilities (and tails): in [0, 1], each position's sum <= 1 (a form
        that is a distribution: = 1), up to float16 rounding."""
        d, sid = self.read(i), f"{int(self.index['sid'][i]):016x}"
        where = f"{self.path}: sample {sid}"
        n_pos = int(self.index["n_pos"][i])
        if int(d.valid.sum()) != n_pos or d.offsets[-1] != len(d.ids):
            raise CacheError(f"{where}: block does not decode (positions or lengths inconsistent)")
        if len(d.ids) and d.ids.max() >= self.vocab:
            raise CacheError(f"{where}: block does not decode (class id {int(d.ids.max())} >= V={self.vocab})")
        lens = np.diff(d.offsets)
        row = np.repeat(np.arange(n_pos), lens)
        if d.counts is not None:
            check_counts(where, d.ids, d.counts, lens, row, self.layout.n_draws)
        else:
            assert d.probs is not None
            check_probs(where, d.probs, d.tail, row, n_pos, form)


def check_counts(where: str, ids, counts, lens, row, n_draws: int) -> None:
    if len(lens) and (lens.min() < 1 or counts.min() < 1):
        raise CacheError(f"{where}: block does not decode (empty position, or a count < 1)")
    if np.any(np.bincount(row, weights=counts, minlength=len(lens)) != n_draws):
        raise CacheError(f"{where}: counts do not sum to n_draws={n_draws}")
    if np.any((row[1:] == row[:-1]) & (ids[1:] <= ids[:-1])):
        raise CacheError(f"{where}: ids not ascending within a position")


def check_probs(where: str, probs, tail, row, n_pos: int, form: str | None) -> None:
    for name, v in (("probability", probs), ("tail mass", tail)):
        if v is not None and len(v) and not (np.isfinite(v).all() and v.min() >= 0 and v.max() <= 1):
            raise CacheError(f"{where}: a {name} outside [0, 1] ({float(np.nanmax(np.abs(v)))})")
    total = np.bincount(row, weights=probs, minlength=n_pos) + (tail if tail is not None else 0)
    lens = np.bincount(row, minlength=n_pos)
    slack = SUM_SLACK + (lens + 1) * 2.0**-25  # float16 rounds a value below 2^-14 to within 2^-25 absolute
    if n_pos and np.any(total > 1 + slack):
        raise CacheError(f"{where}: a position's probabilities sum to {total.max():.6f} > 1")
    held = lens > 0 if tail is None else np.ones(n_pos, bool)
    if form in SUMS_TO_ONE and np.any(held & (total < 1 - slack)):
        raise CacheError(f"{where}: a position's probabilities sum to {total[held].min():.6f}, not 1 (form {form})")


def manifest_checksum(man: dict[str, Any]) -> str:
    """sha256 of the manifest without its `checksum` key, as canonical JSON (sorted keys, no spaces)."""
    body = {k: v for k, v in man.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def write_manifest(root: Path, man: dict[str, Any]) -> dict[str, Any]:
    """Seal the manifest with its checksum and write it atomically; returns it as written."""
    from sekd.core.files import atomic_write_json

    man = json.loads(json.dumps({k: v for k, v in man.items() if k != "checksum"}))  # as it will read back
    man["checksum"] = manifest_checksum(man)
    atomic_write_json(Path(root) / MANIFEST, man)
    return man


def read_manifest(path: Path) -> dict[str, Any]:
    """manifest.json of a cache folder; one-line CacheError when it is missing, unreadable, of another
    format, or edited after it was written (its checksum no longer matches)."""
    mpath = Path(path) / MANIFEST
    if not mpath.exists():
        raise CacheError(f"{mpath}: no cache manifest (build one with `sekd-cache build`)")
    try:
        man = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CacheError(f"{mpath}: unreadable manifest ({type(e).__name__})") from None
    if not isinstance(man, dict) or man.get("format") != FORMAT:
        found = man.get("format") if isinstance(man, dict) else type(man).__name__
        raise CacheError(
            f"{mpath}: manifest format {found!r}, this sekd reads {FORMAT} (rebuild the cache with `sekd-cache build`)"
        )
    digest = manifest_checksum(man)
    if man.get("checksum") != digest:
        raise CacheError(
            f"{mpath}: manifest checksum mismatch: sha256 {digest[:16]}..., the manifest records "
            f"{str(man.get('checksum'))[:16]}... (edited after it was written; rebuild the cache)"
        )
    return man


# why a field differs, for the refusal's one line
HINTS = {
    "data": " (the cache was built on other data: build it with the run's data settings)",
    "seed": " (the draws follow the run's seed: build one cache per seed)",
    "kind": " (the cache holds another class sampler's targets: build one for the run's classes)",
}


def check_signature(mpath: Path, found: dict[str, Any], expect: dict[str, Any]) -> None:
    """Every key of `expect` must equal the cache's; the first that differs is named (the kind first)."""
    for key in sorted(expect, key=lambda k: (k != "kind", k)):
        if key not in found or found[key] != expect[key]:
            raise CacheError(
                f"{mpath}: signature mismatch: {key} expected {expect[key]!r}, "
                f"found {found.get(key, '<missing>')!r}{HINTS.get(key, '')}"
            )


class TeacherCache:
    """A finished cache, opened for reading: RS-KD targets by sample id, with every check on the way."""

    def __init__(self, root: Path, manifest: dict[str, Any], lazy_checksums: bool):
        self.root = root
        self.manifest = manifest
        self.signature: dict[str, Any] = manifest["signature"]
        self.num_shards: int = self.signature["num_shards"]
        self.entries = {e["index"]: e for e in manifest["shards"]}
        self.lazy_checksums = lazy_checksums
        self._shards: dict[int, Shard] = {}
        self.bytes_read = 0

    @classmethod
    def open(
        cls,
        path: str | Path,
        expect: dict[str, Any] | None = None,
        *,
        sample_ids: list[str] | None = None,
        verify: bool = False,
        lazy_checksums: bool = True,
    ) -> "TeacherCache":
        """Load the manifest; refuse (CacheError, one line) on a signature mismatch, a missing or truncated
        shard, or (with `sample_ids`) a missing sample. `verify` checks every checksum now; otherwise
        each shard's checksum is checked the first time it is read (`lazy_checksums`)."""
        root = Path(path)
        if root.name == MANIFEST:
            root = root.parent
        man = read_manifest(root)
        check_signature(root / MANIFEST, man["signature"], expect or {})
        cache = cls(root, man, lazy_checksums)
        for i in range(cache.num_shards):  # cheap: a stat per shard
            shard_path = root / shard_name(i, cache.num_shards)
            entry = cache.entries.get(i)
            if entry is None:
                raise CacheError(
                    f"{shard_path}: missing shard (not in {MANIFEST}; the build did not finish: "
                    f"run `sekd-cache build` again to resume)"
                )
            if not shard_path.exists():
                raise CacheError(f"{shard_path}: missing shard file (listed in {MANIFEST})")
            size = shard_path.stat().st_size
            if size != entry["bytes"]:
                kind = "truncated" if size < entry["bytes"] else "wrong size"
                raise CacheError(f"{shard_path}: {kind}: {size} bytes, {MANIFEST} says {entry['bytes']}")
        if verify:
            cache.verify()
        if sample_ids is not None:
            for sid in sample_ids:
                cache.locate(sid)
        return cache

    @property
    def n_draws(self) -> int | None:
        """N of a counts (rs_kd) cache, else None."""
        return self.signature.get("n_draws") if self.layout.records == "counts" else None

    @property
    def layout(self) -> Layout:
        return Layout.of(self.signature)

    @property
    def form(self) -> str:
        return str(self.signature.get("form", "draws"))

    def kind_label(self) -> str:
        """`top_k_tail(top=20)`: the sampler and its options, as the signature records them."""
        opts = ", ".join(f"{k}={v}" for k, v in sorted(self.signature.items()) if k not in BASE_KEYS)
        return f"{self.signature.get('kind', 'rs_kd')}({opts})"

    def shard(self, i: int) -> Shard:
        if i not in self._shards:
            path = self.root / shard_name(i, self.num_shards)
            if self.lazy_checksums:
                self.check_checksum(i)
            self._shards[i] = Shard(path, self.signature)
        return self._shards[i]

    def check_checksum(self, i: int) -> None:
        path = self.root / shard_name(i, self.num_shards)
        digest = file_sha256(path)
        if digest != self.entries[i]["sha256"]:
            raise CacheError(
                f"{path}: checksum mismatch: sha256 {digest[:16]}..., {MANIFEST} says {self.entries[i]['sha256'][:16]}..."
            )

    def verify(self) -> None:
        """Every shard: checksum, header, index and every block decodable; then the signature's data and
        sample count against the ids the shards hold. Raises CacheError on the first failure."""
        ids: list[str] = []
        for i in range(self.num_shards):
            self.check_checksum(i)
            shard = self._shards.get(i) or Shard(self.root / shard_name(i, self.num_shards), self.signature)
            self._shards[i] = shard
            entry = self.entries[i]
            found = (len(shard), int(shard.index["n_pos"].sum()), int(shard.index["n_rec"].sum()))
            if found != (entry["samples"], entry["positions"], entry["records"]):
                raise CacheError(
                    f"{shard.path}: holds (samples, positions, records) {found}, "
                    f"{MANIFEST} says {(entry['samples'], entry['positions'], entry['records'])}"
                )
            for j in range(len(shard)):
                shard.check_block(j, self.form)
            ids += shard.sample_ids()
        mpath = self.root / MANIFEST
        if self.signature.get("format") != FORMAT:
            raise CacheError(f"{mpath}: signature format {self.signature.get('format')!r}, this sekd reads {FORMAT}")
        if data_signature(ids) != self.signature.get("data"):
            raise CacheError(
                f"{mpath}: signature data {self.signature.get('data')!r} is not the shards' samples "
                f"(their data signature is {data_signature(ids)!r})"
            )
        if len(ids) != self.manifest.get("samples"):
            raise CacheError(
                f"{mpath}: the shards hold {len(ids)} samples, the manifest says {self.manifest.get('samples')}"
            )

    def locate(self, sample_id: str) -> tuple[Shard, int]:
        s = shard_of(sample_id, self.num_shards)
        shard = self.shard(s)
        j = shard.find(sample_id)
        if j is None:
            raise CacheError(f"{shard.path}: missing entry for sample {sample_id} (the cache was built on other data)")
        return shard, j

    def __contains__(self, sample_id: str) -> bool:
        s = shard_of(sample_id, self.num_shards)
        return self.shard(s).find(sample_id) is not None

    def read(self, sample_id: str) -> SampleDraws:
        """One sample's draws; counts its bytes in `bytes_read`."""
        shard, j = self.locate(sample_id)
        d = shard.read(j)
        self.bytes_read += d.nbytes
        return d

    def targets(self, sample_ids: list[str], labels: Tensor) -> SparseTarget:
        """p~ at the valid positions (labels != -100) of the batch, row-major over [B,T], as the class
        sampler gives it: ids/probs/mask [P,K] (CPU), the tail [P] of a tail form, the cache's form.
        Probabilities stored in float16 are renormalized where the form is a distribution."""
        import torch  # here, so verify / ls / stats start without torch

        from sekd.selection.classes import SparseTarget
        from sekd.selection.draws import to_sparse

        if len(sample_ids) != labels.shape[0]:
            raise ValueError(f"{len(sample_ids)} sample ids for {labels.shape[0]} rows of labels")
        valid = (labels != IGNORE).cpu().numpy()  # [B,T]
        parts = [self._checked(sid, valid[b]) for b, sid in enumerate(sample_ids)]

        def cat(get, dtype) -> Tensor:
            return torch.from_numpy(np.concatenate([get(d) for d in parts]) if parts else np.zeros(0, dtype))

        lens = cat(lambda d: np.diff(d.offsets), np.int64)
        offsets = torch.zeros(len(lens) + 1, dtype=torch.long)
        offsets[1:] = lens.cumsum(0)
        if self.layout.records == "counts":
            ids, probs, mask = to_sparse(
                cat(lambda d: d.ids, np.int64), cat(lambda d: d.counts, np.int64), offsets, self.n_draws or 1
            )
            return SparseTarget(ids, probs, mask, None, self.form)
        # probabilities are padded as the counts of a single draw would be
        ids, probs, mask = to_sparse(cat(lambda d: d.ids, np.int64), cat(lambda d: d.probs, np.float32), offsets, 1)
        tail = cat(lambda d: d.tail, np.float32) if self.layout.tail else None
        if self.form in SUMS_TO_ONE:
            total = probs.sum(-1) + (tail if tail is not None else 0)  # [P]
            scale = torch.where(total > 0, 1 / total, torch.ones_like(total))
            probs, tail = probs * scale[:, None], (tail * scale if tail is not None else None)
        return SparseTarget(ids, probs, mask, tail, self.form)

    def _checked(self, sid: str, valid: np.ndarray) -> SampleDraws:
        """The sample's records, refused when its valid positions are not the batch's."""
        d = self.read(sid)
        if d.valid.shape != valid.shape or not np.array_equal(d.valid, valid):
            raise CacheError(
                f"{self.locate(sid)[0].path}: sample {sid}: cached valid positions differ from the "
                f"batch's labels != -100 ({int(d.valid.sum())} cached, {int(valid.sum())} in the batch)"
            )
        return d

    def stats(self) -> dict[str, Any]:
        """Totals from the manifest: positions, records, bytes; bytes and distinct classes per position."""
        sig = self.signature
        samples = sum(e["samples"] for e in self.entries.values())
        positions = sum(e["positions"] for e in self.entries.values())
        records = sum(e["records"] for e in self.entries.values())
        nbytes = sum(e["bytes"] for e in self.entries.values())
        lay = self.layout
        per = max(positions, 1)
        payload = records * lay.record_bytes + positions * TAIL.itemsize * lay.tail
        return {
            "kind": self.kind_label(),
            "form": self.form,
            "samples": samples,
            "positions": positions,
            "records": records,
            "bytes": nbytes,
            "bytes_per_record": lay.record_bytes,
            "bytes_per_position": nbytes / per,  # whole shard files: records + lens + valid bits + index
            "record_bytes_per_position": payload / per,  # the records alone (and a tail form's tail mass)
            "distinct_per_position": records / per,
            "n_draws": self.n_draws,
            "vocab_size": sig["vocab_size"],
        }


# ---------------------------------------------------------------- storage accounting (paper Table 6)

# The paper's Table 6 at |V| = 100K, 100B tokens, in TB (1e12 bytes).
PAPER_TABLE6_TB = {"full": 10_000.0, "rs_kd_12": 3.6, "rs_kd_64": 19.2, "sekd3x_12": 0.72, "sekd3x_64": 3.84, "ce": 0.3}


def storage_rows(
    vocab_size: int, *, tokens: float = 100e9, sample_fraction: float = 0.2, measured: dict[str, Any] | None = None
) -> list[dict[str, Any]]:
    """Bytes per position and TB for `tokens` tokens, per storage scheme (paper Table 6 layout).

    Full KD: |V| float16 = 2|V| B; RS-KD: 3 B per sampled class x U; SE-KD3X: RS-KD x l (sample
    fraction); Vanilla CE: one 3-byte id; this cache: measured (distinct draws only).
    """
    rows = [
        ("full", f"Full KD (V={vocab_size:,} classes, float16)", 2.0 * vocab_size),  # no "|": it splits a cell
        ("rs_kd_12", "RS-KD (U=12)", 3.0 * 12),
        ("rs_kd_64", "RS-KD (U=64)", 3.0 * 64),
        ("sekd3x_12", f"SE-KD3X (U=12, l={sample_fraction:.0%})", 3.0 * 12 * sample_fraction),
        ("sekd3x_64", f"SE-KD3X (U=64, l={sample_fraction:.0%})", 3.0 * 64 * sample_fraction),
        ("ce", "Vanilla CE (token id)", 3.0),
    ]
    if measured is not None:
        rows.append(
            (
                "measured_records",
                f"this cache, records only (measured, {measured.get('kind', 'rs_kd')})",
                measured["record_bytes_per_position"],
            )
        )
        files = f"this cache, whole files (measured, {measured.get('kind', 'rs_kd')})"
        rows.append(("measured_files", files, measured["bytes_per_position"]))
    return [{"key": k, "method": name, "bytes_per_position": bpp, "tb": bpp * tokens / 1e12} for k, name, bpp in rows]


def storage_markdown(rows: list[dict[str, Any]], tokens: float = 100e9) -> str:
    """A markdown table: method | bytes/position | TB for `tokens` tokens."""
    head = f"| Storage | bytes / position | TB for {tokens / 1e9:g}B tokens |"
    lines = [head, "|---|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['bytes_per_position']:,.2f} | {r['tb']:,.2f} |")
    return "\n".join(lines)
