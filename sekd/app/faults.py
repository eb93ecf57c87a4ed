"""Faults that arrive while a run works: one line naming the file and the cause, and what to do.

A disk that fills, a folder made read-only or removed under a running job stop the run with
`sekd: run fault: <file>: <cause> (<key>); <remedy>: it resumes from step N` and exit status 3, apart
from a bad input's 2. What the run wrote is whole (sekd/core/files.py), so the same command picks up
from its last checkpoint. `SEKD_TRACEBACK=1` or `logging.verbose=true` brings the traceback back.
"""

from __future__ import annotations

import errno
import os
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from sekd.core.errors import FAULT_EXIT, RunFault
from sekd.core.files import storage_error
from sekd.core.memory import asked, exhausted, failed_card, peak

if TYPE_CHECKING:
    from sekd.config.schema import RunConfig
    from sekd.stores.runs import RunDir

CAUSES = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.ENOENT: "its folder was removed while the run worked",
}
REMEDIES = {
    errno.ENOSPC: "free space on that disk",
    errno.EDQUOT: "free space within the quota",
    errno.EROFS: "make that file system writable again",
    errno.EACCES: "give this user write access to its folder",
    errno.EPERM: "give this user write access to its folder",
    errno.ENOENT: "leave the run's folders in place while it works",
}


class OutOfMemory(RunFault):
    """Memory ran out outside the training step (which names its own: sekd/training/trainer.py): loading a
    model, scoring, building a cache. `fault_line` names the stage and its remedy."""

    def __init__(self, kind: str, err: BaseException) -> None:
        super().__init__(f"out of {kind} memory")
        self.kind, self.err = kind, err


def as_fault(err: BaseException) -> RunFault | OSError | None:
    """The run fault `err` is (a storage error, a removed run folder, memory run out), or None: a bug to show."""
    if isinstance(err, RunFault):
        return err
    kind = exhausted(err)
    if kind is not None:
        return OutOfMemory(kind, err)
    fault = storage_error(err)
    if fault is not None and fault.errno == errno.ENOENT and not folder_gone(fault.filename):
        return None  # a file that is simply missing, in a folder still there: not the storage's doing
    return fault


def folder_gone(path: str | None) -> bool:
    return path is not None and not Path(path).parent.is_dir()


def fault_line(fault: RunFault | OSError, cfg: RunConfig, run: RunDir | None, stage: str) -> str:
    """`<file>: <cause> (<key>, <free>); <remedy> and re-run the same command: <where it picks up>`."""
    if isinstance(fault, OutOfMemory):
        return f"{memory_line(fault, cfg, stage)}; re-run the same command: {picks_up(run, cfg)}"
    if isinstance(fault, RunFault):
        return f"{fault}; re-run the same command: {picks_up(run, cfg)}"
    code = fault.errno if fault.errno in CAUSES else errno.EACCES
    where = fault.filename or f"a file written while {stage}"
    key = key_of(fault.filename, cfg)
    about = ", ".join(x for x in (key, free_space(fault.filename, code)) if x)
    cause = CAUSES[code] + (f" ({about})" if about else "")
    trained = run is not None and run.trained()
    remedy = REMEDIES[code] + (needs(cfg, key, trained) if code in (errno.ENOSPC, errno.EDQUOT) else "")
    return f"{where}: {cause}; {remedy} and re-run the same command: {picks_up(run, cfg)}"


def memory_line(fault: OutOfMemory, cfg: RunConfig, stage: str) -> str:
    """`out of <card|host> memory [on <card>] while <stage> (<asked>, <peak>); <remedy for that stage>`."""
    import torch

    on_card = fault.kind == "card" and torch.cuda.is_available()
    device = failed_card(fault.err, torch.device("cuda", torch.cuda.current_device()) if on_card else None)
    facts = ", ".join(x for x in (asked(fault.err), peak(device, fault.kind)) if x)
    free = "free the card's memory" if fault.kind == "card" else "free host memory"
    if stage == "scoring":
        remedy = f"lower eval.batch_size (now {cfg.eval.batch_size}) or {free}"
    elif stage == "training" and fault.kind == "card":
        remedy = f"see `sekd-train <these overrides> --plan --card <its memory>` for what fits, or {free}"
    else:
        remedy = free if fault.kind == "card" else f"{free} or give the job more (resources.mem_gb under Slurm)"
    where = f" on {device}" if device is not None else ""
    return f"{fault}{where} while {stage} ({facts}); {remedy}"


def needs(cfg: RunConfig, key: str, trained: bool = False) -> str:
    """How much the run writes under `key`'s folder, roughly (sekd/app/preflight.py's estimate)."""
    from sekd.app.preflight import estimate

    need = estimate(cfg, trained).get(key.split("=")[0], 0)
    return f" (this run writes about {size(need)} there)" if need else ""


def key_of(path: str | None, cfg: RunConfig) -> str:
    """The config key whose folder holds `path`: paths.root, paths.cache or classes.cache."""
    if path is None:
        return ""
    folders = {"paths.root": cfg.paths.root, "paths.cache": cfg.paths.cache}
    if cfg.classes.cache not in (None, "auto"):
        folders["classes.cache"] = str(cfg.classes.cache)
    here = Path(path).resolve()
    for key, folder in folders.items():
        if here.is_relative_to(Path(folder).resolve()):
            return f"{key}={folder}"
    return ""


def free_space(path: str | None, code: int | None) -> str:
    """How much is free where `path` is, for a full disk: the first thing the user will ask."""
    if path is None or code not in (errno.ENOSPC, errno.EDQUOT):
        return ""
    folder = Path(path)
    while not folder.is_dir() and folder != folder.parent:
        folder = folder.parent
    return f"{size(shutil.disk_usage(folder).free)} free"


def size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def picks_up(run: RunDir | None, cfg: RunConfig) -> str:
    """Where the re-run starts: its last checkpoint's step, scoring alone, or the beginning."""
    if run is None:
        return "what was built whole is kept, and the rest is built again"
    if cfg.mode != "distill" or cfg.stage == "score":
        return "it scores again"
    if run.trained():
        return "the student is trained and saved; it only scores"
    step = checkpoint_step(run.checkpoint)
    return f"it resumes from step {step} ({run.checkpoint.name})" if step else "it trains from step 0"


def checkpoint_step(path: Path) -> int | None:
    """The step of a whole checkpoint.pt (None where there is none, or none that reads back)."""
    if not path.is_file():
        return None
    import torch

    try:
        ck = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return int(ck["progress"]["step"])
    except Exception:  # unreadable: the re-run says so in its own line (sekd.training.checkpoint)
        return None


def stop(line: str, err: BaseException, verbose: bool) -> NoReturn:
    """A single run stops with the one line and exit status 3. With SEKD_TRACEBACK=1 or
    logging.verbose=true, or in a multirun (Hydra records the cell's failure), the error is raised."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from sekd.distributed.launch import tell_launcher

    multirun = HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    quiet = getattr(err, "quiet", False)  # another rank's echo of rank 0's fault: rank 0 prints the line
    if not quiet:
        print(f"sekd: run fault: {line}", file=sys.stderr)
    if verbose or os.environ.get("SEKD_TRACEBACK", "") not in ("", "0") or multirun:
        raise err
    if not quiet:
        tell_launcher(f"sekd: run fault: {line}")
    sys.exit(FAULT_EXIT)
