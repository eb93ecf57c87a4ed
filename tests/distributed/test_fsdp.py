"""sekd.distributed.fsdp's account of a sharded checkpoint that failed: torch.distributed.checkpoint gives every
rank every rank's error in a CheckpointException (a BaseException); a storage fault among them becomes the one
line's OSError naming the checkpoint folder on rank 0, and a quiet echo of it on the others."""

from __future__ import annotations

import errno
from pathlib import Path

from torch.distributed.checkpoint.api import CheckpointException

from sekd.distributed.fsdp import sharded_fault
from sekd.core.errors import EchoedFault


def test_a_full_disk_under_any_rank_names_the_checkpoint_folder():
    folder = Path("/runs/r/checkpoint-4.dcp")
    full = OSError(errno.ENOSPC, "No space left on device", "/runs/r/.checkpoint-4.dcp.tmp/__1_0.distcp")
    err = CheckpointException("save", {1: (full, None)})
    on_main = sharded_fault(err, folder, is_main=True)
    assert isinstance(on_main, OSError) and on_main.errno == errno.ENOSPC and on_main.filename == str(folder)
    echoed = sharded_fault(err, folder, is_main=False)
    assert isinstance(echoed, EchoedFault) and echoed.quiet and str(echoed).startswith("rank 1: [Errno 28]")


def test_a_failure_that_is_no_storage_fault_stays_an_error_with_torchs_account():
    err = CheckpointException("save", {0: (ValueError("a bug"), None)})
    got = sharded_fault(err, Path("/runs/r/checkpoint-4.dcp"), is_main=True)
    assert type(got) is RuntimeError and "the sharded checkpoint failed" in str(got) and "a bug" in str(got)


def test_an_unfinished_sharded_folder_is_removed_and_the_named_one_kept(tmp_path):
    from sekd.distributed.fsdp import remove_unfinished

    for name in (".checkpoint-6.dcp.tmp", "checkpoint-4.dcp"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__0_0.distcp").write_bytes(b"shard")
    remove_unfinished(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-4.dcp"]


def test_torchs_lost_write_on_a_full_disk_is_no_space_left(tmp_path):
    """DCP writes each shard with torch.save to a file name: its zip writer reports the write a full disk
    refused as "unexpected pos", without the OSError. On a real full tmpfs that is ENOSPC; elsewhere not."""
    from tests.disks import fill, mount_tmpfs

    lost = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    with mount_tmpfs(tmp_path / "disk", "1m") as disk:
        folder = disk / "run" / "checkpoint-1.dcp"  # not made yet: its disk is that of the nearest folder
        fill(disk)
        err = CheckpointException("save", {1: (lost, None)})
        got = sharded_fault(err, folder, is_main=True)
        assert isinstance(got, OSError) and got.errno == errno.ENOSPC and got.filename == str(folder)
    roomy = sharded_fault(CheckpointException("save", {1: (lost, None)}), tmp_path / "c.dcp", is_main=True)
    assert type(roomy) is RuntimeError  # a disk with room: torch's own failure, shown as it is
