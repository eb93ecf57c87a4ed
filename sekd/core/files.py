"""Atomic writes: a reader sees the old file or the new one, never half of either.

A write that fails (a full disk, a read-only or removed folder) leaves the old file as it was and no
temporary file, and raises an OSError naming the file it was writing (`storage_error`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import tempfile
from pathlib import Path
from typing import IO, Any, Iterator, cast

import numpy as np

_UMASK = os.umask(0)
os.umask(_UMASK)
FILE_MODE = 0o666 & ~_UMASK  # what open() would have given; mkstemp makes 0600


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, Path):
        return str(x)
    return x


# What the storage under a run can do to a write: full (or over quota), read-only, not ours, or removed.
STORAGE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOENT)


def storage_error(err: BaseException, path: Path | str | None = None) -> OSError | None:
    """The storage fault behind `err`, as an OSError naming `path` (the file being written, not its temporary
    sibling), else the file `err` names; None when `err` is no storage fault. safetensors (a model's weights)
    reports an OS error as text."""
    if isinstance(err, OSError) and err.errno in STORAGE_ERRNOS:
        named = path if path is not None else err.filename
        return OSError(err.errno, err.strerror or os.strerror(err.errno), None if named is None else str(named))
    found = re.search(r"\(os error (\d+)\)", str(err)) if type(err).__name__ == "SafetensorError" else None
    if found and int(found.group(1)) in STORAGE_ERRNOS:
        code = int(found.group(1))
        return OSError(code, os.strerror(code), None if path is None else str(path))
    return None


def _mkstemp(path: Path, parents: bool = True) -> tuple[int, str]:
    """A temporary sibling of `path`, its folder made first (`parents`); a failure names `path`."""
    try:
        if parents:
            path.parent.mkdir(parents=True, exist_ok=True)
        return tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as err:
        _reraise_named(err, path)
        raise


def _reraise_named(err: BaseException, path: Path) -> None:
    """Raise the storage fault behind `err` naming `path`; return when `err` is none (the caller re-raises)."""
    fault = storage_error(err, path) if isinstance(err, OSError) else None
    if fault is not None:
        raise fault from err


def _drop_tmp(tmp: str) -> None:
    with contextlib.suppress(OSError):  # its folder may be read-only or gone by now
        Path(tmp).unlink(missing_ok=True)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    fd, tmp = _mkstemp(path)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException as err:
        _drop_tmp(tmp)  # the old file stays whole
        _reraise_named(err, path)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(_jsonable(obj), indent=2, sort_keys=True, default=str) + "\n")


class _Kept:
    """A file for torch.save that keeps the OSError of a failed write: torch's C++ writer would turn it into
    a RuntimeError that names neither the file nor the cause."""

    def __init__(self, f: Any):
        self.f = f
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        try:
            return self.f.write(data)
        except OSError as err:
            self.error = self.error or err
            raise

    def flush(self) -> None:
        self.f.flush()


def atomic_torch_save(path: Path, obj: Any, parents: bool = True) -> None:
    """`parents=False`: a folder removed meanwhile is an error (ENOENT), not one to make again."""
    import torch

    path = Path(path)
    fd, tmp = _mkstemp(path, parents)
    try:
        with os.fdopen(fd, "wb") as f:
            out = _Kept(f)
            try:
                torch.save(obj, cast(IO[bytes], out))  # torch calls only write and flush
            except RuntimeError:  # torch's zip writer reports a failed write as "unexpected pos ..."
                if out.error is None:
                    raise
                raise out.error from None
            f.flush()
            os.fsync(f.fileno())  # a crash of the machine must not leave a renamed but empty checkpoint
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException as err:
        _drop_tmp(tmp)  # the old file stays whole
        _reraise_named(err, path)
        raise


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary sibling of `path` for a writer that takes a file name (a profiler's trace, ...): renamed to
    `path` when the block ends without an error, removed otherwise."""
    path = Path(path)
    fd, tmp = _mkstemp(path)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException as err:
        _drop_tmp(tmp)  # the old file stays whole
        _reraise_named(err, path)
        raise


def append_lines(path: Path, text: str) -> None:
    """Append whole lines to `path`, or nothing: a write the disk cut short is cut back off, so no half
    line is read as a whole one (and a reader keeps only lines that end in a newline anyway)."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, FILE_MODE)
    except OSError as err:
        _reraise_named(err, path)
        raise
    try:
        start = os.lseek(fd, 0, os.SEEK_END)
        rest = memoryview(text.encode())
        while rest:  # unbuffered: a short write is seen here, not at close
            rest = rest[os.write(fd, rest) :]
    except OSError as err:
        with contextlib.suppress(OSError):
            os.ftruncate(fd, start)
        _reraise_named(err, path)
        raise
    finally:
        os.close(fd)


def sweep_tmp(folder: Path) -> list[Path]:
    """Delete the temporary files a killed writer left in `folder` (the `.<name>.<random>.tmp` of the
    atomic writes above). Call it only while no one else writes there (e.g. under the folder's lock)."""
    stale = [p for p in Path(folder).glob(".*.tmp") if p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


@contextlib.contextmanager
def folder_lock(path: Path) -> Iterator[None]:
    """An exclusive lock (flock) on the file `path`, which is deleted on release, so neither a finished
    nor a crashed holder leaves it for good (the kernel drops a dead holder's lock; the next holder
    deletes the file). A waiter may have opened the file just before the holder deleted it, so a lock
    counts only if `path` still names the locked file; otherwise it retries on the new one."""
    path = Path(path)
    while True:
        fd = os.open(path, os.O_RDONLY | os.O_CREAT, FILE_MODE)  # flock needs no write access: a
        # read-only descriptor leaves the folder's file system free to be remounted read-only under the run
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            held = os.fstat(fd)
            try:
                now = os.stat(path)
                if (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino):
                    break
            except FileNotFoundError:
                pass
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):  # read-only or removed: the next holder locks the file left behind
            path.unlink(missing_ok=True)  # while still held: a waiter on this file sees it gone and retries
        os.close(fd)
