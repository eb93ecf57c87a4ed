"""Shared test helpers: compose the real Hydra config, run the real CLI in a subprocess."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

from hydra import compose, initialize_config_dir

import sekd.config.schema  # noqa: F401  (registers the config schema conf/config.yaml composes against)

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
PRESETS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))

# The smallest real run: tiny pretrained pair, short sequences, a few steps, no wandb.
TINY = [
    "model=tiny",
    "data.seq_len=64",
    "train.micro_batch_size=4",
    "train.grad_accum=2",
    "train.threads=1",
    "train.log_every=1",
    "logging=disabled",
]


def compose_cfg(overrides: list[str], config_dir: Path = CONF, name: str = "config", hydra_node: bool = False):
    with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
        return compose(config_name=name, overrides=overrides, return_hydra_config=hydra_node)


def sekd_train(args: list[str], env: dict[str, str] | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "sekd.train", *args],
        cwd=ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def sekd_train_killed(
    args: list[str],
    ready: Callable[[], bool],
    env: dict[str, str] | None = None,
    timeout: int = 600,
    victims: Callable[[int], list[int]] | None = None,
) -> subprocess.CompletedProcess:
    """Run the real CLI until `ready()` holds (polled every 10 ms; e.g. a checkpoint is written), then
    SIGKILL it, as a crash or a lost node would: `victims(pid)` names the processes to kill (default: the
    CLI itself). Returns the ended process (returncode -9 when killed; its own code when it ended first)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:  # pipes could fill and block it
        proc = subprocess.Popen(
            [sys.executable, "-m", "sekd.train", *args],
            cwd=ROOT,
            env={**os.environ, **(env or {})},
            stdout=out,
            stderr=err,
            text=True,
        )
        try:
            deadline = time.time() + timeout
            while proc.poll() is None and not ready():
                assert time.time() < deadline, "the run never got there"
                time.sleep(0.01)
            if proc.poll() is None:
                for pid in victims(proc.pid) if victims else [proc.pid]:
                    os.kill(pid, signal.SIGKILL)
            proc.wait(timeout=max(1, deadline - time.time()))
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(proc.args, proc.returncode, out.read(), err.read())


def logged_steps(root: Path) -> list[int]:
    """The steps in the metrics.jsonl of the one run under <paths.root> (complete lines only)."""
    rows = [ln for p in Path(root).glob("runs/*/metrics.jsonl") for ln in p.read_text().split("\n")[:-1]]
    return [json.loads(ln)["step"] for ln in rows]


def checkpoint_step(root: Path) -> int | None:
    """The step of the checkpoint.pt under <paths.root> (None while there is none)."""
    import torch

    for ck in Path(root).glob("runs/*/checkpoint.pt"):
        try:
            return int(torch.load(ck, map_location="cpu", weights_only=True)["progress"]["step"])
        except (OSError, RuntimeError, EOFError):  # replaced while being read: ask again
            return None
    return None


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (Linux /proc)."""
    parent = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        parent[int(stat.parent.name)] = int(fields[1])
    found, todo = [], [pid]
    while todo:
        here = todo.pop()
        kids = [p for p, pp in parent.items() if pp == here]
        found += kids
        todo += kids
    return found


def sekd_train_paused(
    args: list[str],
    ready: Callable[[], bool],
    action: Callable[[], bool],
    env: dict[str, str] | None = None,
    timeout: int = 600,
) -> subprocess.CompletedProcess:
    """Run the real CLI until `ready()` holds, then stop it (SIGSTOP), do `action()` to the world under it
    (fill its disk, remount it read-only, delete its folder), and let it go on (SIGCONT) to meet the fault.
    An action that returns False could not act yet (a file open for writing): retried a moment later."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "sekd.train", *args],
            cwd=ROOT,
            env={**os.environ, **(env or {})},
            stdout=out,
            stderr=err,
            text=True,
        )
        try:
            deadline = time.time() + timeout
            while proc.poll() is None and not ready():
                assert time.time() < deadline, "the run never got there"
                time.sleep(0.01)
            assert proc.poll() is None, "the run ended before the fault"
            acted = False
            while not acted:
                assert time.time() < deadline, "the action never took"
                os.kill(proc.pid, signal.SIGSTOP)
                acted = action()
                os.kill(proc.pid, signal.SIGCONT)
                time.sleep(0 if acted else 0.02)
            proc.wait(timeout=max(1, deadline - time.time()))
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(proc.args, proc.returncode, out.read(), err.read())
