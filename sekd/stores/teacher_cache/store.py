"""The cache on disk (docs/method.md §9, with its files' byte layout): a manifest plus shard files, and the
reader the trainer uses.

`manifest.json` holds the signature, num_shards, one entry per finished shard (sha256, bytes, counts) and a
`checksum` over the rest; `shard-<i>-of-<S>.bin` holds the samples with int(sample_id, 16) % S == i: a
header, an index by sample id, and one block per sample (its valid mask, the distinct classes at each valid
position, their records of format.py). A shard is keyed by content (sample id), never by batch, step or
position in the dataset (docs/method.md §13).
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

FORMAT = 2  # bump when the manifest or shard layout changes (2: the manifest carries its own checksum)
MAGIC = b"SEKDRSKD"
HEADER = struct.Struct("<8sHHIIIII")  # 32 bytes
INDEX = np.dtype([("sid", "<u8"), ("offset", "<u8"), ("nbytes", "<u8"), ("n_pos", "<u4"), ("n_rec", "<u4")])
MANIFEST = "manifest.json"


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


def lens_dtype(n_draws: int) -> np.dtype:
    """Distinct classes per position <= n_draws: one byte while N <= 255."""
    return np.dtype("u1") if n_draws <= 255 else np.dtype("<u2")


def valid_bytes(seq_len: int) -> int:
    return (seq_len + 7) // 8


# ---------------------------------------------------------------- writing


def encode_block(valid: np.ndarray, ids, counts, offsets, n_draws: int, vocab_size: int) -> tuple[bytes, int, int]:
    """One sample's block: valid [L] bool, flat draws of its valid positions -> (bytes, n_pos, n_rec)."""
    offsets = np.asarray(offsets, dtype=np.int64)
    lens = np.diff(offsets)
    if len(lens) != int(valid.sum()):
        raise ValueError(f"{len(lens)} positions of draws for {int(valid.sum())} valid positions")
    body = (
        np.packbits(valid.astype(bool), bitorder="little").tobytes()
        + lens.astype(lens_dtype(n_draws)).tobytes()
        + fmt.pack(ids, counts, n_draws, vocab_size)
    )
    return body, len(lens), int(offsets[-1])


def encode_shard(blocks: list[tuple[str, bytes, int, int]], *, n_draws: int, seq_len: int, vocab_size: int) -> bytes:
    """(sample_id, block, n_pos, n_rec) per sample, any order -> the shard file's bytes (samples sorted by id)."""
    blocks = sorted(blocks, key=lambda b: sid_int(b[0]))
    index = np.zeros(len(blocks), dtype=INDEX)
    offset = HEADER.size + INDEX.itemsize * len(blocks)
    for i, (sid, body, n_pos, n_rec) in enumerate(blocks):
        index[i] = (sid_int(sid), offset, len(body), n_pos, n_rec)
        offset += len(body)
    header = HEADER.pack(
        MAGIC, FORMAT, int(fmt.is_wide(vocab_size, n_draws)), n_draws, seq_len, len(blocks), vocab_size, 0
    )
    return b"".join([header, index.tobytes(), *(b[1] for b in blocks)])


# ---------------------------------------------------------------- reading


@dataclass
class SampleDraws:
    """One sample's cached draws: valid [L] bool, ids/counts [R] int64, offsets [n_pos+1] int64."""

    valid: np.ndarray
    ids: np.ndarray
    counts: np.ndarray
    offsets: np.ndarray
    nbytes: int


class Shard:
    """A shard file, memory-mapped; its index parsed and checked against the file's size."""

    def __init__(self, path: Path, sig: dict[str, Any]):
        self.path = path
        with open(path, "rb") as f:
            size = f.seek(0, 2)
            self.buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
        if size < HEADER.size:
            raise CacheError(f"{path}: truncated: {size} bytes, shorter than the {HEADER.size}-byte header")
        magic, version, wide, n_draws, seq_len, n, vocab, _ = HEADER.unpack_from(self.buf, 0)
        if magic != MAGIC:
            raise CacheError(f"{path}: not a sekd cache shard (magic {magic!r})")
        if version != FORMAT:
            raise CacheError(f"{path}: shard format {version}, this sekd reads {FORMAT}")
        for key, found in (("n_draws", n_draws), ("seq_len", seq_len), ("vocab_size", vocab)):
            if sig.get(key) != found:
                raise CacheError(f"{path}: header {key}={found} disagrees with the manifest's {sig.get(key)}")
        self.wide, self.n_draws, self.seq_len, self.vocab = bool(wide), n_draws, seq_len, vocab
        if self.wide != fmt.is_wide(vocab, n_draws):
            raise CacheError(f"{path}: header record kind wide={self.wide} is wrong for V={vocab}, N={n_draws}")
        end_index = HEADER.size + INDEX.itemsize * n
        if size < end_index:
            raise CacheError(f"{path}: truncated: {size} bytes, the index of {n} samples ends at {end_index}")
        self.index = np.frombuffer(self.buf, dtype=INDEX, count=n, offset=HEADER.size)
        self.rec = fmt.WIDE.itemsize if self.wide else fmt.NARROW_BYTES
        self.lens_dtype = lens_dtype(n_draws)
        expect = (
            valid_bytes(seq_len)
            + self.index["n_pos"].astype(np.int64) * self.lens_dtype.itemsize
            + self.index["n_rec"].astype(np.int64) * self.rec
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
        rec_off = off + vb + n_pos * self.lens_dtype.itemsize
        ids, counts = fmt.unpack(memoryview(self.buf)[rec_off : rec_off + n_rec * self.rec], n_rec, self.wide)
        offsets = np.zeros(n_pos + 1, dtype=np.int64)
        np.cumsum(lens, out=offsets[1:])
        return SampleDraws(valid, ids, counts, offsets, nbytes)

    def check_block(self, i: int) -> None:
        """Decodable: valid bits match n_pos, lens sum to n_rec, ids in [0,V) ascending per position, counts sum to N."""
        d, sid = self.read(i), f"{int(self.index['sid'][i]):016x}"
        n_pos = int(self.index["n_pos"][i])
        if int(d.valid.sum()) != n_pos or d.offsets[-1] != len(d.ids):
            raise CacheError(f"{self.path}: sample {sid}: block does not decode (positions or lengths inconsistent)")
        lens = np.diff(d.offsets)
        if n_pos and (lens.min() < 1 or d.ids.max() >= self.vocab or d.counts.min() < 1):
            raise CacheError(
                f"{self.path}: sample {sid}: block does not decode (empty position, id or count out of range)"
            )
        row = np.repeat(np.arange(n_pos), lens)
        if np.any(np.bincount(row, weights=d.counts, minlength=n_pos) != self.n_draws):
            raise CacheError(f"{self.path}: sample {sid}: counts do not sum to n_draws={self.n_draws}")
        same_row = row[1:] == row[:-1]
        if np.any(same_row & (d.ids[1:] <= d.ids[:-1])):
            raise CacheError(f"{self.path}: sample {sid}: ids not ascending within a position")


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
}


def check_signature(mpath: Path, found: dict[str, Any], expect: dict[str, Any]) -> None:
    """Every key of `expect` must equal the cache's; the first that differs is named."""
    for key in sorted(expect):
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
    def n_draws(self) -> int:
        return self.signature["n_draws"]

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
                shard.check_block(j)
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

    def targets(self, sample_ids: list[str], labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """p~ at the valid positions (labels != -100) of the batch, row-major over [B,T].
        -> ids_pad [P,K] long, probs_pad [P,K] float32, mask [P,K] bool (CPU), P = valid positions."""
        import torch  # here, so verify / ls / stats start without torch

        from sekd.selection.draws import to_sparse

        if len(sample_ids) != labels.shape[0]:
            raise ValueError(f"{len(sample_ids)} sample ids for {labels.shape[0]} rows of labels")
        valid = (labels != IGNORE).cpu().numpy()  # [B,T]
        lens, ids, counts = [], [], []
        for b, sid in enumerate(sample_ids):
            d = self.read(sid)
            if d.valid.shape != valid[b].shape or not np.array_equal(d.valid, valid[b]):
                raise CacheError(
                    f"{self.locate(sid)[0].path}: sample {sid}: cached valid positions differ from the "
                    f"batch's labels != -100 ({int(d.valid.sum())} cached, {int(valid[b].sum())} in the batch)"
                )
            lens.append(np.diff(d.offsets))
            ids.append(d.ids)
            counts.append(d.counts)
        lens_all = torch.from_numpy(np.concatenate(lens) if lens else np.zeros(0, np.int64))
        offsets = torch.zeros(len(lens_all) + 1, dtype=torch.long)
        offsets[1:] = lens_all.cumsum(0)
        return to_sparse(
            torch.from_numpy(np.concatenate(ids) if ids else np.zeros(0, np.int64)),
            torch.from_numpy(np.concatenate(counts) if counts else np.zeros(0, np.int64)),
            offsets,
            self.n_draws,
        )

    def stats(self) -> dict[str, Any]:
        """Totals from the manifest: positions, records, bytes; bytes and distinct classes per position."""
        sig = self.signature
        samples = sum(e["samples"] for e in self.entries.values())
        positions = sum(e["positions"] for e in self.entries.values())
        records = sum(e["records"] for e in self.entries.values())
        nbytes = sum(e["bytes"] for e in self.entries.values())
        rec = fmt.bytes_per_record(sig["vocab_size"], sig["n_draws"])
        per = max(positions, 1)
        return {
            "samples": samples,
            "positions": positions,
            "records": records,
            "bytes": nbytes,
            "bytes_per_record": rec,
            "bytes_per_position": nbytes / per,  # whole shard files: records + lens + valid bits + index
            "record_bytes_per_position": records * rec / per,  # the draws alone
            "distinct_per_position": records / per,
            "n_draws": sig["n_draws"],
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
                f"this cache, records only (measured, N={measured['n_draws']})",
                measured["record_bytes_per_position"],
            )
        )
        rows.append(("measured_files", "this cache, whole files (measured)", measured["bytes_per_position"]))
    return [{"key": k, "method": name, "bytes_per_position": bpp, "tb": bpp * tokens / 1e12} for k, name, bpp in rows]


def storage_markdown(rows: list[dict[str, Any]], tokens: float = 100e9) -> str:
    """A markdown table: method | bytes/position | TB for `tokens` tokens."""
    head = f"| Storage | bytes / position | TB for {tokens / 1e9:g}B tokens |"
    lines = [head, "|---|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['bytes_per_position']:,.2f} | {r['tb']:,.2f} |")
    return "\n".join(lines)
