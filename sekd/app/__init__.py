"""The app: one run's life, compose -> train -> score -> record (docs/architecture.md).

`sekd.train` is its command line (`sekd-train`, `python -m sekd.train`); `execute` runs one composed
config, in a Hydra job or called directly.
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

from sekd.app.chatter import quiet_libraries
from sekd.app.compose import compose, fail, open_tracker
from sekd.app.record import build_record, summary_line
from sekd.app.scoring import score
from sekd.app.training import train
from sekd.core.errors import ConfigError


def execute(cfg: DictConfig, overrides: list[str] | None = None) -> dict[str, Any] | None:
    """Run one configured job end to end; returns its record (None when it was already done, or when
    stage=train only trained it). A refusal is one line and exit status 2 (`fail`)."""
    quiet_libraries(bool(cfg.logging.get("verbose", False)))
    try:
        job = compose(cfg, list(overrides or []))
        if job is None:
            return None
        tracker = open_tracker(job)
        try:
            stats = train(job, tracker)
            job.dist.close()  # the ranks are done together; rank 0 alone scores and writes the record
            if not job.dist.is_main:
                return None
            if job.cfg.stage == "train" and job.cfg.mode == "distill":
                print(
                    f"sekd: {job.cfg.preset} seed={job.cfg.seed} trained -> {job.run.model} (stage=train: scoring left "
                    "to a stage=score job)"
                )
                return None
            metrics = score(job, tracker)
        finally:
            tracker.finish()
            job.dist.close()
    except ConfigError as err:  # e.g. an unreadable checkpoint.pt (sekd.training.checkpoint.CheckpointError)
        fail(err)
    record = build_record(job, stats, metrics)
    job.run.write_record(record)
    print(summary_line(job, record))
    return record
