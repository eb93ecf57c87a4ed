"""Real storage faults for tests: a small tmpfs mounted on a folder, filled to the brim or remounted
read-only (root, as here and in CI). Where mounting is refused, `mount_tmpfs` skips loudly, and fails
instead with SEKD_REQUIRE_MOUNT=1 (CI sets it): a green CI run has met the real faults."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
from pathlib import Path
from typing import Iterator

import pytest

MS_RDONLY, MS_REMOUNT, MNT_DETACH = 1, 32, 2
REQUIRE = "SEKD_REQUIRE_MOUNT"
_libc = ctypes.CDLL(None, use_errno=True)


def _mount(source: bytes | None, target: Path, fstype: bytes | None, flags: int, data: bytes | None) -> None:
    if _libc.mount(source, str(target).encode(), fstype, ctypes.c_ulong(flags), data) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), str(target))


def can_mount() -> bool:
    return os.geteuid() == 0


@contextlib.contextmanager
def mount_tmpfs(folder: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` (e.g. "8m") on `folder`, unmounted (lazily, should a file still be open) after."""
    folder.mkdir(parents=True, exist_ok=True)
    try:
        _mount(b"tmpfs", folder, b"tmpfs", 0, f"size={size},mode=0755".encode())
    except OSError as err:
        reason = f"cannot mount a tmpfs here ({err.strerror}): the real storage faults are untested"
        if os.environ.get(REQUIRE) == "1":
            pytest.fail(f"{reason}, and {REQUIRE}=1")
        pytest.skip(f"{reason}; run as root (CI does, with {REQUIRE}=1)")
    try:
        yield folder
    finally:
        _libc.umount2(str(folder).encode(), MNT_DETACH)


def remount(folder: Path, read_only: bool) -> None:
    """Remount the tmpfs on `folder` read-only or writable (EBUSY while a file on it is open for writing)."""
    _mount(None, folder, None, MS_REMOUNT | (MS_RDONLY if read_only else 0), None)


def fill(folder: Path, leave: int = 0) -> Path:
    """Write one file until the disk under `folder` holds not one more byte, then give back `leave` bytes
    (a write that starts, then meets the full disk); returns the file (delete it to free the disk)."""
    filler = folder / "filler.bin"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        for chunk in (2**20, 2**12, 1):
            with contextlib.suppress(OSError):
                while os.write(fd, b"\0" * chunk):
                    pass
    finally:
        os.close(fd)
    with pytest.raises(OSError) as full:
        with open(folder / "probe", "wb") as f:
            f.write(b"\0" * 2**12)
    assert full.value.errno == errno.ENOSPC
    (folder / "probe").unlink(missing_ok=True)
    os.truncate(filler, max(0, filler.stat().st_size - leave))
    return filler
