"""The record: one JSON per scored run (record.json), what the reports and tables read."""

from __future__ import annotations

import os
import resource
import socket
import time
from typing import TYPE_CHECKING, Any

from sekd import __version__
from sekd.app.scoring import scored_model
from sekd.plugins import used
from sekd.stores.runs import changes, resolved

if TYPE_CHECKING:
    from sekd.app.compose import Job


def build_record(job: Job, stats: dict[str, Any], metrics: dict[str, Any]) -> dict[str, Any]:
    """The run's config (an ${oc.env:...} value stays its text), metrics, training stats and costs, and
    where and when it ran."""
    from sekd.stores.runs import git_commit

    cfg, run = job.cfg, job.run
    kept = resolved(job.tree, keep_env=True)
    return {
        "name": run.name,  # the preset, and the overrides that change its settings (sekd.stores.runs.run_name)
        "changes": changes(job.overrides),
        "preset": kept["preset"],
        "label": kept["label"],
        "mode": kept["mode"],
        "seed": cfg.seed,
        "config_hash": run.hash,
        "stage": kept["stage"],
        "run_dir": str(run.path),
        "eval_dir": str(run.eval_dir),
        "model": scored_model(job),
        "metrics": metrics,
        **stats_fields(stats),
        "wall_time_s": round(time.time() - job.started, 2),
        "peak_memory_mb": stats.get("peak_memory_mb")
        or round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),  # Linux reports KiB
        "sekd_version": __version__,
        "plugins": used(kept),
        "git_commit": git_commit(),
        "overrides": list(job.overrides),
        "config": kept,
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "slurm_array_task_id": os.environ.get("SLURM_ARRAY_TASK_ID"),
        "host": socket.gethostname(),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def stats_fields(stats: dict[str, Any]) -> dict[str, Any]:
    """The training stats a record carries (zeros and None for a run that trained nothing)."""
    return {
        "tokens_seen": stats.get("tokens_seen", 0),
        "tokens_supervised": stats.get("tokens_supervised", 0),
        "steps": stats.get("steps", 0),
        "train_time_s": stats.get("train_time_s"),
        "costs": stats.get("costs", {}),
        "train_samples": stats.get("train_samples"),
        "available_samples": stats.get("available_samples"),
        "on_policy_batches": stats.get("on_policy_batches", 0),
        **throughput(stats),
    }


def throughput(stats: dict[str, Any]) -> dict[str, Any]:
    """World size, devices (rank 0's student and teacher) and training tokens per second per device, so
    runs compare across world sizes (T7, the Pareto plot). Devices: every rank's, and the teacher's own
    where model.teacher_device gave it one. Stats from before these existed ran one process."""
    world = int(stats.get("world_size") or 1)
    devices = stats.get("devices") or {}
    # `cuda` and `cuda:0` in stats written before devices were spelled one way: one card (one process's
    # current card is cuda:0)
    same = {str(d).replace("cuda:0", "cuda") for d in devices.values() if d is not None}
    own_teacher = devices.get("teacher") is not None and len(same) > 1
    count = world * (2 if own_teacher else 1)
    seconds, tokens = stats.get("train_time_s"), stats.get("tokens_seen", 0)
    rate = round(tokens / seconds / count, 2) if seconds and tokens else None
    return {
        "world_size": world,
        "devices": devices or None,
        "device_count": count,
        "tokens_per_s_per_device": rate,
        "peak_memory_mb_per_device": stats.get("peak_memory_mb_per_device"),
    }


def summary_line(job: Job, record: dict[str, Any]) -> str:
    """What the run prints last: where its record went and its headline metrics."""
    return f"sekd: {job.run.name} seed={job.cfg.seed} -> {job.run.record}  " + "  ".join(
        f"{k}={v:.3g}" for k, v in record["metrics"].items() if k in ("acc", "ppl", "ece")
    )
