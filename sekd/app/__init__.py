"""The app: one run's life, compose -> train -> score -> record (docs/architecture.md).

`sekd.train` is its command line (`sekd-train`, `python -m sekd.train`); `execute` runs one composed
config, in a Hydra job or called directly.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig

from sekd.app.chatter import quiet_libraries
from sekd.app.checks import validate
from sekd.app.compose import compose, fail, open_tracker
from sekd.app.faults import as_fault, fault_line, stop
from sekd.app.record import build_record, summary_line
from sekd.app.scoring import score
from sekd.app.training import train
from sekd.core.errors import ConfigError

if TYPE_CHECKING:
    from sekd.config.schema import RunConfig
    from sekd.stores.runs import RunDir


def execute(cfg: DictConfig, overrides: list[str] | None = None) -> dict[str, Any] | None:
    """Run one configured job end to end; returns its record (None when it was already done, or when
    stage=train only trained it). A refusal is one line and exit status 2 (`fail`); a fault while the run
    works (a full disk, a folder made read-only or removed) one line and exit status 3 (sekd/app/faults.py)."""
    verbose = bool(cfg.logging.get("verbose", False))
    quiet_libraries(verbose)
    at = Stage()
    try:
        return run_job(cfg, list(overrides or []), at)
    except ConfigError as err:  # e.g. an unreadable checkpoint.pt (sekd.training.checkpoint.CheckpointError)
        fail(err)
    except Exception as err:
        fault = as_fault(err)
        if fault is None:
            raise  # a bug: its traceback
        stop(fault_line(fault, at.cfg or validate(cfg), at.run, at.name), err, verbose)


@dataclass
class Stage:
    """Where the run is, for a fault's line: what it was doing, and its folder once composed."""

    name: str = "composing the run"
    cfg: RunConfig | None = None
    run: RunDir | None = None


def run_job(tree: DictConfig, overrides: list[str], at: Stage) -> dict[str, Any] | None:
    job = compose(tree, overrides)
    if job is None:
        return None
    at.cfg, at.run, at.name = job.cfg, job.run, "training"
    tracker = open_tracker(job)
    try:
        stats = train(job, tracker)
        job.dist.close()  # the ranks are done together; rank 0 alone scores and writes the record
        if not job.dist.is_main:
            return None
        if job.cfg.stage == "train" and job.cfg.mode == "distill":
            print(
                f"sekd: {job.run.name} seed={job.cfg.seed} trained -> {job.run.model} (stage=train: scoring left "
                "to a stage=score job)"
            )
            return None
        at.name = "scoring"
        metrics = score(job, tracker)
    finally:
        tracker.finish()
        job.dist.close()
    at.name = "writing the record"
    record = build_record(job, stats, metrics)
    job.run.write_record(record)
    print(summary_line(job, record))
    return record


@functools.cache  # once, as early as it can: the exit handlers added later run before it
def skip_exit_collection() -> None:
    """At exit, the interpreter's own garbage collections walk every object the libraries made (half a million
    once torch, transformers and lm-eval are in): 1-3 s a process. Frozen by an exit handler (gc.freeze),
    they are skipped. A run has written and closed its files by then, the other exit handlers (logging's,
    wandb's) still run, and Python never promised an object alive at exit its finalizer. Here, not in
    sekd/train.py: submitit pickles the app from `__main__`, and finds what it calls by its module."""
    import atexit
    import gc

    atexit.register(gc.freeze)
