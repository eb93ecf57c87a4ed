"""The training stage: select samples, get class targets, distill the student under the run folder's
lock, and save it with its stats (docs/method.md §6-§10). Other modes train nothing."""

from __future__ import annotations

import json
import re
import resource
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from sekd.app.checks import source_options
from sekd.core.errors import ConfigError, RunFault
from sekd.core.files import atomic_write_json
from sekd.config.schema import OnPolicyRegime, RunConfig

# gloo's words when a peer's socket closes under a collective (a peer killed, or gone with its node)
PEER_LOST = re.compile(r"Connection (closed|reset) by peer")

if TYPE_CHECKING:
    from sekd.app.compose import Job
    from sekd.app.tracking import Tracker
    from sekd.data.packing import PackedData
    from sekd.kd.objective import Selector
    from sekd.stores.teacher_cache.store import TeacherCache
    from sekd.training.on_policy import OnPolicy
    from sekd.training.trainer import Trainer


def train(job: Job, tracker) -> dict[str, Any]:
    """The run's training stats: distilled now, or read back from an earlier job that trained this
    student. Two sweeps scoring the same student (T2 on test, V1 on validation) may both reach here at
    once: one trains, the other waits and then only scores. The lock file goes on release (a crashed
    holder's with the next run), and so do the temporary files a killed run left. Several ranks: rank 0
    holds the lock and decides; every rank trains."""
    cfg, dist = job.cfg, job.dist
    if cfg.mode != "distill":
        return {
            "tokens_seen": 0,
            "tokens_supervised": 0,
            "steps": 0,
            "train_time_s": 0.0,
            "costs": {"pretrain_seconds": job.pretrain_s},
        }
    return with_the_ranks(dist, lambda: train_locked(job, tracker))


def train_locked(job: Job, tracker) -> dict[str, Any]:
    """`train` under the run folder's lock, which rank 0 holds (every rank learns whether it could take it)."""
    from contextlib import ExitStack

    from sekd.core.files import folder_lock

    cfg, run, dist = job.cfg, job.run, job.dist
    with ExitStack() as held:
        dist.main_writes(lambda: lock_and_sweep(held, folder_lock(run.path / ".train.lock"), run))
        if dist.broadcast_object(run.trained() and not cfg.force):
            return json.loads(run.train_stats.read_text())  # trained before (another job or eval)
        if cfg.force:  # force=true trains from scratch, never from a checkpoint; no rank looks for one before
            dist.main_writes(run.start_over)  # rank 0 has removed it
        return timed_distill(job, tracker)


def lock_and_sweep(held, lock, run) -> None:
    """Rank 0 takes the run folder's lock and deletes what a killed writer left there."""
    from sekd.distributed.fsdp import remove_unfinished

    held.enter_context(lock)
    run.sweep()
    remove_unfinished(run.path)


def timed_distill(job: Job, tracker) -> dict[str, Any]:
    """distill, with train_time_s the distillation alone: pretraining the pair, the sample pre-pass and
    the cache build are costs of their own."""
    t0 = time.time()
    stats = distill(job, tracker)
    c = stats["costs"]
    c["pretrain_seconds"] = job.pretrain_s
    stats["train_time_s"] = round(time.time() - t0 - c["prepass_seconds"] - c["cache_build_seconds"], 2)
    job.dist.main_writes(lambda: finish(job.run, stats))
    return stats


def finish(run, stats: dict[str, Any]) -> None:
    """train_stats.json, which marks the run trained, then the checkpoint goes: a fault before leaves the
    checkpoint for the re-run to resume from."""
    atomic_write_json(run.train_stats, stats)
    remove_checkpoint(run)


class Teacher:
    """The frozen teacher, loaded on first use: a run from the offline cache, or one whose samples the
    student alone scores, never loads it."""

    def __init__(self, path: str, tok, device, dtype, trust_remote_code: bool, home=None):
        self.path, self.tok, self.device, self.dtype, self.trc = path, tok, device, dtype, trust_remote_code
        self.home = home or device  # its own device (model.teacher_device); `device`: where the loss is
        self.model, self.loaded = None, False

    def get(self):
        """The teacher as the loss uses it: on another device than the student, its outputs come back
        to the student's (sekd.models.loading.PlacedTeacher)."""
        from sekd.models.loading import place_teacher

        return place_teacher(self.raw(), self.device)

    def raw(self):
        """The model itself, on its own device (the cache builder runs it there)."""
        from sekd.models.loading import load_model, shared_vocab

        if self.model is None:
            self.model = load_model(self.path, self.home, self.dtype, self.trc).eval().requires_grad_(False)
            shared_vocab(self.tok, self.model)
            self.loaded = True
        return self.model

    def release(self) -> None:
        self.model = None


@dataclass
class Parts:
    """What distill builds before the loop runs."""

    device: Any
    dtype: Any  # what autocast computes in (and the teacher is stored in)
    student: Any
    vocab: int
    teacher: Teacher
    selector: Selector
    data: PackedData  # the samples training sees (after the sample axis)
    available: int  # samples in the train split
    costs: dict[str, Any] = field(
        default_factory=lambda: {
            "teacher_loaded": False,
            "prepass_seconds": 0.0,
            "prepass_reused": False,
            "prepass_forward_tokens": {},
            "cache_build_seconds": 0.0,
            "cache": None,
        }
    )


def distill(job: Job, tracker) -> dict[str, Any]:
    """Select samples, get class targets, train the student with the run's selective KD; save it in
    Hugging Face format under run/model (the checkpoint stays until train_stats.json is written). Returns
    training stats and costs (Table 7's columns)."""
    parts = build_parts(job)
    pick_samples(job, parts)
    cache = open_teacher_cache(job, parts) if job.cfg.classes.cache is not None else None
    trainer = fit(job, parts, cache, tracker)
    weights = trainer.final_weights()  # sharded (fsdp): gathered whole on rank 0, every rank taking part
    job.dist.main_writes(lambda: save_student(job.run, parts.student, job.tok, state_dict=weights))
    return train_stats(parts, trainer.prog, cache, job.dist)


def build_parts(job: Job) -> Parts:
    """The train split, the selector and the student (fp32 master weights; autocast computes), seeded
    in this order so a run's numbers do not move."""
    import torch

    from sekd.models.loading import load_model, pick_device, pick_dtype, shared_vocab, teacher_device

    cfg = job.cfg
    device = job.dist.device if job.dist.active else pick_device(cfg.train.device)  # a rank's own card
    dtype = pick_dtype(cfg.train.precision, device)
    data = training_data(cfg, job.tok)
    torch.manual_seed(cfg.seed)
    selector = build_selector(cfg)
    student = load_model(
        job.student_path, student_home(cfg, job.dist, device), torch.float32, cfg.model.trust_remote_code
    )
    return Parts(
        device=device,
        dtype=dtype,
        student=student,
        vocab=shared_vocab(job.tok, student),
        selector=selector,
        teacher=Teacher(
            job.teacher_path,
            job.tok,
            device,
            dtype,
            cfg.model.trust_remote_code,
            home=teacher_device(cfg.model.teacher_device, device),
        ),
        data=data,
        available=len(data),
    )


def student_home(cfg: RunConfig, dist, device):
    """Where the student is loaded: the rank's device, or under train.distributed=fsdp the CPU. FSDP2's
    fully_shard moves each unit's weights to the rank's device as it shards them (a layer at a time), so
    the whole fp32 student never sits on the card beside the teacher: only its shard does (docs/method.md
    §9). Loading reads the same file on any device: the weights, and the run, are the same."""
    import torch

    return torch.device("cpu") if cfg.train.distributed == "fsdp" and dist.active else device


@contextmanager
def on_device(model, device):
    """`model` on `device` inside the block, back where it was after (the same parameter objects, the
    same values): the sample pre-pass runs the fsdp student, kept on the CPU until it is sharded, on the
    rank's card, and leaves the card to the teacher after."""
    import torch

    from sekd.models.loading import same_device

    device = torch.device(device)
    home = next(model.parameters()).device
    if same_device(home, device):
        yield model
        return
    model.to(device)
    try:
        yield model
    finally:
        model.to(home)
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the freed blocks back to the card, whole, for the teacher that loads next


def pick_samples(job: Job, parts: Parts) -> None:
    """The sample axis: s_i from a pre-pass of the frozen initial student (and teacher) or at random;
    keeps the picked samples in parts.data and says which in samples.json."""
    from sekd.data.dataset import tokenizer_signature
    from sekd.models.loading import model_signature
    from sekd.stores.sample_importance import select_samples
    from sekd.selection.samples import SAMPLE_SELECTORS, SampleSelector

    cfg, s = job.cfg, job.cfg.samples
    if s.name == "all":
        return
    kind = SAMPLE_SELECTORS.get(s.name)
    wants_teacher = isinstance(kind, SampleSelector) and kind.needs_teacher
    with on_device(parts.student, parts.device) as student:  # fsdp: whole on the card for the pre-pass only
        picked = select_samples(  # the pre-pass sharded across the ranks, gathered; rank 0 stores the scores
            s.name,
            parts.data,
            l=s.l,
            seed=cfg.seed,
            student=student,
            teacher=parts.teacher.get() if wants_teacher else None,
            student_sig=model_signature(job.student_path),
            teacher_sig=model_signature(job.teacher_path) if wants_teacher else "",
            tokenizer_sig=tokenizer_signature(job.tok),
            store_dir=Path(cfg.paths.cache) / "sample_scores",
            batch_size=s.batch_size,
            device=str(parts.device),
            vocab=parts.vocab,
            temperature=cfg.train.temperature,
            dtype=parts.dtype,
            dist=job.dist,
        )
    parts.data = parts.data.subset(picked.indices)
    kept = {"selector": s.name, "l": s.l, "kept": parts.data.sample_ids}  # which samples training saw
    job.dist.main_writes(lambda: atomic_write_json(job.run.path / "samples.json", kept))
    parts.costs.update(
        prepass_seconds=picked.prepass_seconds,
        prepass_reused=picked.reused,
        prepass_forward_tokens=picked.forward_tokens,
    )


def fit(job: Job, parts: Parts, cache: TeacherCache | None, tracker: Tracker) -> Trainer:
    """The training loop over the kept samples (returns the Trainer, its run done); the teacher runs only
    where no cache stands in for it."""
    from sekd.training.trace import SelectionTrace
    from sekd.training.trainer import Trainer

    cfg, t = job.cfg, job.cfg.train
    needs_teacher = (t.lam > 0 and cache is None) or parts.selector.needs_teacher_everywhere
    if not needs_teacher:
        parts.teacher.release()  # built the cache or scored samples; not needed to train
    trace = SelectionTrace(job.run.trace, t.trace_selection_steps) if t.trace_selection_steps else None
    trainer = Trainer(
        student=parts.student,
        teacher=parts.teacher.get() if needs_teacher else None,
        data=parts.data,
        selector=parts.selector,
        train_cfg=t,
        vocab=parts.vocab,
        seed=cfg.seed,
        run=job.run,
        tracker=tracker,
        device=parts.device,
        dtype=parts.dtype,
        trace=trace,
        cache=cache,
        on_policy=on_policy(cfg, parts.data, job.tok),
        dist=job.dist,
    )
    trainer.fit()
    return trainer


def with_the_ranks(dist, work: Callable[[], Any]) -> Any:
    """`work()` over several ranks: a rank that stops for good (killed, out of memory, its node lost) ends
    the others' wait in a collective with gloo's "Connection closed/reset by peer", made here one line."""
    try:
        return work()
    except RuntimeError as err:
        if not (dist.active and PEER_LOST.search(str(err))):
            raise
        raise RunFault(
            f"rank {dist.rank} of {dist.world_size}: another rank stopped while this one waited for it "
            "(killed, out of memory, or its node lost; its own output says which)"
        ) from err


def save_student(run, student, tok, state_dict=None) -> None:
    """run/model in Hugging Face format, swapped in whole (a kill leaves the old one or none). `state_dict`:
    the whole weights when the model itself holds only its shard (fsdp)."""
    from sekd.core.files import storage_error

    run.require()
    tmp = run.path / "model.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        student.save_pretrained(tmp, **({"state_dict": state_dict} if state_dict is not None else {}))
        tok.save_pretrained(tmp)
    except Exception as err:  # a full disk: no half model is left to be taken for a whole one
        shutil.rmtree(tmp, ignore_errors=True)
        fault = storage_error(err, run.model)  # safetensors reports an OS error as text
        if fault is None:
            raise
        raise fault from err
    shutil.rmtree(run.model, ignore_errors=True)
    tmp.rename(run.model)


def remove_checkpoint(run) -> None:
    """checkpoint.pt, then the sharded folder it named (fsdp): a kill between the two leaves a stray
    folder, which the next save of the run removes."""
    from sekd.distributed.fsdp import remove_sharded

    run.checkpoint.unlink(missing_ok=True)
    remove_sharded(run.path)


def train_stats(parts: Parts, prog, cache, dist=None) -> dict[str, Any]:
    costs = {
        **parts.costs,
        "teacher_loaded": parts.teacher.loaded,
        "cache_bytes_read": cache.bytes_read if cache is not None else 0,
        # every token the teacher ran over: training, sample pre-pass, cache construction
        "teacher_forward_tokens": prog.teacher_tokens
        + parts.costs["prepass_forward_tokens"].get("teacher", 0)
        + parts.costs.get("cache_build_teacher_tokens", 0),
    }
    return {
        "tokens_seen": prog.tokens_seen,
        "tokens_supervised": prog.tokens_supervised,
        "steps": prog.step,
        "train_samples": len(parts.data),
        "available_samples": parts.available,
        "peak_memory_mb": peak_memory_mb(parts.device),
        "on_policy_batches": prog.on_policy_batches,
        "costs": costs,
        **placement(parts, dist),
    }


def placement(parts: Parts, dist=None) -> dict[str, Any]:
    """The world size and rank 0's devices (the teacher's where it was loaded), each spelled one way (`cuda`
    beside `cuda:0` is one card, not two), for tokens/s per device (sekd.app.record.throughput), and the peak
    memory of every device the run used: this process's, or with several ranks every rank's, named
    `rank<r>/<device>` (every rank must call it then: it gathers)."""
    import torch.distributed as tdist

    from sekd.models.loading import canonical_device

    world = tdist.get_world_size() if tdist.is_available() and tdist.is_initialized() else 1
    student = canonical_device(parts.device)
    teacher = canonical_device(parts.teacher.home) if parts.teacher.loaded else None
    used = [student] + ([teacher] if teacher is not None and teacher != student else [])
    peaks = {str(d): round(peak_memory_mb(d), 1) for d in used}
    if dist is not None and dist.active:
        peaks = {f"rank{r}/{d}": mb for r, mine in enumerate(dist.all_gather_objects(peaks)) for d, mb in mine.items()}
    return {
        "world_size": world,
        "devices": {"student": str(student), "teacher": str(teacher) if teacher else None},
        "peak_memory_mb_per_device": peaks,
    }


def peak_memory_mb(device) -> float:
    """The most memory the run held on `device`: a card's allocated peak, or this process's resident peak."""
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def build_selector(cfg: RunConfig) -> Selector:
    """The position axis (signal + policy), the criterion and the class axis, from the registries."""
    from sekd.app.checks import policy_options
    from sekd.kd.objective import Selector
    from sekd.selection.classes import build_classes
    from sekd.selection.criteria import CRITERIA
    from sekd.selection.policies import POLICIES
    from sekd.selection.signals import SIGNALS

    p = cfg.position
    policy = POLICIES.build(p.policy, **policy_options(cfg))
    criterion = CRITERIA.build(cfg.criterion.name, **cfg.criterion.options)
    classes = build_classes(cfg.classes.name, **cfg.classes.options)
    return Selector.of(
        signal=SIGNALS.get(p.signal) if p.signal else None,
        policy=policy,
        criterion=criterion,
        signal_normalization=p.normalization,
        classes=classes,
    )


def training_data(cfg: RunConfig, tok):
    """The train split: packed documents (general-purpose) or one problem per row (task-specific)."""
    from sekd.app.checks import is_task_data

    artifacts_dir = Path(cfg.paths.cache) / "data"
    if is_task_data(cfg):
        from sekd.data.qa import build_qa

        return build_qa(
            cfg.data.name,
            "train",
            tok,
            seq_len=cfg.data.seq_len,
            artifacts_dir=artifacts_dir,
            max_samples=cfg.data.max_samples,
            separator=cfg.data.separator,
            **source_options(cfg),
        )
    from sekd.data.dataset import build_packed

    return build_packed(
        cfg.data.name,
        "train",
        tok,
        seq_len=cfg.data.seq_len,
        token_budget=cfg.data.token_budget,
        artifacts_dir=artifacts_dir,
        separator=cfg.data.separator,
        **source_options(cfg),
    )


def on_policy(cfg: RunConfig, data: PackedData, tok: Any) -> OnPolicy | None:
    """regime=on_policy: the kept samples' prompts, answered by the student (None off-policy)."""
    r = cfg.regime
    if r.name != "on_policy" or not isinstance(r, OnPolicyRegime):  # RegimeConfig: on_policy is an OnPolicyRegime
        return None
    from sekd.data.dataset import separator_id
    from sekd.data.qa import prompt_ids
    from sekd.training.on_policy import OnPolicy

    stop = separator_id(tok, cfg.data.separator, ends="an answer")  # the token the task rows end answers with
    # rows as long as the data's (seq_len): a step's tokens, and the record's token counts, are the same
    # on any number of ranks, and an answer is cut only where a data row would end
    return OnPolicy(
        prompts=lambda idx: [prompt_ids(data, i) for i in idx],
        pad_id=tok.eos_token_id,
        eos_id=stop,
        mix=float(r.mix),
        temperature=float(r.temperature),
        top_p=float(r.top_p),
        max_new_tokens=int(r.max_new_tokens),
        seq_len=int(data.seq_len),
    )


def cache_expectation(cfg: RunConfig, teacher_path: str | None, tok, data=None) -> dict[str, Any]:
    """Every signature field that changes the targets, as this run would build them (docs/method.md §9):
    format, teacher (None: not resolved yet, checked later), tokenizer, vocabulary, T, the kind (class
    sampler, its options, its form), the seed (the run's own, so seeds do not share draws) and, given the
    data the cache must cover, its identity and sequence length. Not the builder's dtype or device, nor the
    number of shards."""
    from sekd.stores.teacher_cache.kinds import KindError, cache_kind
    from sekd.stores.teacher_cache.store import FORMAT, data_signature
    from sekd.data.dataset import tokenizer_signature
    from sekd.models.loading import model_signature

    try:
        kind = cache_kind(cfg.classes.name, dict(cfg.classes.options))
    except KindError as err:
        raise ConfigError(str(err) if str(err).startswith("classes.cache") else f"classes.cache: {err}") from None
    expect = {
        "format": FORMAT,
        "tokenizer": tokenizer_signature(tok),
        "vocab_size": len(tok),
        "temperature": float(cfg.train.temperature),
        **kind.signature(),
        "seed": int(cfg.seed),
    }
    if teacher_path is not None:
        expect["teacher"] = model_signature(teacher_path)
    if data is not None:
        expect.update(data=data_signature(data.sample_ids), seq_len=int(data.seq_len))
    return expect


def open_teacher_cache(job: Job, parts: Parts) -> TeacherCache:
    """The run's offline teacher cache, for the samples it trains on. `auto` builds (or finishes) one
    keyed by its whole signature, the seed and these samples included; a folder is opened as it is (its
    data was checked against the whole train split before the models loaded). Either way a mismatch is
    refused in one line."""
    from sekd.stores.teacher_cache.store import CacheError, TeacherCache

    cfg, data, cache = job.cfg, parts.data, job.cfg.classes.cache
    if cache is None:
        raise ValueError("classes.cache is unset: there is no teacher cache to open")
    if cache == "auto":
        expect = cache_expectation(cfg, job.teacher_path, job.tok, data)
        path = auto_cache(cfg, expect, parts, job.dist)  # the ranks are its workers: each builds its shards
        job.dist.barrier()  # every shard is in the manifest before any rank opens the cache
    else:
        path, expect = Path(cache), cache_expectation(cfg, job.teacher_path, job.tok)
    parts.costs["cache"] = str(path)
    try:
        return TeacherCache.open(path, expect=expect, sample_ids=data.sample_ids)
    except CacheError as err:
        raise ConfigError(f"classes.cache: {err}") from None


def auto_cache(cfg: RunConfig, expect: dict[str, Any], parts: Parts, dist=None) -> Path:
    """classes.cache=auto: the cache folder keyed by `expect`. A finished one is reused and the teacher
    stays unloaded; otherwise the teacher builds it (resuming a killed build, rebuilding a corrupt shard,
    refusing an edited manifest). Several ranks build it as workers, rank r the shards r, r+W, ...: the
    draws are keyed by sample and seed, so the folder is byte for byte the one a single process builds."""
    import hashlib

    from sekd.stores.teacher_cache.build import NUM_SHARDS, build_cache, worker_shards
    from sekd.distributed.process_group import Dist

    dist = dist or Dist.single()
    from sekd.stores.teacher_cache.store import CacheError, TeacherCache

    from sekd.stores.teacher_cache.kinds import CacheKind

    key = hashlib.sha256(json.dumps(expect, sort_keys=True).encode()).hexdigest()[:16]
    path = Path(cfg.paths.cache) / "teacher_cache" / key
    try:
        TeacherCache.open(path, expect=expect, sample_ids=parts.data.sample_ids)
        return path
    except CacheError:
        pass
    t0 = time.time()
    teacher = parts.teacher.raw()
    try:
        build_cache(
            teacher,
            parts.data,
            path,
            teacher_name=expect["teacher"],
            tokenizer_sig=expect["tokenizer"],
            kind=CacheKind.from_signature(expect),
            temperature=expect["temperature"],
            seed=expect["seed"],
            vocab_size=parts.vocab,
            device=str(next(teacher.parameters()).device),
            batch_size=cfg.samples.batch_size,
            num_shards=NUM_SHARDS,
            shards=worker_shards(NUM_SHARDS, dist.rank, dist.world_size),
            progress=dist.is_main,
        )
    except CacheError as err:
        raise ConfigError(f"classes.cache: {err}") from None
    parts.costs.update(
        cache_build_seconds=round(time.time() - t0, 2), cache_build_teacher_tokens=int(parts.data.input_ids.numel())
    )
    return path
