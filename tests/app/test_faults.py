"""The fault's one line and the preflight, in process: what each says, which exit status, which key."""

from __future__ import annotations

import errno
import os

import pytest
import torch

from sekd.app.checks import validate
from sekd.app.faults import as_fault, fault_line, stop
from sekd.app.preflight import preflight
from sekd.core.errors import FAULT_EXIT, ConfigError, RunFault
from sekd.stores.runs import RunDir
from tests.disks import mount_tmpfs, remount
from tests.helpers import TINY, compose_cfg


def composed(tmp_path, root=None, cache=None):
    tree = compose_cfg([*TINY, f"paths.root={root or tmp_path / 'root'}", f"paths.cache={cache or tmp_path / 'c'}"])
    return validate(tree), RunDir(tree)


def test_a_full_disk_names_the_file_the_key_and_the_step_the_rerun_resumes_from(tmp_path):
    cfg, run = composed(tmp_path)
    run.path.mkdir(parents=True)
    torch.save({"progress": {"step": 4}}, run.checkpoint)
    fault = as_fault(OSError(errno.ENOSPC, "No space left on device", str(run.checkpoint)))
    assert fault is not None
    line = fault_line(fault, cfg, run, "training")
    assert line.startswith(f"{run.checkpoint}: no space left on device (paths.root={tmp_path / 'root'}, ")
    assert "; free space on that disk (this run writes about " in line
    assert line.endswith("re-run the same command: it resumes from step 4 (checkpoint.pt)")


def test_a_trained_run_only_scores_and_a_fresh_one_starts_at_step_0(tmp_path):
    cfg, run = composed(tmp_path)
    fault = OSError(errno.EROFS, "Read-only file system", str(run.path / "metrics.jsonl"))
    assert fault_line(fault, cfg, run, "training").endswith("it trains from step 0")
    (run.model).mkdir(parents=True)
    (run.model / "config.json").write_text("{}")
    run.train_stats.write_text("{}")
    assert fault_line(fault, cfg, run, "scoring").endswith("the student is trained and saved; it only scores")


def test_only_storage_faults_are_faults(tmp_path):
    assert as_fault(ValueError("no")) is None
    assert as_fault(OSError(errno.EINVAL, "bad")) is None
    missing = FileNotFoundError(errno.ENOENT, "No such file", str(tmp_path / "f.json"))
    assert as_fault(missing) is None  # its folder is there: a missing file is a bug, with its traceback
    gone = FileNotFoundError(errno.ENOENT, "No such file", str(tmp_path / "gone" / "f.json"))
    assert as_fault(gone) is not None
    assert as_fault(RunFault("x")) is not None


def test_a_fault_exits_3_and_SEKD_TRACEBACK_raises_it(monkeypatch, capsys):
    monkeypatch.delenv("SEKD_TRACEBACK", raising=False)
    err = OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(SystemExit) as out:
        stop("f: no space left on device", err, verbose=False)
    assert out.value.code == FAULT_EXIT == 3
    assert capsys.readouterr().err == "sekd: run fault: f: no space left on device\n"
    monkeypatch.setenv("SEKD_TRACEBACK", "1")
    with pytest.raises(OSError):
        stop("f", err, verbose=False)
    monkeypatch.delenv("SEKD_TRACEBACK")
    with pytest.raises(OSError):
        stop("f", err, verbose=True)


def test_the_preflight_names_a_read_only_cache_and_a_small_disk(tmp_path):
    with mount_tmpfs(tmp_path / "ro", "1m") as ro:
        remount(ro, read_only=True)
        try:
            cfg, run = composed(tmp_path, cache=ro / "cache")
            with pytest.raises(ConfigError, match=f"^paths.cache: cannot write in {ro} \\(Read-only file system\\)"):
                preflight(cfg, run)
        finally:
            remount(ro, read_only=False)
    with mount_tmpfs(tmp_path / "small", "64k") as small:
        cfg, run = composed(tmp_path, root=small)
        with pytest.raises(ConfigError, match=f"^paths.root: {small} has 64 KiB free, but this run writes about "):
            preflight(cfg, run)
        assert os.listdir(small) == []  # the probe's file is gone
    cfg, run = composed(tmp_path)
    preflight(cfg, run)  # room and rights: nothing to say, and nothing made
    assert not run.path.exists()


class _Tokenizer:
    def save_pretrained(self, folder) -> None:
        (folder / "tokenizer.json").write_text("{}")


def test_a_model_that_meets_a_full_disk_leaves_the_old_model_and_no_half_one(tmp_path):
    """safetensors reports the full disk as text: it is the same OSError, naming the model's folder."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from sekd.app.training import save_student
    from tests.disks import fill

    cfg = Qwen3Config(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=1)
    cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim = 4, 2, 16
    student = Qwen3ForCausalLM(cfg)
    with mount_tmpfs(tmp_path / "disk", "2m") as disk:
        _, run = composed(tmp_path, root=disk)
        run.path.mkdir(parents=True)
        (run.model).mkdir()
        (run.model / "config.json").write_text('{"old": true}')
        fill(disk, leave=50_000)
        with pytest.raises(OSError) as err:
            save_student(run, student, _Tokenizer())
        assert err.value.errno == errno.ENOSPC and err.value.filename == str(run.model)
        assert (run.model / "config.json").read_text() == '{"old": true}'
        assert not (run.path / "model.tmp").exists()
