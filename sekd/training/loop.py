"""The training loop: micro-batches -> selective KD loss -> one optimizer step per effective batch.

Gradients of the loss *sums* are accumulated and divided once by the effective batch's weight
(sum_i s_i, or the number of selected positions), so the step does not depend on the micro-batch
split. Checkpoints hold everything a restart needs to end with the same weights.

Several ranks (train.distributed=ddp, sekd/distributed/process_group.py): train.micro_batch_size is per rank. The
data order is the one-process order; each *global* micro-batch of world_size x micro_batch_size
indices is split in rank order (rank r takes [r*mb, (r+1)*mb)), so 2 ranks x micro-batch 2 see exactly
the sequences 1 rank x micro-batch 4 sees. After accumulation the loss sums, their weights, the
position counts and the gradients are summed over ranks (all-reduce) and the gradients divided once:
the same step as one process. The gradient all-reduce is explicit (sekd.distributed.process_group.GradBuckets), not
torch's DistributedDataParallel wrapper: the chunked flow calls the student's body and LM head
separately (never the model's forward), so DDP's forward hooks would not run. GradBuckets does what DDP
does inside (its math with no_sync over the accumulation): the gradients live in one persistent flat
buffer (each .grad a view of it), split into ~25 MiB buckets whose async all-reduces start from the
parameters' post-accumulate-grad hooks during the last micro-batch's backward, in the same order on
every rank; it works the same for the dense flow. A stand-in micro-batch runs its forward without
autograd (it has no backward). Every rank then takes the same optimizer step on the same weights. Rank 0 alone writes the checkpoint, metrics and
trace; every rank resumes from rank 0's checkpoint (the weights are replicated).

train.distributed=fsdp (sekd/distributed/fsdp.py) keeps this math with sharded weights: the per-micro-batch
loss is the forward of one module (StudentLoss), FSDP2's root unit, so its hooks gather the weights and
reduce-scatter (summing) the gradients however the flow calls the body and heads; the explicit
all-reduce is then skipped. A stand-in rank still runs its backward (at zero weight), since every
rank must join every reduce-scatter. The weights and optimizer state are saved by every rank into a
torch.distributed.checkpoint folder that checkpoint.pt names.
"""

from __future__ import annotations

import contextlib
import json
import math
import pickle
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

from sekd.distributed.process_group import Dist, GradBuckets
from sekd.core.errors import ConfigError
from sekd.core.files import atomic_torch_save
from sekd.kd.flows import auto_chunk_size, chunked_kd_loss
from sekd.kd.objective import LossInputs, Selector, selective_kd_loss
from sekd.config.schema import TrainConfig
from sekd.selection.classes import SparseTarget
from sekd.distributed.fsdp import (
    full_state_dict,
    full_value,
    load_sharded,
    remove_sharded,
    save_sharded,
    shard_student,
    shard_teacher,
)


@dataclass
class Progress:
    """Where training is: optimizer step, and the data position (epoch, sample offset in it)."""

    step: int = 0
    epoch: int = 0
    offset: int = 0
    tokens_seen: int = 0
    tokens_supervised: int = 0
    teacher_tokens: int = 0  # tokens the teacher ran over (0 when training from the offline cache)
    on_policy_batches: int = 0  # micro-batches the student generated (regime=on_policy)


def build_optimizer(params, t: TrainConfig) -> torch.optim.Optimizer:
    if t.optimizer == "adam8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise RuntimeError("train.optimizer=adam8bit needs bitsandbytes (pip install 'sekd[adam8bit]')") from None
        return bnb.optim.Adam8bit(params, lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay)
    return torch.optim.AdamW(params, lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay)


def build_schedule(opt, t: TrainConfig, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    warm = t.warmup_steps

    def factor(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / warm
        if t.lr_schedule == "cosine":
            frac = (step - warm) / max(1, total_steps - warm)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


class StandIn(list):
    """A rank's share of a short last global micro-batch that left it no sequence: one sequence of the
    batch run again at zero weight, so the rank still takes part in every collective; it counts nowhere."""


def rank_share(idx: list[int], rank: int, world_size: int) -> list[int]:
    """Rank r's contiguous slice of a global micro-batch: [r*mb, (r+1)*mb) of a full one; a short last
    one is split as evenly as it goes (sizes differ by at most one), in rank order."""
    base, extra = divmod(len(idx), world_size)
    start = rank * base + min(rank, extra)
    share = idx[start : start + base + (rank < extra)]
    return share if share else StandIn(idx[:1])


def micro_batches(data, mb: int, seed: int, prog: Progress, rank: int = 0, world_size: int = 1) -> Iterator[list[int]]:
    """Seeded epochs of micro-batches, from the saved position on; advances `prog` as it goes. With
    several ranks: global micro-batches of world_size x mb, of which each rank yields its share."""
    from sekd.data.dataset import batches

    while True:
        for idx in batches(data, micro_batch_size=mb * world_size, seed=seed, epoch=prog.epoch, start=prog.offset):
            prog.offset += len(idx)
            yield rank_share(list(idx), rank, world_size)
        prog.epoch, prog.offset = prog.epoch + 1, 0


def total_steps(n_samples: int, t: TrainConfig, world_size: int = 1) -> int:
    if t.steps is not None:
        return int(t.steps)
    per_epoch = math.ceil(n_samples / (t.micro_batch_size * world_size))
    return max(1, math.ceil(per_epoch * t.epochs / t.grad_accum))


def rng_state(gen: torch.Generator) -> dict[str, Any]:
    """Every RNG state as tensors and plain data, which torch.load(weights_only=True) reads back."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)],
        "selection": gen.get_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict[str, Any], gen: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    gen.set_state(state["selection"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class CheckpointError(ConfigError):
    """checkpoint.pt cannot be resumed from; one line naming the file and the way out."""


CHECKPOINT_KEYS = ("schedule", "progress", "rng", "selector")
# the weights and optimizer state: in checkpoint.pt (one process, ddp), or in the folder it names (fsdp)
WEIGHT_KEYS = {"replicated": ("student", "optimizer"), "sharded": ("sharded",)}


def load_checkpoint(path, sharded: bool | None = None) -> dict[str, Any]:
    """checkpoint.pt with weights_only=True: tensors and plain data only, so a planted pickle cannot run
    code on resume. A truncated, foreign or unsafe file is refused in one line, and so is one of the other
    form than `sharded` asks for (fsdp's names a torch.distributed.checkpoint folder). Loaded on the CPU: RNG
    states must be CPU tensors, and load_state_dict moves weights and optimizer state to their device."""

    def refuse(why: str) -> CheckpointError:
        return CheckpointError(
            f"{path}: cannot resume from this checkpoint ({why}); delete it, or rerun with "
            "force=true to train this run from scratch"
        )

    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # torch's own message suggests loading it anyway: not here
        raise refuse(
            "UnpicklingError: it holds objects other than tensors and plain data, and loading them could run code"
        ) from None
    except Exception as err:  # RuntimeError (a truncated zip), EOFError, OSError, ...
        first = (str(err).strip().splitlines() or [""])[0].split(". ")[0][:200]  # its first sentence
        raise refuse(f"{type(err).__name__}: {first}") from None
    form = "sharded" if isinstance(ck, dict) and "sharded" in ck else "replicated"
    missing = [k for k in (*WEIGHT_KEYS[form], *CHECKPOINT_KEYS) if not isinstance(ck, dict) or k not in ck]
    if missing:
        raise refuse(f"it holds no {', '.join(missing)}")
    if sharded is not None and sharded != (form == "sharded"):
        written = "train.distributed=fsdp" if form == "sharded" else "an unsharded run (train.distributed=none or ddp)"
        raise refuse(f"it was written by {written}, and this run's train.distributed differs")
    if form == "sharded" and not (Path(path).parent / ck["sharded"]).is_dir():
        raise refuse(f"the sharded folder it names, {ck['sharded']}, is missing")
    return ck


class StudentLoss(torch.nn.Module):
    """The student's part of one micro-batch as one module: its forward is body -> heads -> selection ->
    the loss sum of docs/method.md §2, given the teacher's output (hidden states for the chunked flow,
    logits for the dense one; None without a teacher). Returns (loss sum, StepOut): a tensor output, so
    a wrapper's hooks (FSDP2's root unit under train.distributed=fsdp) see the whole computation, though
    the chunked flow never calls the model's own forward."""

    def __init__(self, model, sel: Selector, *, vocab: int, chunk_size: int, flow: str):
        super().__init__()
        self.model, self.sel, self.V, self.chunk_size, self.flow = model, sel, vocab, chunk_size, flow

    def forward(self, x: torch.Tensor, y: torch.Tensor, teacher_out: torch.Tensor | None, head_t, opts: dict[str, Any]):
        if self.flow == "chunked":  # bodies only; the heads run in chunks, at the positions that need them
            h_s = self.model.get_decoder()(input_ids=x, use_cache=False).last_hidden_state  # [B,T,d_s]
            teacher_out = arrived(teacher_out, h_s.device)  # a placed teacher's, queued after the student's body
            out = chunked_kd_loss(
                h_s,
                self.model.get_output_embeddings(),
                teacher_out,
                head_t,
                y,
                LossInputs(self.sel, **opts),
                vocab=self.V,
                chunk_size=self.chunk_size,
            )
        else:  # the reference: full [B,T,V] logits
            s_logits = self.model(input_ids=x).logits[..., : self.V]  # [B,T,V]
            teacher_out = arrived(teacher_out, s_logits.device)
            out = selective_kd_loss(s_logits, teacher_out, y, LossInputs(self.sel, **opts))
        return out.loss_sum, out


def arrived(teacher_out: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    """The teacher's output on the student's device. A teacher on its own card (model.teacher_device) hands
    back its output where it computed it; the copy is queued here, after the student's body, so the student's
    card computes its body while the teacher's computes the teacher's (the copy waits for both, the host for
    neither) instead of idling until the teacher is done."""
    return teacher_out if teacher_out is None or teacher_out.device == device else teacher_out.to(device)


@dataclass
class OnPolicy:
    """docs/method.md §10 on-policy regime: on the steps `on_policy_step(step, mix)` picks, the student samples
    answers to the batch's prompts and the KD runs on those (generated tokens only)."""

    prompts: Any  # idx -> list of prompt token tensors (task data)
    pad_id: int
    eos_id: int
    mix: float
    temperature: float
    top_p: float
    max_new_tokens: int
    seq_len: int | None = None  # rows cut and padded to the data's length (None: the batch's longest)

    def answers(self, student, idx: list[int], keys) -> list[torch.Tensor]:
        """The student's answers to the prompts of samples `idx`, row i from its own key (sekd/core/rng.py RowKeys):
        a sample's answer does not depend on what it is sampled with, so a step samples all its micro-batches
        in one batched loop (half the forwards of two)."""
        from sekd.kd.on_policy import rollout_answers

        return rollout_answers(
            student,
            self.prompts(idx),
            pad_id=self.pad_id,
            eos_id=self.eos_id,
            temperature=self.temperature,
            top_p=self.top_p,
            max_new_tokens=self.max_new_tokens,
            keys=keys,
            seq_len=self.seq_len,
        )

    def batch(self, idx: list[int], answers: list[torch.Tensor]):
        """The training rows of samples `idx` and their answers. With seq_len every batch has the data rows'
        shape, so a step's tokens do not depend on the split."""
        from sekd.kd.on_policy import build_rollout

        r = build_rollout(self.prompts(idx), answers, pad_id=self.pad_id, seq_len=self.seq_len)
        return r.input_ids, r.labels


class Trainer:
    def __init__(
        self,
        *,
        student,
        teacher,
        data,
        selector: Selector,
        train_cfg: TrainConfig,
        vocab: int,
        seed: int,
        run,
        tracker,
        device: torch.device,
        dtype: torch.dtype,
        trace=None,
        cache=None,
        on_policy: OnPolicy | None = None,
        dist: Dist | None = None,
    ):
        self.dist = dist or Dist.single(device)
        self.student, self.teacher, self.data, self.sel = student, teacher, data, selector
        self.on_policy = on_policy
        self.t, self.V, self.seed, self.run, self.tracker = train_cfg, vocab, seed, run, tracker
        self.device, self.dtype, self.trace, self.cache = device, dtype, trace, cache
        size = train_cfg.chunk_size
        self.chunk_size = auto_chunk_size(vocab, device.type) if size == "auto" else int(size)
        self.steps = total_steps(len(data), train_cfg, self.dist.world_size)
        self.sharded = train_cfg.distributed == "fsdp" and self.dist.active
        fsdp = dict(dtype=dtype, mesh=train_cfg.fsdp.mesh)
        if self.sharded and teacher is not None:
            # the teacher first: its whole weights (on the card since it loaded) are freed before the
            # student's shards (loaded on the CPU, sekd.app.training.student_home) come to the card, so
            # the card's peak is the whole teacher alone, not the teacher plus the student's shard
            shard_teacher(teacher, self.dist.device, **fsdp)
        broadcast_params([p for p in student.parameters() if p.requires_grad], self.dist)  # rank 0's weights
        self.objective = StudentLoss(student, selector, vocab=vocab, chunk_size=self.chunk_size, flow=train_cfg.flow)
        if self.sharded:  # after the broadcast: each rank keeps its shard of the same weights
            shard_student(self.objective, student, self.dist.device, **fsdp)  # moves each unit to the card
        self.params = [p for p in student.parameters() if p.requires_grad]  # sharded ones under fsdp
        # ddp: the gradients in persistent bucketed buffers, all-reduced as the last backward runs
        self.buckets = GradBuckets(self.params, self.dist) if self.dist.active and not self.sharded else None
        self.opt = build_optimizer(self.params, train_cfg)
        self.sched = build_schedule(self.opt, train_cfg, self.steps)
        self.gen = torch.Generator().manual_seed(seed)
        self.prog = Progress()

    # -- checkpoints -------------------------------------------------------------------------
    def save(self) -> None:
        """checkpoint.pt, by rank 0; it holds every rank's RNG states (each rank draws for its own samples).
        Sharded (fsdp): every rank first writes its shard into the folder checkpoint.pt then names; the
        older folder goes once checkpoint.pt no longer names it."""
        rngs = self.dist.all_gather_objects(rng_state(self.gen))
        if self.sharded:  # every rank writes its shard
            weights = {"sharded": f"checkpoint-{self.prog.step}.dcp"}
            save_sharded(self.objective, self.opt, self.run.path / weights["sharded"], is_main=self.dist.is_main)
        if not self.dist.is_main:
            return
        if not self.sharded:
            weights = {"student": self.student.state_dict(), "optimizer": self.opt.state_dict()}
        extra = {"rng_ranks": rngs} if self.dist.active else {}
        atomic_torch_save(
            self.run.checkpoint,
            {
                **weights,
                "schedule": self.sched.state_dict(),
                "progress": asdict(self.prog),
                "rng": rngs[0],
                "selector": self.sel.state_dict(),
                **extra,
            },
        )
        if self.sharded:
            remove_sharded(self.run.path, keep=weights["sharded"])

    def resume(self) -> bool:
        """Continue from checkpoint.pt; without one, start clean: the metrics and trace rows of a run
        killed before its first checkpoint are dropped, so every step is logged once."""
        if not self.run.checkpoint.exists():
            if self.dist.is_main:
                self.run.truncate_after(0)
            return False
        ck = load_checkpoint(self.run.checkpoint, sharded=self.sharded)
        rngs = ck.get("rng_ranks") or []
        if len(rngs) == self.dist.world_size:
            ck["rng"] = rngs[self.dist.rank]
        if self.sharded:
            load_sharded(self.objective, self.opt, self.run.path / ck["sharded"])
        else:
            self.student.load_state_dict(ck["student"])
            self.opt.load_state_dict(ck["optimizer"])
        self.sched.load_state_dict(ck["schedule"])
        self.prog = Progress(**ck["progress"])
        set_rng_state(ck["rng"], self.gen)
        self.sel.load_state_dict(ck["selector"])
        if self.dist.is_main:
            self.run.truncate_after(self.prog.step)
        return True

    # -- one micro-batch ---------------------------------------------------------------------
    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)

    def sample_step(self, micro_idx: list[list[int]]) -> list[list[torch.Tensor]] | None:
        """On an on-policy step, the student's answers for every micro-batch of it, sampled in one batched
        loop; None on an off-policy step. Each sample's answer is drawn from its key (run seed, step, global
        sample index): the same on any rank, in any micro-batch, and again on resume."""
        from sekd.kd.on_policy import on_policy_step
        from sekd.core.rng import step_keys

        if self.on_policy is None or not on_policy_step(self.prog.step, self.on_policy.mix):
            return None
        flat = [i for idx in micro_idx for i in idx]
        with self.autocast():
            answers = self.on_policy.answers(
                self.student, flat, step_keys(len(flat), generator=self.gen, step=self.prog.step, rows=flat)
            )
        ends = torch.tensor([len(idx) for idx in micro_idx]).cumsum(0).tolist()
        return [answers[a:b] for a, b in zip([0] + ends[:-1], ends)]

    def tokens(self, idx: list[int], answers: list[torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The micro-batch's tokens and targets: the data's own, or (on-policy steps) the student's
        answers to its prompts, with targets on the generated tokens only."""
        if answers is not None:
            x, y = self.on_policy.batch(idx, answers)
            self.prog.on_policy_batches += 1
            return x.to(self.device), y.to(self.device)
        return self.data.input_ids[idx].to(self.device), self.data.labels[idx].to(self.device)

    def forward(self, idx: list[int], answers: list[torch.Tensor] | None = None):
        autocast = self.autocast()
        x, y = self.tokens(idx, answers)  # [B,T]; y: x_{t+1} or -100
        samples = [self.data.sample_ids[i] for i in idx]
        cached = None
        if self.cache is not None:  # p~ over C_t at every valid position, row-major, from the offline cache
            cached = SparseTarget(*self.cache.targets(samples, y.cpu())).to(self.device)
        opts = dict(
            lam=self.t.lam,
            temperature=self.t.temperature,
            normalization=self.t.normalization,
            generator=self.gen,
            step=self.prog.step,
            cached=cached,
            rows=idx,  # global sample indices: a row's draws do not depend on its rank or micro-batch
            gather=self.gather(stand_in=isinstance(idx, StandIn)),
        )  # GLS: one global queue
        stand_in = isinstance(idx, StandIn)
        # a stand-in keeps no autograd graph: it has no backward, except under fsdp (every rank must join
        # each reduce-scatter, so it runs one at zero weight)
        grad = torch.no_grad() if stand_in and not self.sharded else contextlib.nullcontext()
        with autocast, grad:
            _, out = self.objective(x, y, self.teacher_pass(x), self.teacher_head(), opts)
        if self.teacher is not None and not stand_in:
            self.prog.teacher_tokens += x.numel()
        if self.trace is not None and self.prog.step < self.trace.steps:  # rank 0 writes every rank's rows
            mine = [] if stand_in else self.trace.rows(self.prog.step, samples, y, out)
            rows = self.dist.all_gather_objects(mine)
            if self.dist.is_main:
                self.trace.append([r for part in rows for r in part])
        return out, x

    def gather(self, stand_in: bool):
        """Every rank's rows of a tensor (a stand-in rank adds none); None in one process."""
        if not self.dist.active:
            return None
        return (lambda t: self.dist.all_gather_cat(t[:0])) if stand_in else self.dist.all_gather_cat

    @torch.no_grad()
    def teacher_pass(self, x: torch.Tensor) -> torch.Tensor | None:
        """The frozen teacher over x, outside the student's loss module (under fsdp the teacher is an FSDP
        root of its own): its last hidden states [B,T,d_t] for the chunked flow (its head then runs at the
        selected positions only), its logits [B,T,V] for the dense one; None without a teacher."""
        if self.teacher is None:
            return None
        if self.t.flow == "chunked":
            return self.teacher.get_decoder()(input_ids=x, use_cache=False).last_hidden_state
        return self.teacher(input_ids=x).logits[..., : self.V]

    def teacher_head(self):
        """The teacher's LM head for the selective teacher head (replicated on every rank under fsdp)."""
        return self.teacher.get_output_embeddings() if self.teacher is not None and self.t.flow == "chunked" else None

    def accumulate(self, stream) -> tuple[float, float, float]:
        """Gradients of L over one effective batch (grad_accum micro-batches of every rank) in .grad;
        returns L. Sums, weights and gradients are summed over ranks before the one division."""
        # loss sum, weight, selected, valid, tokens seen, teacher tokens, on-policy batches
        tally = torch.zeros(7, dtype=torch.float64)
        teacher0, on_policy0 = self.prog.teacher_tokens, self.prog.on_policy_batches
        micro_idx = [next(stream) for _ in range(self.t.grad_accum)]
        sampled = self.sample_step(micro_idx) or [None] * len(micro_idx)
        if self.buckets is not None:  # zeroed buffers, each .grad a view of them
            self.buckets.start()
        for i, (idx, answers) in enumerate(zip(micro_idx, sampled)):
            out, x = self.forward(idx, answers)
            if isinstance(idx, StandIn):  # no gradient (the buckets take it as zeros); it counts nowhere
                if self.sharded:  # but every rank must join each of FSDP's reduce-scatters: a zero gradient
                    (out.loss_sum * 0).backward()
                continue
            if self.buckets is not None and i == len(micro_idx) - 1:  # reduce each bucket as soon as it is done
                self.buckets.arm()
            out.loss_sum.backward()
            tally[:5] += torch.tensor(
                [
                    float(out.loss_sum.detach()),
                    out.weight,
                    out.metrics["positions_selected"],
                    out.metrics["positions_valid"],
                    x.numel(),
                ],
                dtype=torch.float64,
            )
        if self.buckets is not None:  # every rank's gradients (fsdp reduce-scattered them in each backward),
            self.buckets.finish()  # before the counts: the same collectives in the same order on every rank
        if self.dist.active:  # every rank's counts
            tally[5:] = torch.tensor([self.prog.teacher_tokens - teacher0, self.prog.on_policy_batches - on_policy0])
            tally = self.dist.all_reduce_sum(tally.to(self.dist.device)).cpu()
            self.prog.teacher_tokens = teacher0 + int(tally[5])
            self.prog.on_policy_batches = on_policy0 + int(tally[6])
        loss_sum, weight, sel_pos, valid_pos, tokens = tally[:5].tolist()
        self.prog.tokens_seen += int(tokens)
        scale = 1.0 / max(weight, 1e-12)  # L = sum_i s_i L_i / sum_i s_i over the effective batch
        if self.buckets is not None:  # one pass over the flat buffers
            self.buckets.scale(scale)
        else:
            for p in self.student.parameters():
                if p.grad is not None:
                    p.grad.mul_(scale)
        return loss_sum * scale, sel_pos, valid_pos

    # -- the loop ----------------------------------------------------------------------------
    def step(self, stream) -> tuple[float, torch.Tensor, float, float]:
        """One optimizer step over one effective batch; returns its loss, grad norm (a tensor: reading it
        waits for the device, so only logged steps do) and position counts."""
        loss, sel_pos, valid_pos = self.accumulate(stream)
        gnorm = (
            full_value(torch.nn.utils.clip_grad_norm_(self.student.parameters(), self.t.max_grad_norm))
            if self.t.max_grad_norm
            else torch.tensor(float("nan"))
        )  # full_value: the norm over every shard
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        self.prog.step += 1
        self.prog.tokens_supervised += int(sel_pos)
        return loss, gnorm, sel_pos, valid_pos

    def log(self, loss: float, gnorm: torch.Tensor, sel_pos: float, valid_pos: float, sec_per_step: float) -> None:
        row = {
            "step": self.prog.step,
            "loss": loss,
            "grad_norm": float(gnorm),
            "lr": self.sched.get_last_lr()[0],
            "sel_frac": sel_pos / max(valid_pos, 1),
            "tokens_seen": self.prog.tokens_seen,
            "tokens_supervised": self.prog.tokens_supervised,
            "sec_per_step": sec_per_step,
        }
        if not self.dist.is_main:
            return
        self.run.log_metrics(row)
        self.tracker.log({f"train/{k}": v for k, v in row.items() if k != "step"}, step=self.prog.step)

    def fit(self) -> Progress:
        resumed = self.resume()
        stream = micro_batches(
            self.data, self.t.micro_batch_size, self.seed, self.prog, self.dist.rank, self.dist.world_size
        )
        self.student.train()
        bar = tqdm(
            total=self.steps, initial=self.prog.step, desc="distill", dynamic_ncols=True, disable=not self.dist.is_main
        )
        if resumed:
            bar.write(f"resumed from step {self.prog.step} ({self.run.checkpoint})")
        t_last = time.time()
        profiler = StepProfiler(self.t.profile_steps, self.run.path if self.run is not None else None, self.dist.rank)
        while self.prog.step < self.steps:
            with profiler.step():
                loss, gnorm, sel_pos, valid_pos = self.step(stream)
            if self.prog.step == self.steps:
                profiler.close()
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", sel=f"{sel_pos / max(valid_pos, 1):.2f}")
            if self.prog.step % self.t.log_every == 0 or self.prog.step == self.steps:
                now = time.time()
                self.log(loss, gnorm, sel_pos, valid_pos, (now - t_last) / self.t.log_every)
                t_last = now
            if self.t.ckpt_every and self.prog.step % self.t.ckpt_every == 0 and self.prog.step < self.steps:
                self.save()
        bar.close()
        return self.prog

    def final_weights(self) -> dict[str, torch.Tensor] | None:
        """The whole student's weights for saving it, gathered on rank 0 when sharded (every rank must
        call it then); None when the model holds them whole."""
        return full_state_dict(self.student) if self.sharded else None


class StepProfiler:
    """train.profile_steps: torch.profiler over that many optimizer steps after one warm-up step (the first
    step pays for allocations and kernel selection), CPU and CUDA activity with shapes and memory; the trace
    goes to <run>/profile-rank<r>.json (chrome://tracing, Perfetto) once the last traced step ends."""

    def __init__(self, steps: int, folder, rank: int):
        self.steps, self.folder, self.rank, self.done, self.prof = steps, folder, rank, 0, None

    @contextlib.contextmanager
    def step(self):
        if not self.steps or self.folder is None or self.done > self.steps:
            yield
            return
        if self.done == 1:  # after the warm-up step
            from torch.profiler import ProfilerActivity, profile

            kinds = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
            self.prof = profile(activities=kinds, record_shapes=True, profile_memory=True)
            self.prof.__enter__()
        yield
        self.done += 1
        if self.done == self.steps + 1:
            self.close()

    def close(self) -> None:
        """Stop tracing and write what was traced (the run may end before its last traced step)."""
        if self.prof is None:
            return
        prof, self.prof, self.done = self.prof, None, self.steps + 1
        prof.__exit__(None, None, None)
        from sekd.core.files import atomic_path

        with atomic_path(Path(self.folder) / f"profile-rank{self.rank}.json") as tmp:
            prof.export_chrome_trace(str(tmp))


def selection_trace_row(step: int, sample: str, labels_row, u_row, draws, b: int) -> dict[str, Any]:
    valid = (labels_row != -100).nonzero().flatten().tolist()
    k = draws.mask[b]
    return {
        "step": step,
        "sample": sample,
        "valid": valid,
        "scores": [float(u_row[t]) for t in valid] if u_row is not None else [0.0] * len(valid),
        "selected": draws.index[b][k].tolist(),
        "weights": [float(w) for w in draws.weight[b][k]],
    }


class SelectionTrace:
    """selection_trace.jsonl: one row per sequence per micro-step for the first N optimizer steps."""

    def __init__(self, path, steps: int):
        self.path, self.steps = path, steps

    def rows(self, step: int, samples: list[str], labels, out) -> list[dict[str, Any]]:
        return [
            selection_trace_row(step, sample, labels[b], out.u[b] if out.u is not None else None, out.draws, b)
            for b, sample in enumerate(samples)
        ]

    def append(self, rows: list[dict[str, Any]]) -> None:
        with open(self.path, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)

    def write(self, step: int, samples: list[str], labels, out) -> None:
        if step < self.steps:
            self.append(self.rows(step, samples, labels, out))


def broadcast_params(params: list[torch.Tensor], dist: Dist) -> None:
    """Rank 0's values of `params` on every rank. One off the rank's device (the fsdp student, on the CPU
    until it is sharded) goes through the device one parameter at a time: NCCL moves device memory only."""
    if dist.active:
        for p in params:
            if p.device == dist.device:
                torch.distributed.broadcast(p.data, src=0)
            else:
                on_device = p.data.to(dist.device)
                torch.distributed.broadcast(on_device, src=0)
                p.data.copy_(on_device)
