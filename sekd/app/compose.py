"""Composing a run: everything before anything trains.

Each check comes before the costlier step after it (the config, then the environment, then a named
cache against the tokenizer and data, then the teacher/student pair), so a run that would fail is
refused in one line before any model is built or loaded, and its folder appears only once every
check has passed. The result, a `Job`, holds what the training and scoring stages need.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from omegaconf import DictConfig

from sekd.app.training import cache_expectation, training_data
from sekd.app.checks import validate
from sekd.core.errors import ConfigError
from sekd.stores.runs import file_safe, resolved, run_dir
from sekd.config.schema import RunConfig

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from sekd.app.tracking import Tracker
    from sekd.distributed.launch import Launch
    from sekd.distributed.process_group import Dist
    from sekd.stores.runs import RunDir


def fail(err: Exception) -> NoReturn:
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


def _one_process() -> Dist:
    from sekd.distributed.process_group import Dist

    return Dist.single()


@dataclass
class Job:
    """One composed run: its config and folder, the resolved pair and their shared tokenizer."""

    cfg: RunConfig  # the typed config every stage reads
    tree: DictConfig  # Hydra's composed tree: the hashes naming the run's folders, config.yaml, the record
    overrides: list[str]
    run: RunDir
    teacher_path: str  # model folders (or hub names)
    student_path: str
    tok: PreTrainedTokenizerBase
    pretrain_s: float  # building the embedded pair: a cost of its own, never training time
    started: float  # time.time() when the run's work began (the record's wall_time_s)
    dist: Dist = field(default_factory=_one_process)  # this process's rank


def compose(tree: DictConfig, overrides: list[str]) -> Job | None:
    """Check and resolve everything the run needs; None when the cell has nothing left to do.
    Hydra's tree is converted once, here, to the typed config the stages read. A refusal raises
    ConfigError (one line, naming the key or file)."""
    from sekd.app.preflight import preflight
    from sekd.models.loading import check_environment
    from sekd.stores.runs import RunDir

    cfg = validate(tree)
    launch = check_launch(cfg)
    if already_finished(tree):
        return None
    run = RunDir(tree, overrides)
    check_stage(cfg, run)
    check_environment(cfg)  # CUDA, and models on local disk when offline: before anything loads
    preflight(cfg, run)  # every folder the run writes: writable, with room for what it will write
    set_threads(cfg)
    started = time.time()
    check_cache_before_models(cfg)  # a cache of other data, seed, N...: refused before the pair is built
    dist = join(cfg, launch)
    try:
        with dist.main_first():  # rank 0 builds (the embedded pair) and stores; the others then find it built
            teacher_path, student_path, tok, pretrain_s = resolve(cfg)
        # the run's folder appears only once every check has passed; a fault there stops every rank
        dist.main_writes(lambda: run.write_config(tree, overrides))
    except BaseException:
        dist.close()  # a multirun's next cell joins a group of its own
        raise
    return Job(
        cfg=cfg,
        tree=tree,
        overrides=overrides,
        run=run,
        teacher_path=teacher_path,
        student_path=student_path,
        tok=tok,
        pretrain_s=pretrain_s,
        started=started,
        dist=dist,
    )


def check_launch(cfg: RunConfig) -> Launch:
    """The launcher's environment (sekd.distributed.launch) against train.distributed: ddp needs ranks a launcher
    started (torchrun, a Slurm job's tasks); ranks need a distributed mode, or each would train the whole
    run alone and write the same files."""
    from sekd.distributed.launch import from_env

    mode = cfg.train.distributed
    if mode == "fsdp":
        check_fsdp(cfg)  # the config alone: refused before the environment is asked
    launch = from_env()
    started = launch.distributed or "RANK" in os.environ or "SLURM_PROCID" in os.environ
    if mode != "none" and not started:
        raise ConfigError(
            f"train.distributed={mode} needs a launcher's environment (RANK, WORLD_SIZE, ...): start "
            f"it with `torchrun --nproc_per_node N -m sekd.train ...` or as a Slurm job's tasks; this "
            "process is alone (world size 1)"
        )
    if mode == "none" and launch.distributed:
        raise ConfigError(
            f"train.distributed=none but this process is rank {launch.rank} of {launch.world_size} "
            "(a launcher started several); set train.distributed=ddp, or start one process"
        )
    if mode == "fsdp" and launch.world_size < 2:  # one rank: nothing to shard over
        raise ConfigError(
            "train.distributed=fsdp shards the models over ranks, but this process is rank 0 of 1: "
            "start at least 2 (torchrun --nproc_per_node 2 or more), or set train.distributed=none"
        )
    if mode == "fsdp":  # a mesh that does not cover the ranks: refused before any model loads
        from sekd.distributed.fsdp import mesh_shape

        mesh_shape(cfg.train.fsdp.mesh, launch.world_size)
    return launch


def check_fsdp(cfg: RunConfig) -> None:
    """What train.distributed=fsdp does not do (yet), refused in one line naming the key. (A fixed
    model.teacher_device with any distributed mode is refused by sekd.app.checks.check_placement.)"""
    import torch

    from sekd.distributed.fsdp import fsdp_support

    too_old = fsdp_support(torch.__version__)  # FSDP2's switches sekd.distributed.fsdp uses came in one release
    if too_old:
        raise ConfigError(too_old)
    if cfg.regime.name == "on_policy":  # each rank holds a shard: generation would need the whole student
        raise ConfigError(
            "regime=on_policy with train.distributed=fsdp: the student's generation needs its whole "
            "weights on each rank; use train.distributed=ddp"
        )
    if cfg.train.optimizer == "adam8bit":  # bitsandbytes' kernels are not run on sharded DTensors here
        raise ConfigError(
            "train.optimizer=adam8bit with train.distributed=fsdp: sekd does not run the 8-bit "
            "optimizer on sharded (DTensor) weights; use train.optimizer=adamw or train.distributed=ddp"
        )


def join(cfg: RunConfig, launch: Launch) -> Dist:
    """This process's place in the run: the process group of the launcher's ranks (gloo on CPU, nccl on
    CUDA: LOCAL_RANK's card, sekd.distributed.launch.card_index), or Dist.single() for one process. The group lives for one run: `execute`
    closes it (Dist.close) when the run's training ends, so each cell of a multirun under torchrun
    joins a group of its own, one after another."""
    from sekd.distributed.process_group import Dist, init
    from sekd.models.loading import pick_device

    device = pick_device(cfg.train.device)
    if not launch.distributed:
        return Dist.single(device)
    return init(launch, device)


def already_finished(cfg: DictConfig) -> bool:
    from sekd.stores.runs import is_finished

    if not is_finished(cfg):
        return False
    what = "trained (model/ exists)" if cfg.stage == "train" else "done (record.json exists)"
    print(f"sekd: {run_dir(cfg)} is already {what}; skipping. Use force=true to redo it.")
    return True


def check_stage(cfg: RunConfig, run: RunDir) -> None:
    if cfg.stage == "score" and cfg.mode == "distill" and not run.trained():
        raise ConfigError(
            f"stage=score: {run.path} holds no trained student yet; run this cell with stage=train (or stage=all) first"
        )


def job_threads(cfg: RunConfig) -> int | None:
    """torch CPU threads: train.threads if set, else one per CPU Slurm allocated to the job (torch would
    otherwise use every core of the node), else torch's default."""
    if cfg.train.threads:
        return int(cfg.train.threads)
    return int(os.environ.get("SLURM_CPUS_PER_TASK", 0)) or None


def set_threads(cfg: RunConfig) -> None:
    threads = job_threads(cfg)
    if threads:
        import torch

        torch.set_num_threads(threads)


def run_tokenizer(cfg: RunConfig) -> PreTrainedTokenizerBase:
    """The run's tokenizer, without building or loading any model (the embedded pair's is built alone)."""
    from sekd.models.loading import load_tokenizer

    m = cfg.model
    if m.source == "embedded":
        from sekd.embedded.build import tokenizer

        assert m.embedded is not None  # ModelConfig requires it for source=embedded
        return load_tokenizer(str(tokenizer(Path(cfg.paths.cache) / "embedded", int(m.embedded["vocab_size"]))))
    path = str(m.tokenizer or m.student)
    try:
        return load_tokenizer(path, m.trust_remote_code)
    except (OSError, ValueError, TypeError) as err:
        raise ConfigError(f"model.tokenizer={path!r}: cannot load its tokenizer ({type(err).__name__})") from None


def check_cache_before_models(cfg: RunConfig) -> None:
    """A cache folder named by classes.cache, checked before any model is built or loaded: the tokenizer
    (cheap) packs the run's training data, and the cache's signature (all but the teacher, checked once
    the pair is resolved) and its sample ids must match that data."""
    if cfg.mode != "distill" or cfg.stage == "score" or cfg.classes.cache in (None, "auto"):
        return
    from sekd.data.sources import DataError

    tok = run_tokenizer(cfg)
    try:
        data = training_data(cfg, tok)
    except DataError as err:
        raise ConfigError(str(err)) from None
    open_named_cache(cfg.classes.cache, cache_expectation(cfg, None, tok, data), data.sample_ids)


def open_named_cache(path: str | Path, expect: dict[str, Any], sample_ids: list[str] | None = None) -> None:
    """classes.cache=<folder> opened against what this run expects; a mismatch is one line."""
    from sekd.stores.teacher_cache.store import CacheError, TeacherCache

    try:
        TeacherCache.open(path, expect=expect, sample_ids=sample_ids)
    except CacheError as err:
        raise ConfigError(f"classes.cache: {err}") from None


def resolve(cfg: RunConfig) -> tuple[str, str, PreTrainedTokenizerBase, float]:
    """The teacher/student pair (built when embedded; that time is returned as its own cost) and their
    shared tokenizer; a named cache is then checked against the resolved teacher."""
    from sekd.models.loading import check_same_tokenizer, resolve_pair

    t_pair = time.time()
    teacher, student, tok_path = resolve_pair(cfg)
    pretrain_s = round(time.time() - t_pair, 2) if built_since(t_pair, teacher, student) else 0.0
    tok = check_same_tokenizer(teacher, student, tok_path, cfg.model.trust_remote_code)
    if cfg.mode == "distill" and cfg.classes.cache not in (None, "auto"):  # refuse a wrong cache up front
        open_named_cache(cfg.classes.cache, cache_expectation(cfg, teacher, tok))
    return teacher, student, tok, pretrain_s


def built_since(t: float, *folders: str) -> bool:
    """Did resolve_pair build (pretrain, fine-tune) one of `folders` after time t? An embedded model folder's
    inputs.json is written when its build ends; a hub model or a reused folder is older or has none."""
    marks = [Path(f) / "inputs.json" for f in folders]
    return any(m.is_file() and m.stat().st_mtime >= t for m in marks)


def open_tracker(job: Job) -> Tracker:
    """wandb (offline by default) for the run; ${oc.env:...} values stay text in its config."""
    from sekd.app.tracking import Tracker

    cfg, run = job.cfg, job.run
    if not job.dist.is_main:  # rank 0 alone logs the run
        return Tracker("disabled", run.path, name=run.path.name, config={}, project=cfg.logging.project)
    return Tracker(
        cfg.logging.wandb,
        run.path,
        name=run.path.name,
        config=resolved(job.tree, keep_env=True),
        project=cfg.logging.project,
        entity=cfg.logging.entity,
        group=cfg.logging.group or run.name,  # a preset with overrides is its own group: named by what it changes
        run_id=f"{file_safe(run.name, 40)}-s{cfg.seed}-{run.hash}",  # wandb refuses ,:;#?/' in ids
    )
