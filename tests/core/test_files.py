"""Atomic writes against real storage faults: a tmpfs filled to the brim and one remounted read-only.
Each fault is an OSError naming the file being written; the old file stays whole and no temporary is left."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import torch

from sekd.core.files import (
    append_lines,
    atomic_torch_save,
    atomic_write_bytes,
    folder_lock,
    storage_error,
)
from tests.disks import fill, mount_tmpfs, remount


@pytest.fixture
def disk(tmp_path):
    with mount_tmpfs(tmp_path / "disk", "1m") as folder:
        yield folder


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_a_full_disk_keeps_the_old_file_and_names_the_new_one(disk):
    target = disk / "record.json"
    atomic_write_bytes(target, b"old")
    fill(disk)
    with pytest.raises(OSError) as err:
        atomic_write_bytes(target, b"new" * 100_000)
    assert err.value.errno == errno.ENOSPC and err.value.filename == str(target)
    assert target.read_bytes() == b"old" and leftovers(disk) == []


def test_a_full_disk_keeps_the_old_checkpoint(disk):
    target = disk / "checkpoint.pt"
    atomic_torch_save(target, {"step": 1})
    fill(disk)
    with pytest.raises(OSError) as err:
        atomic_torch_save(target, {"step": 2, "weights": torch.zeros(100_000)})
    assert err.value.errno == errno.ENOSPC and err.value.filename == str(target)
    assert torch.load(target, weights_only=True) == {"step": 1} and leftovers(disk) == []


@pytest.mark.parametrize("leave", [5_000, 90_000])
def test_a_checkpoint_that_meets_the_full_disk_midway_names_it(disk, leave):
    """torch's zip writer turns the failed write into a RuntimeError ("unexpected pos"): the OSError is kept."""
    target = disk / "checkpoint.pt"
    atomic_torch_save(target, {"step": 1})
    fill(disk, leave=leave)
    with pytest.raises(OSError) as err:
        atomic_torch_save(target, {"step": 2, "weights": torch.zeros(100_000), "more": [torch.ones(10)] * 50})
    assert err.value.errno == errno.ENOSPC and err.value.filename == str(target)
    assert torch.load(target, weights_only=True) == {"step": 1} and leftovers(disk) == []


def test_a_full_disk_appends_no_half_line(disk):
    log = disk / "metrics.jsonl"
    append_lines(log, '{"step": 1}\n')
    filler = fill(disk)
    with pytest.raises(OSError) as err:
        append_lines(log, '{"step": 2, "pad": "' + "x" * 20_000 + '"}\n')
    assert err.value.errno == errno.ENOSPC and err.value.filename == str(log)
    assert log.read_text() == '{"step": 1}\n'
    filler.unlink()
    append_lines(log, '{"step": 2}\n')
    assert log.read_text() == '{"step": 1}\n{"step": 2}\n'


def test_a_read_only_remount_names_the_file_and_releases_the_lock(disk):
    target = disk / "checkpoint.pt"
    atomic_write_bytes(target, b"old")
    with folder_lock(disk / ".train.lock"):  # held while the disk turns read-only, released without an error
        remount(disk, read_only=True)
        try:
            with pytest.raises(OSError) as err:
                atomic_write_bytes(target, b"new")
            assert err.value.errno == errno.EROFS and err.value.filename == str(target)
            with pytest.raises(OSError) as appended:
                append_lines(disk / "metrics.jsonl", "{}\n")
            assert appended.value.errno == errno.EROFS
        finally:
            remount(disk, read_only=False)
    assert target.read_bytes() == b"old" and leftovers(disk) == []


def test_a_write_into_a_removed_folder_names_the_file(tmp_path):
    gone = tmp_path / "run"
    with pytest.raises(OSError) as err:
        append_lines(gone / "metrics.jsonl", "{}\n")
    assert err.value.errno == errno.ENOENT and err.value.filename == str(gone / "metrics.jsonl")


def test_an_injected_fault_at_the_write_leaves_the_old_file(tmp_path, monkeypatch):
    """The same contract without a mount: the OSError raised at the write call itself."""
    target = tmp_path / "record.json"
    atomic_write_bytes(target, b"old")

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError) as err:
        atomic_write_bytes(target, b"new")
    assert err.value.errno == errno.ENOSPC and err.value.filename == str(target)
    assert target.read_bytes() == b"old" and leftovers(tmp_path) == []


def test_storage_error_reads_safetensors_text_and_ignores_other_errors(tmp_path):
    SafetensorError = type("SafetensorError", (Exception,), {})
    err = storage_error(SafetensorError("Error while serializing: I/O error: (os error 28)"), tmp_path / "m")
    assert err is not None and err.errno == errno.ENOSPC and err.filename == str(tmp_path / "m")
    assert storage_error(ValueError("os error 28")) is None
    assert storage_error(OSError(errno.EINVAL, "bad")) is None
