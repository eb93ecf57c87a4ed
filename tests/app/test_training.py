"""sekd.app.training's last writes of a trained run: train_stats.json (which marks the run trained), then the
checkpoint goes. A full disk between leaves the checkpoint, so the re-run resumes rather than training anew."""

from __future__ import annotations

import errno

import pytest

from sekd.app.training import finish
from sekd.stores.runs import RunDir
from tests.disks import fill, mount_tmpfs
from tests.helpers import compose_cfg


def test_a_full_disk_at_train_stats_leaves_the_checkpoint_to_resume_from(tmp_path):
    with mount_tmpfs(tmp_path / "disk", "1m") as disk:
        run = RunDir(compose_cfg(["model=tiny", f"paths.root={disk}"]))
        run.path.mkdir(parents=True)
        run.checkpoint.write_bytes(b"a whole checkpoint")
        filler = fill(disk)
        with pytest.raises(OSError) as full:
            finish(run, {"steps": 2})
        assert full.value.errno == errno.ENOSPC and full.value.filename == str(run.train_stats)
        assert run.checkpoint.read_bytes() == b"a whole checkpoint" and not run.trained()
        assert sorted(p.name for p in run.path.iterdir()) == ["checkpoint.pt"]  # no temporary file
        filler.unlink()
        finish(run, {"steps": 2})
        assert run.train_stats.exists() and not run.checkpoint.exists()
