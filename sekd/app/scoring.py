"""The scoring stage: the run's model (the distilled student, or the pretrained student or teacher for
the score_* modes) through its eval suite; the metrics go to the record and to wandb's summary."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from sekd.core.errors import RunFault
from sekd.evaluation.task_files import TaskDataError

if TYPE_CHECKING:
    from sekd.app.compose import Job
    from sekd.app.tracking import Tracker


def scored_model(job: Job) -> str:
    """The model this run scores."""
    mode = job.cfg.mode
    if mode == "distill":
        return str(job.run.model)
    return job.student_path if mode == "score_student" else job.teacher_path


def score(job: Job, tracker: Tracker) -> dict[str, Any]:
    """lm-eval over eval.suite (nothing for eval=none); raw outputs go under the run's scores folder."""
    metrics = run_suite(job) if job.cfg.eval.suite != "none" else {}
    tracker.summary({f"eval/{k}": v for k, v in metrics.items()})
    return metrics


def run_suite(job: Job) -> dict[str, Any]:
    from sekd.models.loading import pick_device

    device = pick_device(job.cfg.eval.device, "eval.device")
    job.run.eval_dir.mkdir(parents=True, exist_ok=True)
    try:
        return score_suite(job, str(device))
    except TaskDataError as err:
        raise task_fault(job, err) from err


def task_fault(job: Job, err: TaskDataError) -> RunFault:
    """lm-eval failing on one of our tasks, in one line: the task, the cause, the model kept, what to do."""
    kept = (
        f"the trained student is kept ({job.run.model})"
        if job.cfg.mode == "distill"
        else f"the scored model is untouched ({scored_model(job)})"
    )
    return RunFault(
        f"lm-eval failed on task {err.task} (eval.suite={job.cfg.eval.suite}): {err.path} {err.problem}; {kept}; "
        f"remove {err.folder} (paths.cache/eval: it is built again from the corpus)"
    )


def score_suite(job: Job, device: str) -> dict[str, Any]:
    from sekd.evaluation.score import score_checkpoint
    from sekd.evaluation.suites import GSM8K_HELD_OUT

    cfg, e = job.cfg, job.cfg.eval
    return score_checkpoint(
        scored_model(job),
        job.run.eval_dir,
        suite=e.suite,
        split=e.split,
        artifacts_dir=Path(cfg.paths.cache) / "eval",
        batch_size=e.batch_size,
        limit=e.limit,
        device=device,
        seed=e.seed,
        gsm8k_validation_size=cfg.data.options.get("validation_size", GSM8K_HELD_OUT),
        dtype="bfloat16" if device.startswith("cuda") else "float32",
        verbose=cfg.logging.verbose,
    )
