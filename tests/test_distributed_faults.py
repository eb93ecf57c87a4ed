"""Faults in a run over two ranks (torchrun, gloo on the CPU, the tiny pair), met for real: the disk under
paths.root fills while rank 0 alone writes there (checkpoint.pt, metrics, the model), or while every rank
writes its shard of an fsdp checkpoint; a rank is killed under the other. Every rank stops at once (none waits
at a collective for one that is gone), rank 0 prints the one line and the others nothing, what is left is
whole, and the same command resumes to the weights of an uninterrupted two-rank run (ddp: built here once a
session; fsdp: tests/test_fsdp.py's). torchrun itself always ends a failed run with its own ChildFailedError
block and exit status 1; the line is printed before it and is its "Root Cause" (sekd.distributed.launch.tell_launcher).
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
from tests.helpers import ROOT, built_once, checkpoint_step, descendants, logged_steps, tiny_cache
from tests.test_distributed import ENV, TORCHRUN, args, run_of, the_run, weights, weights_of
from tests.test_fsdp import fsdp_sweep

BOUND = 120  # seconds: a run that waits at a collective for a rank that is gone would take 30 minutes
STEPS = 8  # enough that a fault met after the first checkpoint comes before the run's end


def fault_args(root: Path, steps: int = STEPS) -> list[str]:
    """full_kd on 2 ranks x micro-batch 2 with a checkpoint every step; paths.cache beside `root`
    (tests/test_distributed.args); Hydra's log off the disk under test."""
    return [*args(root, "full_kd", 2, "train.ckpt_every=1", steps=steps), f"hydra.run.dir={root.parent}/hydra"]


@pytest.fixture(scope="module")
def ddp_reference(tmp_path_factory) -> dict[str, torch.Tensor]:
    """The weights of an uninterrupted ddp run of fault_args, built once a session."""

    def train_reference(folder: Path) -> None:
        tiny_cache(tmp_path_factory, folder / "cache")
        res = subprocess.run([*TORCHRUN, *fault_args(folder / "root"), "train.distributed=ddp"], **QUIET)
        assert res.returncode == 0, res.stderr[-3000:]

    return weights(built_once(tmp_path_factory, "ddp-faults-reference", train_reference) / "root")


QUIET = {"cwd": ROOT, "env": ENV, "capture_output": True, "text": True, "timeout": 300}


def composed(root: Path) -> Callable[[], bool]:
    """Past the free-space check (the run's config is written): the models load, nothing trains yet."""
    return lambda: any(root.glob("runs/*/*/config.yaml"))


def torchrun_paused(
    argv: list[str], ready: Callable[[], bool], action: Callable[[], object]
) -> subprocess.CompletedProcess:
    """torchrun until `ready()` holds, then the agent and both ranks stopped (SIGSTOP), `action()` done to the
    world under them, and all let go on (SIGCONT) to meet the fault."""
    root = Path(next(a for a in argv if a.startswith("paths.root=")).split("=", 1)[1])
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen([*TORCHRUN, *argv], cwd=ROOT, env=ENV, stdout=out, stderr=err, text=True)
        deadline = time.time() + 300
        try:
            every: list[int] = []
            while proc.poll() is None and not (every and ready()):
                assert time.time() < deadline, "the run never got there"
                if not every and composed(root)():
                    every = [proc.pid, *descendants(proc.pid)]  # both ranks are up: read once, stopped at once
                time.sleep(0.005)
            assert proc.poll() is None, "the run ended before the fault"
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


def resumes_to(want: dict[str, torch.Tensor], argv: list[str], root: Path, step: int | None, steps: int) -> None:
    again = subprocess.run([*TORCHRUN, *argv], **QUIET)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (f"resumed from step {step}" in again.stdout + again.stderr) == bool(step), again.stderr[-3000:]
    assert logged_steps(root) == list(range(1, steps + 1))
    got = weights(root)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.xdist_group("ddp")  # never beside the other 2-rank runs
def test_a_full_disk_under_rank_0_stops_both_ranks_in_one_line_and_the_rerun_resumes(
    ddp_reference, tmp_path_factory, tmp_path
):
    """The disk fills after the first checkpoint: rank 0's next write (a metrics line, or the next checkpoint)
    fails, and rank 1, which writes nothing there, learns it from rank 0 and stops too."""
    tiny_cache(tmp_path_factory, tmp_path / "cache")
    with mount_tmpfs(tmp_path / "disk", "16m") as disk:
        argv = [*fault_args(disk), "train.distributed=ddp"]
        saved = lambda: any(disk.glob("runs/*/checkpoint.pt"))  # written whole (renamed into place)
        t0 = time.time()
        res = torchrun_paused(argv, ready=saved, action=lambda: fill(disk))
        took, step = time.time() - t0, checkpoint_step(disk)
        line = one_line(res)
        assert step is not None and step < STEPS, line
        written = ("metrics.jsonl", "checkpoint.pt", "model", "train_stats.json")  # where it is when the disk fills
        assert any(line.startswith(f"sekd: run fault: {the_run(disk) / name}: ") for name in written), line
        assert f"no space left on device (paths.root={disk}, " in line, line
        assert f" and re-run the same command: it resumes from step {step} (checkpoint.pt)" in line, line
        assert took < BOUND
        left_whole(disk)
        (disk / "filler.bin").unlink()
        resumes_to(ddp_reference, argv, disk, step, STEPS)


@pytest.mark.xdist_group("fsdp")  # beside the fsdp tests, whose reference run it reads
def test_a_full_disk_under_an_fsdp_checkpoint_stops_both_ranks_in_one_line_and_leaves_no_half_folder(
    tmp_path_factory, tmp_path
):
    """The disk fills (96 KiB left: room for the metrics, not for the sharded checkpoint) once the run has
    passed its free-space check: every rank's torch.distributed.checkpoint save fails together, rank 0 names
    the checkpoint folder and the cause, and the half-written temporary folder is gone."""
    reference = weights_of(run_of(fsdp_sweep(tmp_path_factory), "full_kd"))  # 2 steps, as this run
    tiny_cache(tmp_path_factory, tmp_path / "cache")
    with mount_tmpfs(tmp_path / "disk", "16m") as disk:
        argv = [*fault_args(disk, steps=2), "train.distributed=fsdp"]
        res = torchrun_paused(argv, ready=composed(disk), action=lambda: fill(disk, leave=96 * 1024))
        line = one_line(res)
        assert line.startswith(f"sekd: run fault: {the_run(disk) / 'checkpoint-1.dcp'}: no space left on device")
        assert " and re-run the same command: it trains from step 0" in line, line
        left_whole(disk)
        assert not (the_run(disk) / "checkpoint.pt").exists()
        (disk / "filler.bin").unlink()
        resumes_to(reference, argv, disk, None, 2)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.xdist_group("ddp")
def test_a_rank_killed_under_the_other_ends_it_in_one_line_not_a_30_minute_wait(
    ddp_reference, tmp_path_factory, tmp_path
):
    """Ranks started as Slurm's tasks are (no agent to stop the others): rank 1 is SIGKILLed after the first
    checkpoint, as a preempted or OOM-killed process; rank 0, waiting for it in a collective, stops at once
    with the one line. The same command then resumes to the uninterrupted weights."""
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
            while not any(root.glob("runs/*/checkpoint.pt")):
                assert time.time() < deadline and ranks[0].poll() is None, "the run never got there"
                time.sleep(0.005)
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
    step = checkpoint_step(root)
    assert ranks[0].returncode == 3 and took < 30 and step is not None and step < STEPS, stderr[-3000:]
    (line,) = [ln for ln in stderr.splitlines() if ln.startswith("sekd: ")]
    assert line == (
        "sekd: run fault: rank 0 of 2: another rank stopped while this one waited for it (killed, out of memory, "
        f"or its node lost; its own output says which); re-run the same command: it resumes from step {step} "
        "(checkpoint.pt)"
    ), stderr[-3000:]
    assert "Traceback" not in stderr
    resumes_to(ddp_reference, argv, root, step, STEPS)
