"""Where this process sits in a run: its rank among how many, and where rank 0 listens (docs/slurm.md).

Read from the environment alone (nothing is started or joined here; sekd.distributed.process_group does the
init): torchrun's (or any launcher's) RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT; else Slurm's, one
task per rank (`srun`, or submitit's jobs with tasks_per_node > 1): SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID,
rank 0 listening on the first host of SLURM_JOB_NODELIST at a port derived from SLURM_JOB_ID, so every task
computes the same address alone (MASTER_ADDR/MASTER_PORT, when set, win); else one process. A one-task
Slurm job is one process, and so is a job's batch script (SLURM_PROCID=0 but no SLURM_STEP_ID): only the
tasks `srun` starts are ranks.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from typing import Iterator, Mapping, Optional

from sekd.core.errors import ConfigError

# Ports derived from a job id stay clear of the privileged range and of Linux's default ephemeral range
# (32768-60999), from which clients and other jobs take their ports.
PORT_BASE, PORT_SPAN = 20000, 12000


@dataclass(frozen=True)
class Launch:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    master_addr: Optional[str] = None
    master_port: Optional[int] = None

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def from_env(environ: Mapping[str, str] = os.environ) -> Launch:
    """This process's place, from torchrun's variables, else Slurm's (when the step has several tasks),
    else a single process."""
    if "RANK" in environ and "WORLD_SIZE" in environ:
        return _torchrun(environ)
    if _int(environ, "SLURM_NTASKS", 1) > 1 and "SLURM_PROCID" in environ and "SLURM_STEP_ID" in environ:
        return _slurm(environ)  # a task of an srun step; the batch script itself has no SLURM_STEP_ID
    return Launch()


def _torchrun(environ: Mapping[str, str]) -> Launch:
    return Launch(
        rank=_int(environ, "RANK"),
        world_size=_int(environ, "WORLD_SIZE"),
        local_rank=_int(environ, "LOCAL_RANK", 0),
        master_addr=environ.get("MASTER_ADDR"),
        master_port=_int(environ, "MASTER_PORT", None),
    )


def _slurm(environ: Mapping[str, str]) -> Launch:
    addr = environ.get("MASTER_ADDR") or first_host(environ.get("SLURM_JOB_NODELIST", ""))
    port = _int(environ, "MASTER_PORT", None)
    if port is None:
        port = job_port(environ.get("SLURM_JOB_ID", "0"))
    return Launch(
        rank=_int(environ, "SLURM_PROCID"),
        world_size=_int(environ, "SLURM_NTASKS"),
        local_rank=_int(environ, "SLURM_LOCALID", 0),
        master_addr=addr,
        master_port=port,
    )


def job_port(job_id: str) -> int:
    """The port rank 0 of Slurm job `job_id` listens on: the same for every task of the job, and
    different for jobs that may share a node (consecutive ids, array tasks: each has its own job id).
    A requeued job keeps its id, so its restarted tasks meet at the same port."""
    digits = re.sub(r"\D", "", job_id) or "0"
    return PORT_BASE + int(digits) % PORT_SPAN


def first_host(nodelist: str) -> Optional[str]:
    """The first host of a Slurm node list ("gpu[03-04,07],cpu1" -> "gpu03"): Slurm's own expansion
    (`scontrol show hostnames`) where the command exists, else the first entry read directly."""
    if not nodelist:
        return None
    if shutil.which("scontrol"):
        try:
            out = subprocess.run(
                ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=30, check=True
            ).stdout.split()
            if out:
                return out[0]
        except (subprocess.SubprocessError, OSError):
            pass  # fall back to reading the list ourselves
    return _first_host_simple(nodelist)


def _first_host_simple(nodelist: str) -> str:
    """The first host of a node list without Slurm: a prefix, then the start of its first range, if any."""
    m = re.match(r"([^,\[]*)(?:\[([^,\-\]]*))?", nodelist.strip())
    assert m is not None  # both groups may be empty: every string matches
    prefix, first = m.group(1), m.group(2)
    return prefix + (first or "")


def _int(environ: Mapping[str, str], key: str, default=...):
    value = environ.get(key)
    if value is None or value == "":
        if default is ...:
            raise ConfigError(f"environment variable {key} is not set (the launcher sets it for every rank)")
        return default
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment variable {key}={value!r} must be an integer") from None


def tell_launcher(line: str, environ: Mapping[str, str] = os.environ) -> None:
    """Under torchrun, `line` (a run fault's) in this rank's error file: torchrun always ends a failed run with
    its own ChildFailedError block and exit status 1, and with the file its "Root Cause" names the fault
    instead of a link. A file that cannot be written is left: the line is on stderr already."""
    path = environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    extra = {"py_callstack": line, "timestamp": str(int(time.time()))}  # py_callstack: shown as the traceback
    with contextlib.suppress(OSError):
        with open(path, "w") as f:
            json.dump({"message": {"message": line, "extraInfo": extra}}, f)


def tasks_per_node(gpus: int, tasks: Optional[int] = None) -> int:
    """How many tasks (ranks) a Slurm job starts on each node: `tasks` when given (resources.tasks_per_node,
    e.g. 2 one-CPU ranks on a CPU node), else one per GPU, and one on a node without GPUs."""
    if tasks is not None:
        return int(tasks)
    return max(int(gpus or 0), 1)


# What tells a library it is one of several processes: torchrun's (and torch elastic's) variables and the
# MPI launchers' that accelerate reads. Scoring runs on rank 0 alone after the ranks have finished training.
LAUNCH_VARIABLES = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "GROUP_WORLD_SIZE",
    "ROLE_RANK",
    "ROLE_NAME",
    "ROLE_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "TORCHELASTIC_RUN_ID",
    "TORCHELASTIC_RESTART_COUNT",
    "TORCHELASTIC_MAX_RESTARTS",
    "TORCHELASTIC_USE_AGENT_STORE",
    "TORCHELASTIC_ERROR_FILE",
    "PMI_RANK",
    "PMI_SIZE",
    "OMPI_COMM_WORLD_RANK",
    "OMPI_COMM_WORLD_SIZE",
    "OMPI_COMM_WORLD_LOCAL_RANK",
    "MV2_COMM_WORLD_RANK",
    "MV2_COMM_WORLD_SIZE",
    "SLURM_STEP_ID",
)


@contextlib.contextmanager
def one_process() -> Iterator[None]:
    """Inside the block this process is a world of one, whatever launched it: the launch variables are out
    of the environment (restored after). lm-eval's `Accelerator()` reads them and, after a torchrun run,
    would open a process group of WORLD_SIZE ranks that have already exited and wait at its first gather.
    Without SLURM_STEP_ID, `from_env` reads an srun task as one process too."""
    saved = {k: os.environ.pop(k) for k in LAUNCH_VARIABLES if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def card_index(local_rank: int, visible: int) -> int:
    """The CUDA ordinal a rank computes on: LOCAL_RANK modulo the cards it can see. A site that shows each
    node's ranks every card (torchrun, `srun --gpus-per-node`) gives local rank r card r; one that binds a
    card per task (`--gpus-per-task=1`, `--gpu-bind`) shows each task only its own, as cuda:0."""
    if visible < 1:
        raise ConfigError(
            "a CUDA device was asked for, but this process sees none (CUDA_VISIBLE_DEVICES is empty "
            "or the job was given no GPU)"
        )
    return local_rank % visible
