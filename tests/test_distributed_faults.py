"""Faults in a run over two ranks (torchrun, gloo on the CPU, the tiny pair), met for real: the disk under
paths.root fills while rank 0 alone writes there (metrics, checkpoint.pt, the model), or while every rank
writes its shard of an fsdp checkpoint; a rank is killed under the others. Every rank stops at once (no rank
waits at a collective for one that is gone), rank 0 prints the one line and the others nothing, what is left
is whole, and the same command resumes to the weights of an uninterrupted two-rank run (tests/test_distributed.py
and tests/test_fsdp.py build those, once a session). torchrun itself always ends a failed run with its own
ChildFailedError block and exit status 1; the line is its "Root Cause" too (sekd.distributed.launch.tell_launcher).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import pytest
import torch

from tests.disks import fill, mount_tmpfs
from tests.helpers import ROOT, checkpoint_step, descendants, logged_steps, tiny_cache
from tests.test_distributed import ENV, TORCHRUN, args, run_of, the_run, two_ranks, weights, weights_of
from tests.test_fsdp import fsdp_sweep

BOUND = 120  # seconds: a run that waits at a collective for a rank that is gone would take 30 minutes


def fault_args(root: Path) -> list[str]:
    """full_kd on 2 ranks x micro-batch 2 for 2 steps, as the reference runs, with a checkpoint after step 1;
    paths.cache beside `root` (tests/test_distributed.args); Hydra's log off the disk under test."""
    return [*args(root, "full_kd", 2, "train.ckpt_every=1"), f"hydra.run.dir={root.parent}/hydra"]


def torchrun_paused(
    argv: list[str], ready: Callable[[], bool], action: Callable[[], object]
) -> subprocess.CompletedProcess:
    """torchrun until `ready()` holds, then the agent and both ranks stopped (SIGSTOP), `action()` done to the
    world under them, and all let go on (SIGCONT) to meet the fault."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen([*TORCHRUN, *argv], cwd=ROOT, env=ENV, stdout=out, stderr=err, text=True)
        deadline = time.time() + 300
        try:
            while proc.poll() is None and not ready():
                assert time.time() < deadline, "the run never got there"
                time.sleep(0.01)
            assert proc.poll() is None, "the run ended before the fault"
            every = [proc.pid, *descendants(proc.pid)]
            for pid in every:
                os.kill(pid, signal.SIGSTOP)
            action()
            for pid in every:
                os.kill(pid, signal.SIGCONT)
            proc.wait(timeout=BOUND)
        finally:
            if proc.poll() is None:
                for pid in [proc.pid, *descendants(proc.pid)]:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                proc.wait()
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(proc.args, proc.returncode, out.read(), err.read())


def one_line(res: subprocess.CompletedProcess) -> str:
    """torchrun's exit status 1 after both ranks exited 3; the one sekd line, from rank 0 alone, before
    torchrun's block, whose root cause is that line; no rank's traceback."""
    assert res.returncode == 1, res.stderr[-4000:]
    # each rank exits 3; the first to end makes torchrun stop the other (SIGTERM) should it still be on its way out
    codes = re.findall(r"exitcode  : (-?\d+) ", res.stderr)
    assert sorted(codes) in (["3", "3"], ["-15", "3"]), res.stderr[-4000:]
    lines = [ln for ln in res.stderr.splitlines() if "sekd: " in ln]
    assert len(lines) == 2 and lines[0].startswith("sekd: run fault: "), res.stderr[-4000:]
    assert lines[1] == f"  traceback : {lines[0]}"  # torchrun's "Root Cause" names it
    assert res.stderr.index(lines[0]) < res.stderr.index("ChildFailedError")
    assert "[rank" not in res.stderr and res.stderr.count("Traceback") == 1  # torchrun's own, only
    return lines[0]


def left_whole(root: Path) -> None:
    """No temporary file or folder, and no sharded folder that checkpoint.pt does not name."""
    assert [p.name for p in root.rglob("*.tmp")] == []
    run = the_run(root)
    named = (
        torch.load(run / "checkpoint.pt", weights_only=True).get("sharded")
        if (run / "checkpoint.pt").exists()
        else None
    )
    assert [p.name for p in run.glob("checkpoint-*.dcp")] == ([named] if named else [])


def resumes_to(reference: Path, argv: list[str], root: Path, step: int | None) -> None:
    again = subprocess.run([*TORCHRUN, *argv], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (f"resumed from step {step}" in again.stdout + again.stderr) == bool(step), again.stderr[-3000:]
    assert logged_steps(root) == [1, 2]
    got, want = weights(root), weights_of(run_of(reference, "full_kd"))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.xdist_group("ddp")  # beside the ddp tests, whose reference run it reads
def test_a_full_disk_under_rank_0_stops_both_ranks_in_one_line_and_the_rerun_resumes(tmp_path_factory, tmp_path):
    """The disk fills after the step-1 checkpoint: rank 0's next write (step 2's metrics line, or the model)
    fails, and rank 1, which writes nothing there, learns it from rank 0 and stops too."""
    reference = two_ranks(tmp_path_factory, "full_kd")
    tiny_cache(tmp_path_factory, tmp_path / "cache")
    with mount_tmpfs(tmp_path / "disk", "16m") as disk:
        argv = [*fault_args(disk), "train.distributed=ddp"]
        t0 = time.time()
        saved = lambda: any(disk.glob("runs/*/checkpoint.pt"))  # written whole (renamed into place)
        res = torchrun_paused(argv, ready=saved, action=lambda: fill(disk))
        took = time.time() - t0
        line = one_line(res)
        written = ("metrics.jsonl", "model", "train_stats.json")  # where step 2 is when the disk fills
        assert any(line.startswith(f"sekd: run fault: {the_run(disk) / name}: ") for name in written), line
        assert f"no space left on device (paths.root={disk}, " in line, line
        assert " and re-run the same command: it resumes from step 1 (checkpoint.pt)" in line, line
        assert took < BOUND
        left_whole(disk)
        assert checkpoint_step(disk) == 1
        (disk / "filler.bin").unlink()
        resumes_to(reference, argv, disk, 1)


@pytest.mark.xdist_group("fsdp")  # beside the fsdp tests, whose reference run it reads
def test_a_full_disk_under_an_fsdp_checkpoint_stops_both_ranks_in_one_line_and_leaves_no_half_folder(
    tmp_path_factory, tmp_path
):
    """The disk fills (96 KiB left: room for the metrics, not for the sharded checkpoint) once the run has
    passed its free-space check: every rank's torch.distributed.checkpoint save fails together, rank 0 names
    the checkpoint folder and the cause, and the half-written temporary folder is gone."""
    reference = fsdp_sweep(tmp_path_factory)
    tiny_cache(tmp_path_factory, tmp_path / "cache")
    with mount_tmpfs(tmp_path / "disk", "16m") as disk:
        argv = [*fault_args(disk), "train.distributed=fsdp"]
        composed = lambda: any(disk.glob("runs/*/*/config.yaml"))  # past the preflight; the models still load
        res = torchrun_paused(argv, ready=composed, action=lambda: fill(disk, leave=96 * 1024))
        line = one_line(res)
        assert line.startswith(f"sekd: run fault: {the_run(disk) / 'checkpoint-1.dcp'}: no space left on device")
        assert " and re-run the same command: it trains from step 0" in line, line
        left_whole(disk)
        assert not (the_run(disk) / "checkpoint.pt").exists()
        (disk / "filler.bin").unlink()
        resumes_to(reference, argv, disk, None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.xdist_group("ddp")
def test_a_rank_killed_under_the_other_ends_it_in_one_line_not_a_30_minute_wait(tmp_path_factory, tmp_path):
    """Ranks started as Slurm's tasks are (no agent to stop the others): rank 1 is SIGKILLed after the step-1
    checkpoint, as a preempted or OOM-killed process; rank 0, waiting for it in a collective, stops at once
    with the one line. The same command then resumes from step 1 to the uninterrupted weights."""
    reference = two_ranks(tmp_path_factory, "full_kd")
    tiny_cache(tmp_path_factory, tmp_path / "cache")
    root = tmp_path / "root"
    argv = [*fault_args(root), "train.distributed=ddp"]
    world = {"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    with tempfile.TemporaryFile("w+") as err0:
        ranks = [
            subprocess.Popen(
                [sys.executable, "-m", "sekd.train", *argv],
                cwd=ROOT,
                env={**ENV, **world, "RANK": str(r), "LOCAL_RANK": str(r)},
                stdout=subprocess.DEVNULL,
                stderr=err0 if r == 0 else subprocess.DEVNULL,
                text=True,
            )
            for r in (0, 1)
        ]
        try:
            deadline = time.time() + 300
            while checkpoint_step(root) != 1:
                assert time.time() < deadline and ranks[0].poll() is None, "the run never got there"
                time.sleep(0.01)
            ranks[1].kill()
            t0 = time.time()
            ranks[0].wait(timeout=BOUND)
            took = time.time() - t0
        finally:
            for p in ranks:
                if p.poll() is None:
                    p.kill()
                p.wait()
        err0.seek(0)
        stderr = err0.read()
    assert ranks[0].returncode == 3 and took < 30, stderr[-3000:]
    (line,) = [ln for ln in stderr.splitlines() if ln.startswith("sekd: ")]
    assert line == (
        "sekd: run fault: rank 0 of 2: another rank stopped while this one waited for it (killed, out of memory, "
        "or its node lost; its own output says which); re-run the same command: it resumes from step 1 "
        "(checkpoint.pt)"
    ), stderr[-3000:]
    assert "Traceback" not in stderr
    resumes_to(reference, argv, root, 1)
