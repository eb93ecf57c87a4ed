"""`sekd-train` (also `python -m sekd.train`): one run = validate -> build -> train -> score -> record.

    sekd-train experiment=se_kd seed=1338
    sekd-train -m experiment=full_kd,random_pos,se_kd seed=1337,1338,1339
"""
from __future__ import annotations

import json
import os
import resource
import socket
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from sekd.config import ConfigError, resolved, source_options, validate
from sekd.io import atomic_write_json


def fail(err: Exception) -> None:
    """A single run stops with one line and exit status 2. In a multirun the error is raised instead:
    Hydra records it as that cell's failure and the sweep goes on with the other cells."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        raise err
    print(f"sekd: config error: {err}", file=sys.stderr)
    _remove_empty_run_log()
    sys.exit(2)


def _remove_empty_run_log() -> None:
    """A refused run leaves nothing behind: Hydra made its output folder (hydra.run.dir, under
    <paths.root>/hydra/) and an empty train.log before the job started; remove them while empty."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return
    out = Path(HydraConfig.get().runtime.output_dir)
    for log in out.glob("*.log"):
        if log.stat().st_size == 0:
            log.unlink()
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()
        if out.parent.name == "hydra" and not any(out.parent.iterdir()):
            out.parent.rmdir()


def build_selector(cfg: DictConfig):
    from sekd.config import policy_options
    from sekd.kd.objective import Selector
    from sekd.selection.classes import build_classes
    from sekd.selection.criteria import CRITERIA
    from sekd.selection.policies import POLICIES
    from sekd.selection.signals import SIGNALS

    p = cfg.position
    policy = POLICIES.build(p.policy, **policy_options(cfg))
    criterion = CRITERIA.build(cfg.criterion.name, **dict(cfg.criterion.options or {}))
    classes = build_classes(cfg.classes.name, **dict(cfg.classes.options or {}))
    return Selector(signal=SIGNALS.get(p.signal) if p.signal else None, policy=policy, criterion=criterion,
                    signal_normalization=p.normalization, classes=classes)


def job_threads(cfg: DictConfig) -> int | None:
    """torch CPU threads: train.threads if set, else one per CPU Slurm allocated to the job (torch would
    otherwise use every core of the node), else torch's default."""
    if cfg.train.threads:
        return int(cfg.train.threads)
    return int(os.environ.get("SLURM_CPUS_PER_TASK", 0)) or None


def peak_memory_mb(device) -> float:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def distill(cfg: DictConfig, run, teacher_path: str, student_path: str, tok, tracker) -> dict[str, Any]:
    """Select samples, get class targets, train the student with the run's selective KD; save it in
    Hugging Face format under run/model. Returns training stats and costs (Table 7's columns)."""
    import torch

    from sekd.data.dataset import tokenizer_signature
    from sekd.models import load_model, model_signature, pick_device, pick_dtype, shared_vocab
    from sekd.scores import select_samples
    from sekd.selection.samples import SAMPLERS
    from sekd.trainer import SelectionTrace, Trainer

    t, trc = cfg.train, cfg.model.trust_remote_code
    device = pick_device(t.device)
    dtype = pick_dtype(t.precision, device)
    data = training_data(cfg, tok)
    n_train = len(data)
    torch.manual_seed(cfg.seed)
    selector = build_selector(cfg)
    student = load_model(student_path, device, torch.float32, trc)  # fp32 master weights; autocast computes
    V = shared_vocab(tok, student)
    teacher = None
    costs: dict[str, Any] = {"teacher_loaded": False, "prepass_seconds": 0.0, "prepass_reused": False,
                             "prepass_forward_tokens": {}, "cache_build_seconds": 0.0, "cache": None}

    def get_teacher():
        nonlocal teacher
        if teacher is None:
            teacher = load_model(teacher_path, device, dtype, trc).eval().requires_grad_(False)
            shared_vocab(tok, teacher)
            costs["teacher_loaded"] = True
        return teacher

    # sample axis: s_i, from a pre-pass of the frozen initial student (and teacher) or at random
    if cfg.samples.name != "all":
        needs = SAMPLERS.get(cfg.samples.name)
        wants_teacher = getattr(needs, "needs_teacher", False)
        picked = select_samples(
            cfg.samples.name, data, l=cfg.samples.l, seed=cfg.seed, student=student,
            teacher=get_teacher() if wants_teacher else None, student_sig=model_signature(student_path),
            teacher_sig=model_signature(teacher_path) if wants_teacher else "", tokenizer_sig=tokenizer_signature(tok),
            store_dir=Path(cfg.paths.cache) / "sample_scores", batch_size=cfg.samples.batch_size, device=str(device),
            vocab=V, temperature=t.temperature)
        data = data.subset(picked.indices)
        atomic_write_json(run.path / "samples.json", {"selector": cfg.samples.name, "l": cfg.samples.l,
                                                      "kept": data.sample_ids})  # which samples training saw
        costs.update(prepass_seconds=picked.prepass_seconds, prepass_reused=picked.reused,
                     prepass_forward_tokens=picked.forward_tokens)

    # class axis from the offline cache: C_t and p~ per sample, so training needs no teacher
    cache = None
    if cfg.classes.cache is not None:
        cache = open_teacher_cache(cfg, data, teacher_path, tok, V, get_teacher, costs)

    needs_teacher = (t.lam > 0 and cache is None) or selector.needs_teacher_everywhere
    if not needs_teacher:
        teacher = None  # built the cache or scored samples; not needed to train
    trace = SelectionTrace(run.trace, t.trace_selection_steps) if t.trace_selection_steps else None
    trainer = Trainer(student=student, teacher=get_teacher() if needs_teacher else None, data=data,
                      selector=selector, train_cfg=t, vocab=V, seed=cfg.seed, run=run, tracker=tracker,
                      device=device, dtype=dtype, trace=trace, cache=cache, on_policy=on_policy(cfg, data, tok))
    prog = trainer.fit()

    tmp = run.path / "model.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    student.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    shutil.rmtree(run.model, ignore_errors=True)
    tmp.rename(run.model)
    stats = {"tokens_seen": prog.tokens_seen, "tokens_supervised": prog.tokens_supervised, "steps": prog.step,
             "train_samples": len(data), "available_samples": n_train, "peak_memory_mb": peak_memory_mb(device),
             "on_policy_batches": prog.on_policy_batches,
             "costs": {**costs, "cache_bytes_read": cache.bytes_read if cache is not None else 0,
                       # every token the teacher ran over: training, sample pre-pass, cache construction
                       "teacher_forward_tokens": prog.teacher_tokens + costs["prepass_forward_tokens"].get("teacher", 0)
                       + costs.get("cache_build_teacher_tokens", 0)}}
    run.checkpoint.unlink(missing_ok=True)  # the final model supersedes it
    atomic_write_json(run.path / "train_stats.json", stats)
    return stats


def training_data(cfg: DictConfig, tok):
    """The train split: packed documents (general-purpose) or one problem per row (task-specific)."""
    from sekd.config import is_task_data

    cache_dir = Path(cfg.paths.cache) / "data"
    if is_task_data(cfg):
        from sekd.data.qa import build_qa

        return build_qa(cfg.data.name, "train", tok, seq_len=cfg.data.seq_len, cache_dir=cache_dir,
                        max_samples=cfg.data.get("max_samples"), separator=cfg.data.separator, **source_options(cfg))
    from sekd.data.dataset import build_packed

    return build_packed(cfg.data.name, "train", tok, seq_len=cfg.data.seq_len, token_budget=cfg.data.token_budget,
                        cache_dir=cache_dir, separator=cfg.data.separator, **source_options(cfg))


def on_policy(cfg: DictConfig, data, tok):
    """regime=on_policy: the kept samples' prompts, answered by the student (None off-policy)."""
    r = cfg.regime
    if r.name != "on_policy":
        return None
    from sekd.data.dataset import separator_id
    from sekd.data.qa import prompt_ids
    from sekd.trainer import OnPolicy

    stop = separator_id(tok, cfg.data.separator, ends="an answer")  # the token the task rows end answers with
    return OnPolicy(prompts=lambda idx: [prompt_ids(data, i) for i in idx], pad_id=tok.eos_token_id, eos_id=stop,
                    mix=float(r.mix), temperature=float(r.temperature), top_p=float(r.top_p),
                    max_new_tokens=int(r.max_new_tokens))


def cache_expectation(cfg: DictConfig, teacher_path: str | None, tok, data=None) -> dict[str, Any]:
    """Every signature field that changes the draws, as this run would build them (docs/method.md §9):
    format, teacher (None: not resolved yet, checked later), tokenizer, vocabulary, T, N, the draw seed
    (the run's own, so seeds do not share draws) and, given the data the cache must cover, its identity
    and sequence length. Not the builder's dtype or device, nor the number of shards."""
    from sekd.cache.store import FORMAT, data_signature
    from sekd.data.dataset import tokenizer_signature
    from sekd.models import model_signature

    expect = {"format": FORMAT, "tokenizer": tokenizer_signature(tok), "vocab_size": len(tok),
              "temperature": float(cfg.train.temperature), "n_draws": int(cfg.classes.options.get("n_draws", 64)),
              "seed": int(cfg.seed)}
    if teacher_path is not None:
        expect["teacher"] = model_signature(teacher_path)
    if data is not None:
        expect.update(data=data_signature(data.sample_ids), seq_len=int(data.seq_len))
    return expect


def run_tokenizer(cfg: DictConfig):
    """The run's tokenizer, without building or loading any model (the embedded pair's is built alone)."""
    from sekd.models import load_tokenizer

    m = cfg.model
    if m.source == "embedded":
        from sekd.embedded.build import tokenizer

        return load_tokenizer(str(tokenizer(Path(cfg.paths.cache) / "embedded", int(m.embedded.vocab_size))))
    path = str(m.tokenizer or m.student)
    try:
        return load_tokenizer(path, m.trust_remote_code)
    except (OSError, ValueError, TypeError) as err:
        raise ConfigError(f"model.tokenizer={path!r}: cannot load its tokenizer ({type(err).__name__})") from None


def check_cache_before_models(cfg: DictConfig) -> None:
    """A cache folder named by classes.cache, checked before any model is built or loaded: the tokenizer
    (cheap) packs the run's training data, and the cache's signature (all but the teacher, checked once
    the pair is resolved) and its sample ids must match that data."""
    if cfg.mode != "distill" or cfg.stage == "score" or cfg.classes.cache in (None, "auto"):
        return
    from sekd.cache.store import CacheError, TeacherCache
    from sekd.data.sources import DataError

    tok = run_tokenizer(cfg)
    try:
        data = training_data(cfg, tok)
    except DataError as err:
        raise ConfigError(str(err)) from None
    try:
        TeacherCache.open(cfg.classes.cache, expect=cache_expectation(cfg, None, tok, data), sample_ids=data.sample_ids)
    except CacheError as err:
        raise ConfigError(f"classes.cache: {err}") from None


def open_teacher_cache(cfg: DictConfig, data, teacher_path: str, tok, V: int, get_teacher, costs: dict):
    """The run's offline teacher cache, for `data` (the samples it trains on). `auto` builds (or
    finishes) one keyed by its whole signature, the seed and these samples included; a folder is opened
    as it is (its data was checked against the whole train split before the models loaded). Either way
    a mismatch is refused in one line."""
    import hashlib
    import time as _time

    from sekd.cache.build import build_cache
    from sekd.cache.store import CacheError, TeacherCache

    if cfg.classes.cache == "auto":
        expect = cache_expectation(cfg, teacher_path, tok, data)
        key = hashlib.sha256(json.dumps(expect, sort_keys=True).encode())
        path = Path(cfg.paths.cache) / "teacher_cache" / key.hexdigest()[:16]
        try:  # a finished cache for these samples: reuse it, the teacher stays unloaded
            TeacherCache.open(path, expect=expect, sample_ids=data.sample_ids)
        except CacheError:
            t0 = _time.time()
            teacher = get_teacher()
            try:  # resumes a killed build, rebuilds a corrupt shard; refuses an edited manifest
                build_cache(teacher, data, path, teacher_name=expect["teacher"], tokenizer_sig=expect["tokenizer"],
                            n_draws=expect["n_draws"], temperature=expect["temperature"], seed=expect["seed"],
                            vocab_size=V, device=str(next(teacher.parameters()).device),
                            batch_size=cfg.samples.batch_size)
            except CacheError as err:
                raise ConfigError(f"classes.cache: {err}") from None
            costs["cache_build_seconds"] = round(_time.time() - t0, 2)
            costs["cache_build_teacher_tokens"] = int(data.input_ids.numel())
    else:
        path = Path(cfg.classes.cache)
        expect = cache_expectation(cfg, teacher_path, tok)
    costs["cache"] = str(path)
    try:
        return TeacherCache.open(path, expect=expect, sample_ids=data.sample_ids)
    except CacheError as err:
        raise ConfigError(f"classes.cache: {err}") from None


def built_since(t: float, *folders: str) -> bool:
    """Did resolve_pair build (pretrain, fine-tune) one of `folders` after time t? An embedded model folder's
    inputs.json is written when its build ends; a hub model or a reused folder is older or has none."""
    marks = [Path(f) / "inputs.json" for f in folders]
    return any(m.is_file() and m.stat().st_mtime >= t for m in marks)


def execute(cfg: DictConfig, overrides: list[str] | None = None) -> dict[str, Any] | None:
    """Run one configured job end to end; returns its record (None when it was already done)."""
    try:
        validate(cfg)
    except ConfigError as err:
        fail(err)
    from sekd.models import check_environment, check_same_tokenizer, resolve_pair
    from sekd.config import run_dir
    from sekd.run import RunDir, git_commit, is_finished
    from sekd.tracking import Tracker

    if is_finished(cfg):
        what = "trained (model/ exists)" if cfg.stage == "train" else "done (record.json exists)"
        print(f"sekd: {run_dir(cfg)} is already {what}; skipping. Use force=true to redo it.")
        return None
    run = RunDir(cfg)
    if cfg.stage == "score" and cfg.mode == "distill" and not run.trained():
        fail(ConfigError(f"stage=score: {run.path} holds no trained student yet; run this cell with stage=train "
                         "(or stage=all) first"))
    try:
        check_environment(cfg)  # CUDA, and models on local disk when offline: before anything loads
    except ConfigError as err:
        fail(err)
    threads = job_threads(cfg)
    if threads:
        import torch

        torch.set_num_threads(threads)
    t0 = time.time()
    try:
        check_cache_before_models(cfg)  # a cache of other data, seed, N...: refused before the pair is built
    except ConfigError as err:
        fail(err)
    t_pair = time.time()
    teacher_path, student_path, tok_path = resolve_pair(cfg)
    pretrain_s = round(time.time() - t_pair, 2) if built_since(t_pair, teacher_path, student_path) else 0.0
    try:
        tok = check_same_tokenizer(teacher_path, student_path, tok_path, cfg.model.trust_remote_code)
        if cfg.mode == "distill" and cfg.classes.cache not in (None, "auto"):  # refuse a wrong cache up front
            from sekd.cache.store import CacheError, TeacherCache

            try:
                TeacherCache.open(cfg.classes.cache, expect=cache_expectation(cfg, teacher_path, tok))
            except CacheError as err:
                raise ConfigError(f"classes.cache: {err}") from None
    except ConfigError as err:
        fail(err)
    run.write_config(cfg, overrides or [])  # the run's folder appears only once every check has passed

    tracker = Tracker(cfg.logging.wandb, run.path, name=run.path.name, config=resolved(cfg, keep_env=True),
                      project=cfg.logging.project, entity=cfg.logging.entity,
                      group=cfg.logging.group or cfg.preset, run_id=f"{cfg.preset}-s{cfg.seed}-{run.hash}")
    stats: dict[str, Any] = {"tokens_seen": 0, "tokens_supervised": 0, "steps": 0, "train_time_s": 0.0,
                             "costs": {"pretrain_seconds": pretrain_s}}
    try:
        if cfg.mode == "distill":
            from sekd.io import folder_lock

            # two sweeps scoring the same student (T2 on test, V1 on validation) may both reach here at
            # once: one trains, the other waits and then only scores. The lock file goes on release (a
            # crashed holder's with the next run), and so do the temporary files a killed run left.
            with folder_lock(run.path / ".train.lock"):
                run.sweep()
                if run.trained() and not cfg.force:
                    stats = json.loads(run.train_stats.read_text())  # trained before (another job or eval)
                else:
                    if cfg.force:
                        run.start_over()  # force=true trains from scratch, never from a checkpoint
                    t_distill = time.time()
                    try:
                        stats = distill(cfg, run, teacher_path, student_path, tok, tracker)
                    except ConfigError as err:  # e.g. an unreadable checkpoint.pt (sekd.trainer.CheckpointError)
                        fail(err)
                    # distillation alone: pretraining, the sample pre-pass and the cache build are costs of their own
                    c = stats["costs"]
                    c["pretrain_seconds"] = pretrain_s
                    stats["train_time_s"] = round(time.time() - t_distill - c["prepass_seconds"]
                                                  - c["cache_build_seconds"], 2)
                    atomic_write_json(run.train_stats, stats)
            scored = str(run.model)
            if cfg.stage == "train":
                print(f"sekd: {cfg.preset} seed={cfg.seed} trained -> {run.model} (stage=train: scoring left "
                      "to a stage=score job)")
                return None
        else:
            scored = student_path if cfg.mode == "score_student" else teacher_path

        metrics: dict[str, Any] = {}
        if cfg.eval.suite != "none":
            from sekd.evaluation.score import score_checkpoint
            from sekd.evaluation.suites import GSM8K_HELD_OUT
            from sekd.models import pick_device

            device = pick_device(cfg.eval.device, "eval.device")
            run.scores.mkdir(parents=True, exist_ok=True)
            metrics = score_checkpoint(scored, run.scores, suite=cfg.eval.suite, split=cfg.eval.split,
                                       cache_dir=Path(cfg.paths.cache) / "eval", batch_size=cfg.eval.batch_size,
                                       limit=cfg.eval.limit, device=str(device), seed=cfg.eval.seed,
                                       gsm8k_validation_size=cfg.data.get("validation_size", GSM8K_HELD_OUT),
                                       dtype="bfloat16" if device.type == "cuda" else "float32")
        tracker.summary({f"eval/{k}": v for k, v in metrics.items()})
    finally:
        tracker.finish()

    kept = resolved(cfg, keep_env=True)  # what records say: an ${oc.env:...} value stays its text
    record = {
        "preset": kept["preset"], "label": kept["label"], "mode": kept["mode"], "seed": cfg.seed, "config_hash": run.hash,
        "stage": kept["stage"], "run_dir": str(run.path), "scores_dir": str(run.scores), "model": scored, "metrics": metrics,
        "tokens_seen": stats.get("tokens_seen", 0), "tokens_supervised": stats.get("tokens_supervised", 0),
        "steps": stats.get("steps", 0), "train_time_s": stats.get("train_time_s"), "costs": stats.get("costs", {}),
        "train_samples": stats.get("train_samples"), "available_samples": stats.get("available_samples"),
        "on_policy_batches": stats.get("on_policy_batches", 0),
        "wall_time_s": round(time.time() - t0, 2),
        "peak_memory_mb": stats.get("peak_memory_mb") or round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "git_commit": git_commit(), "overrides": list(overrides or []), "config": kept,
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"), "slurm_array_task_id": os.environ.get("SLURM_ARRAY_TASK_ID"),
        "host": socket.gethostname(),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    run.write_record(record)
    print(f"sekd: {cfg.preset} seed={cfg.seed} -> {run.record}  " +
          "  ".join(f"{k}={v:.3g}" for k, v in metrics.items() if k in ("acc", "ppl", "ece")))
    return record


CONF = str(Path(__file__).resolve().parent.parent / "conf")  # the repo's conf/ (editable install)


@hydra.main(version_base="1.3", config_path=CONF, config_name="config")
def app(cfg: DictConfig) -> None:
    """The Hydra app: one job, or one cell of a multirun."""
    from hydra.core.hydra_config import HydraConfig

    # as typed: reading the items would resolve an ${oc.env:...} in them, and the records must not hold it
    execute(cfg, OmegaConf.to_container(HydraConfig.get().overrides.task, resolve=False))


def main() -> None:
    """`sekd-train`: a bad command line (an unknown key, a value out of range) stops with one line and
    exit status 2 before Hydra starts a job or makes its folder; then Hydra runs the app."""
    from sekd.config import check_command_line

    try:
        check_command_line(sys.argv[1:], CONF, "config")
    except ConfigError as err:
        fail(err)
    app()


if __name__ == "__main__":
    main()
