"""Text sources by short name: each yields the document strings of one split (train/validation/test).

Options come from the `data` config group; errors name the config key (`data.train_file`) or the
file and line, in one line. `check_source` validates options and reads local files through, before
any model loads or anything downloads.
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from sekd.core.registry import Registry

Source = Callable[..., Iterable[str]]  # (split, **options) -> the split's documents
SOURCES: Registry[Source] = Registry("data source")  # (split, **options) -> documents
SPLITS = ("train", "validation", "test")
FINEWEB_EDU = "HuggingFaceFW/fineweb-edu"


class DataError(ValueError):
    """A data option or input file that cannot work; the message names the key or file:line."""


def data_source(name: str, options: type | None = None) -> Callable[[Source], Source]:
    """Register `fn(split, **options)`, yielding the document strings of one split, as the data source
    `name` (`data.name=<name>`; the data group's other keys are its options, checked against its signature
    or the `options` dataclass)."""
    return SOURCES.register(name, options=options)


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; known: {', '.join(SPLITS)}")


@data_source("embedded")
def embedded(split: str) -> Iterator[str]:
    """Python's own pydoc prose, split by document (sekd.data.corpus)."""
    from sekd.data import corpus

    _check_split(split)
    yield from corpus.load_split(split)


@data_source("jsonl")
def jsonl(
    split: str,
    *,
    train_file: str | None = None,
    validation_file: str | None = None,
    test_file: str | None = None,
    text_field: str = "text",
) -> Iterator[str]:
    """One document per JSON line, its text under `text_field`; one file per split."""
    _check_split(split)
    path = _jsonl_file(split, {"train_file": train_file, "validation_file": validation_file, "test_file": test_file})
    for record in jsonl_records(path, (text_field,), hint=" (data.text_field)"):
        yield record[text_field]


def jsonl_records(path: Path, fields: tuple[str, ...], hint: str = "") -> Iterator[dict[str, Any]]:
    """The JSON objects of a JSON-lines file (blank lines skipped), each checked to hold every one of
    `fields` as a string; a bad line (not UTF-8, not JSON, a missing or non-string field) or a file
    without any record raises DataError naming file:line."""
    n = 0
    with open(path, "rb") as f:  # bytes, so a non-UTF-8 line is reported with its number
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                where = f"byte 0x{raw[e.start]:02x} at column {e.start + 1}"
                raise DataError(f"{path}:{lineno}: not UTF-8 ({where})") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(record, dict):
                raise DataError(f"{path}:{lineno}: record is {type(record).__name__}, not an object")
            for field in fields:
                if field not in record:
                    raise DataError(f"{path}:{lineno}: record has no field {field!r}{hint}")
                if not isinstance(record[field], str):
                    raise DataError(f"{path}:{lineno}: field {field!r} is {type(record[field]).__name__}, not a string")
            n += 1
            yield record
    if not n:
        raise DataError(f"{path}: holds no records (the file is empty or blank)")


def check_jsonl_file(path: Path, fields: tuple[str, ...], hint: str = "") -> None:
    """Read every record of `path` now (validation), so a bad line stops the run before any model
    loads; remembered per file size and mtime, so a sweep's cells read each file once."""
    st = Path(path).stat()
    _checked_jsonl(str(Path(path).resolve()), st.st_size, st.st_mtime_ns, tuple(fields), hint, str(path))


@functools.lru_cache(maxsize=64)
def _checked_jsonl(resolved: str, size: int, mtime_ns: int, fields: tuple[str, ...], hint: str, shown: str) -> None:
    for _ in jsonl_records(Path(shown), fields, hint):
        pass


def _jsonl_file(
    split: str, files: dict[str, str | None], why: str = "the jsonl source needs it for the {split} split"
) -> Path:
    """The existing file `data.<split>_file` names; `why` completes the error when it is unset."""
    key = f"{split}_file"
    name = files.get(key)
    if not name:
        raise DataError(f"data.{key} is not set; {why.format(split=split)}")
    path = Path(name).expanduser()
    if not path.is_file():
        raise DataError(f"data.{key}: no such file {str(path)!r}")
    return path


@data_source("fineweb_edu")
def fineweb_edu(
    split: str,
    *,
    path: str = FINEWEB_EDU,
    subset: str | None = "sample-10BT",
    text_field: str = "text",
    heldout_fraction: float = 0.001,
) -> Iterator[str]:
    """FineWeb-Edu, streamed; validation/test are carved off train by a hash of each document's id."""
    import datasets

    _check_split(split)
    ds = datasets.load_dataset(path, name=_config_name(path, subset), split="train", streaming=True)
    columns = ds.column_names
    if columns is not None and text_field not in columns:
        raise DataError(f"data.text_field: {path} has no column {text_field!r}; columns: {', '.join(columns)}")
    for record in ds:
        text = record[text_field]
        if heldout_split(record.get("id") or text, heldout_fraction) == split:
            yield text


def _config_name(path: str, subset: str | None) -> str | None:
    """The hub's subset name; a plain local folder of parquet shards has only 'default', so use that."""
    if subset is None or not Path(path).expanduser().is_dir():
        return subset
    import datasets

    names = datasets.get_dataset_config_names(str(Path(path).expanduser()))
    if subset in names:
        return subset  # a local mirror of the hub repo, README configs included
    if names == ["default"]:
        return None
    raise DataError(f"data.subset: {subset!r} is not a config of {path}; known: {', '.join(names)}")


def heldout_split(key: str, fraction: float) -> str:
    """train, or validation/test for the first/second half of a `fraction` of hash space."""
    # a content hash, not stream position, so the split does not depend on shard order or budget
    x = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64  # uniform in [0,1)
    if x >= fraction:
        return "train"
    return "validation" if x < fraction / 2 else "test"


def check_source(name: str, opts: dict[str, Any], key: str = "data") -> None:
    """Validate a source's options: unknown names, unknown keys, missing or malformed local files
    (every line of a jsonl file is read; nothing is downloaded)."""
    SOURCES.check_kwargs(name, opts, key=key)  # also raises, listing known sources, on a bad name
    if name == "jsonl":
        files = {k: opts.get(k) for k in ("train_file", "validation_file", "test_file")}
        field = str(opts.get("text_field", "text"))
        for split in SPLITS:  # the train file is required; every file given is read through
            if split == "train" or files[f"{split}_file"]:
                check_jsonl_file(_jsonl_file(split, files), (field,), hint=f" ({key}.text_field)")
    if name == "fineweb_edu":
        frac = opts.get("heldout_fraction", 0.001)
        if not 0 < frac < 1:
            raise DataError(f"{key}.heldout_fraction must be in (0, 1), got {frac!r}")
        path = str(opts.get("path", FINEWEB_EDU))
        looks_local = path.startswith(("/", ".", "~")) or Path(path).expanduser().exists()
        if looks_local and not Path(path).expanduser().is_dir():
            raise DataError(f"{key}.path: no such folder {path!r}")


def source_signature(name: str, split: str, opts: dict[str, Any]) -> dict[str, Any]:
    """What identifies the source's content for caches: corpus hash, file size+mtime, or hub name."""
    if name == "embedded":
        # this split's documents only (corpus.signature() hashes all of them, and takes ~1 s)
        h = hashlib.sha256()
        for text in embedded(split):
            h.update(hashlib.sha256(text.encode()).digest())
        return {"corpus": h.hexdigest()[:16]}
    if name == "jsonl":
        return {"file": _file_sig(_jsonl_file(split, opts))}
    if name == "fineweb_edu":
        path = Path(str(opts.get("path", FINEWEB_EDU))).expanduser()
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
            return {"folder": str(path.resolve()), "files": [_file_sig(p) for p in files]}
        return {"hub": str(opts.get("path", FINEWEB_EDU)), "subset": opts.get("subset", "sample-10BT")}
    # a new source must say what its content is, or its caches would go stale silently
    raise DataError(f"data source {name!r} has no cache signature; add one to source_signature")


def _file_sig(p: Path) -> list:
    st = p.stat()
    return [str(p.resolve()), st.st_size, st.st_mtime_ns]
