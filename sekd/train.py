"""`sekd-train` (also `python -m sekd.train`): one run = validate -> build -> train -> score -> record.

    sekd-train experiment=se_kd seed=1338
    sekd-train -m experiment=full_kd,random_pos,se_kd seed=1337,1338,1339
"""
from __future__ import annotations

import resource
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from sekd.config import ConfigError, resolved, source_options, validate


def fail(err: Exception) -> None:
    print(f"sekd: config error: {err}", file=sys.stderr)
    sys.exit(2)


def build_selector(cfg: DictConfig):
    from sekd.config import policy_options
    from sekd.kd.objective import Selector
    from sekd.selection.criteria import CRITERIA
    from sekd.selection.policies import POLICIES
    from sekd.selection.signals import SIGNALS

    p = cfg.position
    policy = POLICIES.build(p.policy, **policy_options(cfg))
    criterion = CRITERIA.build(cfg.criterion.name, **dict(cfg.criterion.options or {}))
    return Selector(signal=SIGNALS.get(p.signal) if p.signal else None, policy=policy, criterion=criterion,
                    signal_normalization=p.normalization)


def peak_memory_mb(device) -> float:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def distill(cfg: DictConfig, run, teacher_path: str, student_path: str, tok, tracker) -> dict[str, Any]:
    """Train the student with the run's selective KD; save it in Hugging Face format under run/model."""
    import torch

    from sekd.data.dataset import build_packed
    from sekd.models import load_model, pick_device, pick_dtype, shared_vocab
    from sekd.trainer import SelectionTrace, Trainer

    t = cfg.train
    device = pick_device(t.device)
    dtype = pick_dtype(t.precision, device)
    data = build_packed(cfg.data.name, "train", tok, seq_len=cfg.data.seq_len, token_budget=cfg.data.token_budget,
                        cache_dir=Path(cfg.paths.cache) / "data", separator=cfg.data.separator, **source_options(cfg))
    torch.manual_seed(cfg.seed)
    trc = cfg.model.trust_remote_code
    student = load_model(student_path, device, torch.float32, trc)  # fp32 master weights; autocast computes
    need_teacher = t.lam > 0 or build_selector(cfg).needs_teacher_everywhere
    teacher = load_model(teacher_path, device, dtype, trc).eval().requires_grad_(False) if need_teacher else None
    V = shared_vocab(tok, *(m for m in (student, teacher) if m is not None))
    trace = SelectionTrace(run.trace, t.trace_selection_steps) if t.trace_selection_steps else None
    trainer = Trainer(student=student, teacher=teacher, data=data, selector=build_selector(cfg), train_cfg=t,
                      vocab=V, seed=cfg.seed, run=run, tracker=tracker, device=device, dtype=dtype, trace=trace)
    prog = trainer.fit()

    tmp = run.path / "model.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    student.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    shutil.rmtree(run.model, ignore_errors=True)
    tmp.rename(run.model)
    stats = {"tokens_seen": prog.tokens_seen, "tokens_supervised": prog.tokens_supervised, "steps": prog.step,
             "train_samples": len(data), "peak_memory_mb": peak_memory_mb(device)}
    run.checkpoint.unlink(missing_ok=True)  # the final model supersedes it
    (run.path / "train_stats.json").write_text(__import__("json").dumps(stats))
    return stats


def execute(cfg: DictConfig, overrides: list[str] | None = None) -> dict[str, Any] | None:
    """Run one configured job end to end; returns its record (None when it was already done)."""
    import json

    try:
        validate(cfg)
    except ConfigError as err:
        fail(err)
    from sekd.models import check_same_tokenizer, resolve_pair
    from sekd.run import RunDir, git_commit
    from sekd.tracking import Tracker

    run = RunDir(cfg)
    if run.done() and not cfg.force:
        print(f"sekd: {run.path} is already done (record.json exists); skipping. Use force=true to redo it.")
        return None
    if cfg.train.threads:
        import torch

        torch.set_num_threads(cfg.train.threads)
    t0 = time.time()
    run.write_config(cfg, overrides or [])
    teacher_path, student_path, tok_path = resolve_pair(cfg)
    try:
        tok = check_same_tokenizer(teacher_path, student_path, tok_path, cfg.model.trust_remote_code)
    except ConfigError as err:
        fail(err)

    tracker = Tracker(cfg.logging.wandb, run.path, name=run.path.name, config=resolved(cfg),
                      project=cfg.logging.project, entity=cfg.logging.entity,
                      group=cfg.logging.group or cfg.preset, run_id=f"{cfg.preset}-s{cfg.seed}-{run.hash}")
    stats: dict[str, Any] = {"tokens_seen": 0, "tokens_supervised": 0, "steps": 0}
    try:
        if cfg.mode == "distill":
            stats_file = run.path / "train_stats.json"
            if (run.model / "config.json").exists() and stats_file.exists():
                stats = json.loads(stats_file.read_text())  # trained before; only scoring was left
            else:
                stats = distill(cfg, run, teacher_path, student_path, tok, tracker)
            scored = str(run.model)
        else:
            scored = student_path if cfg.mode == "score_student" else teacher_path
        t_train = time.time() - t0

        metrics: dict[str, Any] = {}
        if cfg.eval.suite != "none":
            from sekd.evaluation.score import score_checkpoint
            from sekd.models import pick_device

            metrics = score_checkpoint(scored, run.lm_eval.parent, suite=cfg.eval.suite, split=cfg.eval.split,
                                       cache_dir=Path(cfg.paths.cache) / "eval", batch_size=cfg.eval.batch_size,
                                       limit=cfg.eval.limit, device=str(pick_device(cfg.eval.device)), seed=cfg.seed)
        tracker.summary({f"eval/{k}": v for k, v in metrics.items()})
    finally:
        tracker.finish()

    record = {
        "preset": cfg.preset, "label": cfg.label, "mode": cfg.mode, "seed": cfg.seed, "config_hash": run.hash,
        "run_dir": str(run.path), "model": scored, "metrics": metrics,
        "tokens_seen": stats.get("tokens_seen", 0), "tokens_supervised": stats.get("tokens_supervised", 0),
        "steps": stats.get("steps", 0), "train_time_s": round(t_train, 2),
        "wall_time_s": round(time.time() - t0, 2),
        "peak_memory_mb": stats.get("peak_memory_mb") or round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "git_commit": git_commit(), "overrides": list(overrides or []), "config": resolved(cfg),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    run.write_record(record)
    print(f"sekd: {cfg.preset} seed={cfg.seed} -> {run.record}  " +
          "  ".join(f"{k}={v:.3g}" for k, v in metrics.items() if k in ("acc", "ppl", "ece")))
    return record


CONF = str(Path(__file__).resolve().parent.parent / "conf")  # the repo's conf/ (editable install)


@hydra.main(version_base="1.3", config_path=CONF, config_name="config")
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    execute(cfg, list(HydraConfig.get().overrides.task))


if __name__ == "__main__":
    main()
