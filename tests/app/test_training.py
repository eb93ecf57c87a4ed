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


def test_the_cache_expectation_names_the_runs_kind(tmp_path):
    """cache_expectation holds the run's class sampler, options (completed) and form, so a cache of another
    kind or options is refused by them; a student-dependent sampler has no expectation, one line."""
    from sekd.app.checks import validate
    from sekd.app.training import cache_expectation
    from sekd.core.errors import ConfigError
    from sekd.stores.teacher_cache.store import CacheError, check_signature
    from tests.stores.teacher_cache.conftest import tiny_tokenizer

    tok = tiny_tokenizer()
    cfg = validate(compose_cfg(["model=tiny", "classes=top_k_tail", "classes.options.top=8", "classes.cache=auto"]))
    expect = cache_expectation(cfg, None, tok)
    assert {k: expect[k] for k in ("kind", "form", "records", "top")} == {
        "kind": "top_k_tail",
        "form": "tail",
        "records": "probs",
        "top": 8,
    }
    rs_kd = cache_expectation(validate(compose_cfg(["model=tiny", "classes=rs_kd"])), None, tok)
    assert (rs_kd["kind"], rs_kd["records"], rs_kd["n_draws"]) == ("rs_kd", "counts", 64) and "top" not in rs_kd
    top_p = cache_expectation(validate(compose_cfg(["model=tiny", "classes=top_p"])), None, tok)
    with pytest.raises(CacheError) as e:  # what opening a top_p cache for this run says
        check_signature(tmp_path / "manifest.json", top_p, expect)
    assert "\n" not in str(e.value) and "kind expected 'top_k_tail', found 'top_p'" in str(e.value)
    with pytest.raises(ConfigError, match="^classes.cache: classes.name=student_top_k chooses its classes by"):
        cache_expectation(validate(compose_cfg(["model=tiny", "classes=student_top_k"])), None, tok)
