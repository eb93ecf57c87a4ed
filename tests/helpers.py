"""Shared test helpers: compose the real Hydra config, run the real CLI in a subprocess."""

from __future__ import annotations

import copy
import functools
import json
import os
import shutil
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
INJECT = Path(__file__).parent / "inject"
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


def shared_dir(tmp_path_factory) -> Path:
    """This session's folder that every pytest-xdist worker sees: the basetemp's parent in a worker (xdist gives
    each worker <basetemp>/popen-gwN), the basetemp itself without xdist."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def built_once(tmp_path_factory, name: str, build: Callable[[Path], None]) -> Path:
    """<shared_dir>/<name>, filled by `build(folder)` once per session however many tests (in however many
    xdist workers) ask: the first builds under sekd.core.artifacts.build_once's lock, the others wait and reuse
    it. For a run several tests read (a trained tiny run, a sweep): read-only for them, copy to modify."""
    from sekd.core.artifacts import build_once

    folder = shared_dir(tmp_path_factory) / "shared" / name

    def build_folder(done: Path) -> None:
        if folder.exists():  # left by a build that failed
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        build(folder)
        done.write_text("")

    build_once(folder.with_name(f"{name}.done"), build_folder)
    return folder


def tiny_cache(tmp_path_factory, dest: Path) -> Path:
    """A paths.cache at `dest` (which must not exist) holding the tiny pair as model=tiny builds it (tokenizer,
    pretrained teacher and student), copied from one built once a session: for a run that needs a cache of its
    own but not to build the pair. A test of the building itself, or of a cache left empty, starts from none."""

    def build_tiny_pair(folder: Path) -> None:
        from sekd.app.checks import typed
        from sekd.models.loading import resolve_pair

        resolve_pair(typed(compose_cfg(["model=tiny", f"paths.cache={folder}"])))

    shutil.copytree(built_once(tmp_path_factory, "tiny-cache", build_tiny_pair), dest)
    return dest


def compose_cfg(overrides: list[str], config_dir: Path = CONF, name: str = "config", hydra_node: bool = False):
    with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
        return compose(config_name=name, overrides=overrides, return_hydra_config=hydra_node)


@functools.lru_cache(maxsize=None)
def _composed(config_dir: str, name: str, overrides: tuple[str, ...]):
    with initialize_config_dir(config_dir=config_dir, version_base="1.3"):
        return compose(config_name=name, overrides=list(overrides))


def composed(config_dir: Path, name: str, overrides: list[str]):
    """The config `name` of config_dir under `overrides`, as compose_cfg gives it, composed once per process (a
    copy each call): tests/test_sweeps.py and tests/test_config_hashes.py compose every sweep cell, ~0.2 s each."""
    return copy.deepcopy(_composed(str(config_dir), name, tuple(overrides)))


def sekd_train(
    args: list[str], env: dict[str, str] | None = None, timeout: int = 600, address_space: int | None = None
) -> subprocess.CompletedProcess:
    """The CLI in a subprocess; `address_space`: its RLIMIT_AS in bytes (a host that runs out of memory)."""
    full_env = {**os.environ, **(env or {})}

    def limit() -> None:
        import resource

        if address_space is not None:
            resource.setrlimit(resource.RLIMIT_AS, (address_space, address_space))

    return subprocess.run(
        [sys.executable, "-m", "sekd.train", *args],
        cwd=ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
        preexec_fn=limit if address_space is not None else None,
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

    def kill(proc: subprocess.Popen, deadline: float) -> None:
        if proc.poll() is None:
            for pid in victims(proc.pid) if victims else [proc.pid]:
                os.kill(pid, signal.SIGKILL)

    return cli_until(args, ready, kill, env, timeout)


def cli_until(
    args: list[str],
    ready: Callable[[], bool],
    then: Callable[[subprocess.Popen, float], None],
    env: dict[str, str] | None,
    timeout: int,
) -> subprocess.CompletedProcess:
    """Start the real CLI, poll `ready()` every 10 ms, then do `then(proc, deadline)` to it and wait for it to
    end; its output goes through files (pipes could fill and block it)."""
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
            then(proc, deadline)
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

    def pause_and_act(proc: subprocess.Popen, deadline: float) -> None:
        assert proc.poll() is None, "the run ended before the fault"
        acted = False
        while not acted:
            assert time.time() < deadline, "the action never took"
            os.kill(proc.pid, signal.SIGSTOP)
            acted = action()
            os.kill(proc.pid, signal.SIGCONT)
            time.sleep(0 if acted else 0.02)

    return cli_until(args, ready, pause_and_act, env, timeout)


def injected(**env: str) -> dict[str, str]:
    """The environment that puts tests/inject/sitecustomize.py into the CLI, with its `env` (SEKD_TEST_*)."""
    return {**env, "PYTHONPATH": os.pathsep.join([str(INJECT), os.environ.get("PYTHONPATH", "")])}
