"""sekd/cli/cache.py: sekd-cache build (two workers) / verify / ls / stats on a tiny teacher folder, in subprocesses.
The build takes sekd-train's overrides; verify refuses every tampering in one line."""

import json
import os
import subprocess
import sys

import pytest

from sekd.stores.teacher_cache.store import MANIFEST, TeacherCache, shard_name
from tests.disks import fill, mount_tmpfs
from tests.stores.teacher_cache.helpers import ROOT, edit_manifest


def sekd_cache(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(
        [sys.executable, "-m", "sekd.cli.cache", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=180
    )


@pytest.fixture(scope="module")
def cli_cache(teacher_dir, tmp_path_factory):
    """Built by two workers, one after the other; returns (out, the first worker's results)."""
    tmp = tmp_path_factory.mktemp("cli")
    out = tmp / "cache"
    base = ["build", "--out", str(out), "--num-shards", "2", "--num-workers", "2", "--quiet"]
    run = build_overrides(teacher_dir, tmp / "harness")
    first = sekd_cache(*base, "--worker", "0", *run)
    half_verify = sekd_cache("verify", str(out))
    second = sekd_cache(*base, "--worker", "1", *run)
    assert second.returncode == 0, second.stderr
    return out, first, half_verify, second


def build_overrides(teacher_dir, harness) -> list[str]:
    """sekd-train's overrides of a tiny cache: the tiny teacher as both models, 20 sequences of 32 tokens."""
    return [
        "model.source=pretrained",
        f"model.teacher={teacher_dir}",
        f"model.student={teacher_dir}",
        "data.seq_len=32",
        "data.token_budget=640",
        f"paths.cache={harness}",
        "classes.options.n_draws=16",
        "train.device=cpu",
        "train.threads=1",
        "seed=5",
    ]


def test_build_on_a_full_disk_is_one_line_and_the_rerun_finishes(teacher_dir, tmp_path):
    """--out on a real tmpfs with not one byte free: one line naming the file, exit status 3, no temporary
    left; once space is freed the same command builds the cache whole."""
    with mount_tmpfs(tmp_path / "disk", "1m") as disk:
        build = ["build", "--out", str(disk / "cache"), "--num-shards", "2", "--quiet"]
        build += build_overrides(teacher_dir, tmp_path / "harness")
        filler = fill(disk)
        res = sekd_cache(*build)
        assert res.returncode == 3 and "Traceback" not in res.stderr, res.stderr[-3000:]
        (line,) = res.stderr.strip().splitlines()
        assert line.startswith(f"sekd-cache build: run fault: {disk / 'cache'}/")
        assert "no space left on device (0 B free); free space on that disk and re-run the same command" in line
        assert list(disk.rglob("*.tmp")) == []
        filler.unlink()
        again = sekd_cache(*build)
        assert again.returncode == 0, again.stderr[-3000:]
        assert sekd_cache("verify", str(disk / "cache")).returncode == 0


def test_build_by_two_workers(cli_cache, teacher_dir):
    from transformers import AutoTokenizer

    from sekd.data.dataset import tokenizer_signature
    from sekd.models.loading import model_signature

    out, first, half_verify, second = cli_cache
    assert first.returncode == 0, first.stderr
    assert "1/2 shards" in first.stdout and "2/2 shards" in second.stdout
    assert half_verify.returncode == 1 and "missing shard" in half_verify.stderr
    assert len(half_verify.stderr.strip().splitlines()) == 1
    sig = json.loads((out / MANIFEST).read_text())["signature"]
    tok = AutoTokenizer.from_pretrained(teacher_dir)
    assert sig["tokenizer"] == tokenizer_signature(tok) and sig["vocab_size"] == len(tok)
    assert sig["teacher"] == model_signature(str(teacher_dir))  # what training checks the cache against
    assert sig["n_draws"] == 16 and sig["seq_len"] == 32 and sig["seed"] == 5  # the run's keys
    cache = TeacherCache.open(out, expect={"tokenizer": tokenizer_signature(tok), "n_draws": 16}, verify=True)
    assert cache.stats()["samples"] == 20  # 640 tokens / 32


def test_verify_ok_then_refuses_a_flipped_byte(cli_cache, tmp_path):
    import shutil

    out = cli_cache[0]
    ok = sekd_cache("verify", str(out))
    assert ok.returncode == 0 and ok.stdout.startswith("OK") and len(ok.stdout.strip().splitlines()) == 1
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    shard = bad / shard_name(1, 2)
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0x04
    shard.write_bytes(bytes(raw))
    res = sekd_cache("verify", str(bad))
    assert res.returncode == 1 and res.stdout == ""
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and str(shard) in lines[0] and "checksum" in lines[0]


def test_ls(cli_cache):
    res = sekd_cache("ls", str(cli_cache[0]))
    assert res.returncode == 0, res.stderr
    assert (
        "complete" in res.stdout
        and "n_draws: 16" in res.stdout
        and "; rs_kd: counts records, form draws)" in res.stdout
    )
    assert shard_name(0, 2) in res.stdout and shard_name(1, 2) in res.stdout
    assert "| shard | file | samples |" in res.stdout


def test_stats(cli_cache):
    res = sekd_cache("stats", str(cli_cache[0]), "--tokens", "100e9", "--sample-fraction", "0.2")
    assert res.returncode == 0, res.stderr
    out = res.stdout
    for row in (
        "Full KD",
        "RS-KD (U=12)",
        "RS-KD (U=64)",
        "SE-KD3X (U=12, l=20%)",
        "SE-KD3X (U=64, l=20%)",
        "Vanilla CE",
        "this cache, records only",
    ):
        assert row in out, out
    assert "| 3.60 |" in out and "| 19.20 |" in out and "| 0.72 |" in out and "| 3.84 |" in out and "| 0.30 |" in out
    measured = next(l for l in out.splitlines() if "records only" in l)
    bpp = float(measured.split("|")[2].replace(",", ""))
    assert 0 < bpp < 3 * 16  # distinct draws only: below U * 3 bytes


def test_stats_and_verify_refuse_missing_folder(tmp_path):
    res = sekd_cache("stats", str(tmp_path))
    assert res.returncode == 1 and MANIFEST in res.stderr and len(res.stderr.strip().splitlines()) == 1


def test_build_refuses_a_bad_override_in_one_line(tmp_path):
    res = sekd_cache("build", "--out", str(tmp_path / "c"), "--quiet", "train.temperature=0")
    assert res.returncode == 2 and not (tmp_path / "c").exists()
    lines = res.stderr.strip().splitlines()
    assert (
        len(lines) == 1 and lines[0].startswith("sekd-cache build: config error:") and "train.temperature" in lines[0]
    )


@pytest.mark.parametrize(
    "args,words",
    [
        (
            ["--kind", "student_top_k:top=4"],
            "classes.cache: classes.name=student_top_k chooses its classes by the student",
        ),
        (["classes=union_top_k"], "classes.cache: classes.name=union_top_k chooses its classes by the student"),
        (["--kind", "top_p:p=2"], "classes.options.p=2 must be in (0, 1]"),
    ],
)
def test_build_refuses_a_kind_no_cache_can_hold_in_one_line(tmp_path, args, words):
    """Refused before the pair, the data or the teacher is touched: exit 2, nothing written."""
    res = sekd_cache("build", "--out", str(tmp_path / "c"), "--quiet", *args)
    assert res.returncode == 2 and not (tmp_path / "c").exists(), res.stderr[-2000:]
    (line,) = res.stderr.strip().splitlines()
    assert line.startswith("sekd-cache build: config error:") and words in line, line


TAMPER = {  # signature field -> an edited value
    "teacher": "another-teacher",
    "temperature": 2.0,
    "seed": 7,
    "data": "0123456789abcdef",
    "n_draws": 12,
    "vocab_size": 299,
}


@pytest.mark.parametrize("key", sorted(TAMPER))
def test_verify_refuses_an_edited_signature(cli_cache, tmp_path, key):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(cli_cache[0], bad)
    edit_manifest(bad, lambda man: man["signature"].update({key: TAMPER[key]}), reseal=False)
    res = sekd_cache("verify", str(bad))
    assert res.returncode == 1 and res.stdout == ""
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and str(bad / MANIFEST) in lines[0] and "checksum mismatch" in lines[0]


def test_verify_refuses_a_flipped_manifest_byte(cli_cache, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(cli_cache[0], bad)
    raw = bytearray((bad / MANIFEST).read_bytes())
    raw[raw.index(b'"temperature": ') + len(b'"temperature": ')] ^= 0x02  # 1.0 -> 3.0
    (bad / MANIFEST).write_bytes(bytes(raw))
    res = sekd_cache("verify", str(bad))
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 1 and len(lines) == 1 and str(bad / MANIFEST) in lines[0] and "checksum" in lines[0]


@pytest.mark.parametrize("worker,visible,card", [(0, 4, 0), (1, 4, 1), (5, 4, 1), (3, 1, 0)])
def test_build_workers_spread_over_the_cards_they_see(worker, visible, card):
    """W workers on one node load the teacher on different cards (worker I on card I mod the visible ones);
    a worker bound to one card (CUDA_VISIBLE_DEVICES set per task) sees it as cuda:0."""
    import torch

    from sekd.cli.cache import worker_device

    assert worker_device(torch.device("cuda"), worker, visible) == torch.device("cuda", card)
    assert worker_device(torch.device("cpu"), worker, visible) == torch.device("cpu")
    assert worker_device(torch.device("cuda", 2), worker, visible) == torch.device("cuda", 2)  # named: kept
