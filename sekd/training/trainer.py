"""The Trainer: one optimizer step per effective batch, to be read from the top.

fit -> step -> accumulate -> micro_step -> forward -> StudentLoss (the loss of docs/method.md §2). Each
micro-batch's loss *sum* is backpropagated as it comes, the gradients add up in .grad (and over ranks), and
they are divided once by the effective batch's weight (sum_i s_i, or the selected positions): the step does
not depend on how the batch is split into micro-batches or ranks (§9). Checkpoints: checkpoint.py; the data
order: batches.py; on-policy answers: on_policy.py.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import astuple, dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator, Protocol, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from sekd.config.schema import TrainConfig
from sekd.core.errors import RunFault
from sekd.core.memory import asked, exhausted, failed_card, peak
from sekd.distributed.fsdp import full_state_dict, full_value, shard_student, shard_teacher
from sekd.distributed.process_group import Dist, GradBuckets, broadcast_params
from sekd.kd.flows import LinearLike, auto_chunk_size, chunked_kd_loss
from sekd.kd.objective import LossInputs, Selector, StepOut, selective_kd_loss
from sekd.training.batches import StandIn, micro_batches
from sekd.training.checkpoint import Progress, resume, save_checkpoint
from sekd.training.on_policy import OnPolicy
from sekd.training.optim import build_optimizer, build_schedule, total_steps
from sekd.training.profile import StepProfiler
from sekd.training.trace import SelectionTrace

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from sekd.data.packing import PackedData
    from sekd.models.loading import PlacedTeacher
    from sekd.stores.runs import RunDir
    from sekd.stores.teacher_cache.store import TeacherCache


class Tracker(Protocol):
    """Where the metrics go besides metrics.jsonl (sekd.app.tracking.Tracker: wandb, or nowhere)."""

    def log(self, row: dict[str, Any], step: int | None = None) -> None: ...


class Trainer:
    """Distills `teacher` into `student` on `data` by the selective KD loss of `selector`, for train_cfg's
    number of optimizer steps (`fit`); `cache` stands in for the teacher's class targets, `on_policy` makes
    some steps train on the student's own answers, `dist` spans several ranks (docs/method.md §9)."""

    def __init__(
        self,
        *,
        student: PreTrainedModel,
        teacher: PreTrainedModel | PlacedTeacher | None,
        data: PackedData,
        selector: Selector,
        train_cfg: TrainConfig,
        vocab: int,
        seed: int,
        run: RunDir,
        tracker: Tracker,
        device: torch.device,
        dtype: torch.dtype,
        trace: SelectionTrace | None = None,
        cache: TeacherCache | None = None,
        on_policy: OnPolicy | None = None,
        dist: Dist | None = None,
    ) -> None:
        self.dist = dist or Dist.single(device)
        self.student, self.teacher, self.data, self.sel = student, teacher, data, selector
        self.on_policy = on_policy
        self.t, self.V, self.seed, self.run, self.tracker = train_cfg, vocab, seed, run, tracker
        self.device, self.dtype, self.trace, self.cache = device, dtype, trace, cache
        size = train_cfg.chunk_size
        self.chunk_size: int = auto_chunk_size(vocab, device.type) if size == "auto" else int(size)
        self.steps = total_steps(len(data), train_cfg, self.dist.world_size)
        self.sharded = train_cfg.distributed == "fsdp" and self.dist.active
        self.objective = self.build_objective(student, teacher)
        self.params = [p for p in student.parameters() if p.requires_grad]  # sharded ones under fsdp
        # ddp: the gradients in persistent bucketed buffers, all-reduced as the last backward runs
        self.buckets = GradBuckets(self.params, self.dist) if self.dist.active and not self.sharded else None
        self.opt = build_optimizer(self.params, train_cfg)
        self.sched = build_schedule(self.opt, train_cfg, self.steps)
        self.gen = torch.Generator().manual_seed(seed)
        self.prog = Progress()
        self.phase = ""  # where in its step the run is, for an out of memory's line

    # -- the loop: fit -> step -> accumulate -> micro_step -> forward ----------------------------
    def fit(self) -> Progress:
        """Optimizer steps up to self.steps, from checkpoint.pt where there is one: metrics every log_every
        steps, a checkpoint every ckpt_every."""
        resumed = resume(self)
        stream = micro_batches(
            self.data, self.t.micro_batch_size, self.seed, self.prog, self.dist.rank, self.dist.world_size
        )
        self.student.train()
        bar = tqdm(
            total=self.steps, initial=self.prog.step, desc="distill", dynamic_ncols=True, disable=not self.dist.is_main
        )
        if resumed:
            bar.write(f"resumed from step {self.prog.step} ({self.run.checkpoint})")
        with bar:  # a fault's one line starts a line of its own, after the bar's
            self.loop(stream, bar)
        return self.prog

    def loop(self, stream: Iterator[list[int]], bar: tqdm) -> None:
        t_last = time.time()
        profiler = StepProfiler(self.t.profile_steps, self.run.path if self.run is not None else None, self.dist.rank)
        while self.prog.step < self.steps:
            with profiler.step():
                counts, gnorm = self.step(stream)
            if self.prog.step == self.steps:
                profiler.close()
            bar.update(1)
            bar.set_postfix(loss=f"{counts.loss:.4f}", sel=f"{counts.selected_fraction:.2f}")
            if self.prog.step % self.t.log_every == 0 or self.prog.step == self.steps:
                now = time.time()
                self.log(counts, gnorm, (now - t_last) / self.t.log_every)
                t_last = now
            if self.t.ckpt_every and self.prog.step % self.t.ckpt_every == 0 and self.prog.step < self.steps:
                save_checkpoint(self)

    def step(self, stream: Iterator[list[int]]) -> tuple[StepCounts, Tensor]:
        """One optimizer step over one effective batch; its counts, and the grad norm (a tensor: reading it
        waits for the device, so only logged steps do). Out of memory, it raises the one line of
        `out_of_memory`: the step's checkpoint and metrics line come after it, so nothing of it is saved."""
        try:
            counts = self.accumulate(stream)
            self.phase = "the optimizer step"  # AdamW makes its state on the first one
            gnorm = self.clip_gradients()
            self.opt.step()
        except Exception as err:
            if exhausted(err) is None:
                raise
            self.forget_failed_step()
            raise self.out_of_memory(err) from err
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        self.prog.step += 1
        self.prog.tokens_seen += int(counts.tokens)
        self.prog.tokens_supervised += int(counts.positions_selected)
        self.prog.teacher_tokens += int(counts.teacher_tokens)
        self.prog.on_policy_batches += int(counts.on_policy_batches)
        return counts, gnorm

    def accumulate(self, stream: Iterator[list[int]]) -> StepCounts:
        """The gradient of L over one effective batch (grad_accum micro-batches of every rank) in .grad, and
        the step's counts. Sums, weights and gradients are summed over ranks before the one division."""
        micro_idx = [next(stream) for _ in range(self.t.grad_accum)]
        self.phase = "sampling the student's answers"
        answers = self.sample_answers(micro_idx)
        counts = StepCounts()
        if self.buckets is not None:  # zeroed buffers, each .grad a view of them
            self.buckets.start()
        for i, (idx, ans) in enumerate(zip(micro_idx, answers)):
            self.phase = f"micro-batch {i + 1} of {len(micro_idx)}"
            self.micro_step(idx, ans, counts, last=i == len(micro_idx) - 1)
        if self.buckets is not None:  # every rank's gradients (fsdp reduce-scattered them in each backward),
            self.buckets.finish()  # before the counts: the same collectives in the same order on every rank
        counts = counts.summed(self.dist)
        self.scale_gradients(counts.scale)  # L = sum_i s_i L_i / sum_i s_i over the effective batch
        return counts

    def micro_step(self, idx: list[int], answers: list[Tensor] | None, counts: StepCounts, *, last: bool) -> None:
        """One micro-batch: its forward, the backward of its loss sum (the gradients add up in .grad), its counts.
        A stand-in has no gradient (the buckets take it as zeros) and counts nowhere but in on-policy batches."""
        out, x = self.forward(idx, answers)
        counts.on_policy_batches += answers is not None
        if isinstance(idx, StandIn):
            if self.sharded:  # but every rank must join each of FSDP's reduce-scatters: a zero gradient
                (out.loss_sum * 0).backward()
            return
        if self.buckets is not None and last:  # reduce each bucket as soon as it is done
            self.buckets.arm()
        out.loss_sum.backward()
        counts.add(out, tokens=x.numel(), teacher=self.teacher is not None)

    def forward(self, idx: list[int], answers: list[Tensor] | None = None) -> tuple[StepOut, Tensor]:
        """The loss of one micro-batch (its StepOut) and its tokens: the teacher's pass, then the student's loss
        module. A stand-in keeps no autograd graph, as it has no backward, except under fsdp (every rank must
        join each reduce-scatter, so it runs one at zero weight)."""
        x, y = self.tokens(idx, answers)  # [B,T]; y: x_{t+1} or -100
        inputs = self.loss_inputs(idx, y)
        stand_in = isinstance(idx, StandIn)
        grad = torch.no_grad() if stand_in and not self.sharded else contextlib.nullcontext()
        with self.autocast(), grad:
            _, out = self.objective(x, y, self.teacher_pass(x), self.teacher_head(), inputs)
        if self.trace is not None and self.prog.step < self.trace.steps:  # rank 0 writes every rank's rows
            samples = [] if stand_in else [self.data.sample_ids[i] for i in idx]
            self.trace.record(self.prog.step, samples, y, out, self.dist)
        return out, x

    def loss_inputs(self, idx: list[int], y: Tensor) -> LossInputs:
        """What the loss takes besides the tokens: the selector and train's lam, T and normalization; the draws'
        generator, optimizer step and rows (global sample indices: a row's draws do not depend on its rank or
        micro-batch); the cache's targets; the ranks' gather (GLS: one global queue)."""
        cached = None
        if self.cache is not None:  # p~ over C_t at every valid position, row-major, from the offline cache
            samples = [self.data.sample_ids[i] for i in idx]
            cached = self.cache.targets(samples, y.cpu()).to(self.device)
        return LossInputs(
            self.sel,
            lam=self.t.lam,
            temperature=self.t.temperature,
            normalization=self.t.normalization,
            generator=self.gen,
            step=self.prog.step,
            cached=cached,
            rows=idx,
            gather=self.gather(stand_in=isinstance(idx, StandIn)),
        )

    # -- what a micro-batch reads ------------------------------------------------------------------
    def sample_answers(self, micro_idx: list[list[int]]) -> Sequence[list[Tensor] | None]:
        """The student's answers for every micro-batch of an on-policy step, sampled in one batched loop
        (`OnPolicy.sample`); None for each on an off-policy step."""
        if self.on_policy is None or not self.on_policy.on_step(self.prog.step):
            return [None] * len(micro_idx)
        with self.autocast():
            return self.on_policy.sample(self.student, micro_idx, step=self.prog.step, generator=self.gen)

    def tokens(self, idx: list[int], answers: list[Tensor] | None) -> tuple[Tensor, Tensor]:
        """The micro-batch's tokens and targets: the data's own, or (on-policy steps) the student's
        answers to its prompts, with targets on the generated tokens only."""
        if answers is not None and self.on_policy is not None:
            x, y = self.on_policy.batch(idx, answers)
            return x.to(self.device), y.to(self.device)
        return self.data.input_ids[idx].to(self.device), self.data.labels[idx].to(self.device)

    @torch.no_grad()
    def teacher_pass(self, x: Tensor) -> Tensor | None:
        """The frozen teacher over x, outside the student's loss module (under fsdp the teacher is an FSDP
        root of its own): its last hidden states [B,T,d_t] for the chunked flow (its head then runs at the
        selected positions only), its logits [B,T,V] for the dense one; None without a teacher."""
        if self.teacher is None:
            return None
        if self.t.flow == "chunked":
            return self.teacher.get_decoder()(input_ids=x, use_cache=False).last_hidden_state
        return self.teacher(input_ids=x).logits[..., : self.V]

    def teacher_head(self) -> LinearLike | None:
        """The teacher's LM head for the selective teacher head (replicated on every rank under fsdp)."""
        return self.teacher.get_output_embeddings() if self.teacher is not None and self.t.flow == "chunked" else None

    def gather(self, stand_in: bool) -> Callable[[Tensor], Tensor] | None:
        """Every rank's rows of a tensor (a stand-in rank adds none); None in one process."""
        if not self.dist.active:
            return None
        return self.dist.all_gather_others if stand_in else self.dist.all_gather_cat

    def autocast(self) -> torch.autocast:
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)

    # -- gradients, metrics, weights ---------------------------------------------------------------
    def scale_gradients(self, factor: float) -> None:
        if self.buckets is not None:  # one pass over the flat buffers
            self.buckets.scale(factor)
            return
        for p in self.student.parameters():
            if p.grad is not None:
                p.grad.mul_(factor)

    def clip_gradients(self) -> Tensor:
        """The gradients' norm over every shard (`full_value`), clipped to max_grad_norm; nan without clipping."""
        if not self.t.max_grad_norm:
            return torch.tensor(float("nan"))
        return full_value(torch.nn.utils.clip_grad_norm_(self.student.parameters(), self.t.max_grad_norm))

    def log(self, counts: StepCounts, gnorm: Tensor, sec_per_step: float) -> None:
        row = {
            "step": self.prog.step,
            "loss": counts.loss,
            "grad_norm": float(gnorm),
            "lr": self.sched.get_last_lr()[0],
            "sel_frac": counts.selected_fraction,
            "tokens_seen": self.prog.tokens_seen,
            "tokens_supervised": self.prog.tokens_supervised,
            "sec_per_step": sec_per_step,
        }
        self.dist.main_writes(lambda: self.run.log_metrics(row))  # a full disk on rank 0 stops every rank
        if not self.dist.is_main:
            return
        self.tracker.log({f"train/{k}": v for k, v in row.items() if k != "step"}, step=self.prog.step)

    def out_of_memory(self, err: BaseException) -> RunFault:
        """The one line of a step that ran out of memory: the step (as metrics.jsonl numbers it), where in it,
        the device, what was asked for and the peak, and how to make the step fit."""
        kind = exhausted(err) or "host"
        device = failed_card(err, self.device) if kind == "card" else self.device
        rank = f" (rank {self.dist.rank})" if self.dist.active else ""
        facts = ", ".join(x for x in (asked(err), peak(device, kind)) if x)
        return RunFault(
            f"out of {kind} memory on {device}{rank} at step {self.prog.step + 1}, {self.phase} "
            f"(train.micro_batch_size={self.t.micro_batch_size}): {facts}; "
            f"{smaller_micro_batch(self.t, self.dist.world_size, kind)}"
        )

    def forget_failed_step(self) -> None:
        """The selection trace's rows of the step that failed (its first micro-batches may have written some):
        the re-run would drop them too. Best effort: the fault's own line matters more than this tidying."""
        if self.trace is not None and self.dist.is_main and self.prog.step < self.trace.steps:
            with contextlib.suppress(Exception):
                self.run.truncate_after(self.prog.step)

    def final_weights(self) -> dict[str, Tensor] | None:
        """The whole student's weights for saving it, gathered on rank 0 when sharded (every rank must
        call it then); None when the model holds them whole."""
        return full_state_dict(self.student) if self.sharded else None

    # -- setup -----------------------------------------------------------------------------------
    def build_objective(self, student: PreTrainedModel, teacher: PreTrainedModel | PlacedTeacher | None) -> StudentLoss:
        """The student's loss module, with rank 0's weights on every rank; under fsdp the teacher and then the
        student sharded (the teacher first: its whole weights, on the card since it loaded, are freed before the
        student's shards, loaded on the CPU by sekd.app.training.student_home, come to the card, so the card's
        peak is the whole teacher alone, not the teacher plus the student's shard)."""
        mesh = self.t.fsdp.mesh
        if self.sharded and teacher is not None:
            from sekd.models.loading import PlacedTeacher  # fsdp shards the teacher itself; checks refuse a placed one

            assert not isinstance(teacher, PlacedTeacher)
            shard_teacher(teacher, self.dist.device, dtype=self.dtype, mesh=mesh)
        broadcast_params([p for p in student.parameters() if p.requires_grad], self.dist)  # rank 0's weights
        objective = StudentLoss(student, vocab=self.V, chunk_size=self.chunk_size, flow=self.t.flow)
        if self.sharded:  # after the broadcast: each rank keeps its shard of the same weights
            shard_student(objective, student, self.dist.device, dtype=self.dtype, mesh=mesh)  # each unit to the card
        return objective


@dataclass
class StepCounts:
    """What one optimizer step counts over its micro-batches, and then over every rank: `summed` carries them
    all in one all-reduce (`to_tensor` / `from_tensor`)."""

    loss_sum: float = 0.0  # the micro-batches' loss sums
    weight: float = 0.0  # what they are divided by: sum_i s_i, or the selected positions (batch_tokens)
    positions_selected: float = 0.0
    positions_valid: float = 0.0
    tokens: float = 0.0  # tokens of the micro-batches that took a backward (stand-ins excluded)
    teacher_tokens: float = 0.0  # of those, the tokens the teacher ran over
    on_policy_batches: float = 0.0  # micro-batches of the student's own answers

    def add(self, out: StepOut, *, tokens: int, teacher: bool) -> None:
        """One micro-batch's loss sum, weight and counts; its tokens, and its teacher tokens if a teacher ran."""
        self.loss_sum += float(out.loss_sum.detach())
        self.weight += out.weight
        self.positions_selected += out.metrics["positions_selected"]
        self.positions_valid += out.metrics["positions_valid"]
        self.tokens += tokens
        self.teacher_tokens += tokens if teacher else 0

    @property
    def scale(self) -> float:
        """What the summed gradients are multiplied by: 1 / the weight."""
        return 1.0 / max(self.weight, 1e-12)

    @property
    def loss(self) -> float:
        """L = sum_i s_i L_i / sum_i s_i over the effective batch (or per selected position)."""
        return self.loss_sum * self.scale

    @property
    def selected_fraction(self) -> float:
        return self.positions_selected / max(self.positions_valid, 1)

    def to_tensor(self) -> Tensor:
        return torch.tensor(astuple(self), dtype=torch.float64)

    @classmethod
    def from_tensor(cls, t: Tensor) -> StepCounts:
        return cls(*t.tolist())

    def summed(self, dist: Dist) -> StepCounts:
        """Every rank's counts summed, in one all-reduce; these counts themselves in one process."""
        if not dist.active:
            return self
        return StepCounts.from_tensor(dist.all_reduce_sum(self.to_tensor().to(dist.device)).cpu())


class StudentLoss(torch.nn.Module):
    """The student's part of one micro-batch as one module: its forward is body -> heads -> selection ->
    the loss sum of docs/method.md §2, given the teacher's output (hidden states for the chunked flow,
    logits for the dense one; None without a teacher). Returns (loss sum, StepOut): a tensor output, so
    a wrapper's hooks (FSDP2's root unit under train.distributed=fsdp) see the whole computation, though
    the chunked flow never calls the model's own forward."""

    def __init__(self, model: PreTrainedModel, *, vocab: int, chunk_size: int, flow: str) -> None:
        super().__init__()
        self.model, self.V, self.chunk_size, self.flow = model, vocab, chunk_size, flow

    def forward(
        self, x: Tensor, y: Tensor, teacher_out: Tensor | None, head_t: LinearLike | None, inputs: LossInputs
    ) -> tuple[Tensor, StepOut]:
        if self.flow == "chunked":  # bodies only; the heads run in chunks, at the positions that need them
            h_s = self.model.get_decoder()(input_ids=x, use_cache=False).last_hidden_state  # [B,T,d_s]
            teacher_out = arrived(teacher_out, h_s.device)  # a placed teacher's, queued after the student's body
            head_s = self.model.get_output_embeddings()
            out = chunked_kd_loss(h_s, head_s, teacher_out, head_t, y, inputs, vocab=self.V, chunk_size=self.chunk_size)
        else:  # the reference: full [B,T,V] logits
            s_logits = self.model(input_ids=x).logits[..., : self.V]  # [B,T,V]
            teacher_out = arrived(teacher_out, s_logits.device)
            out = selective_kd_loss(s_logits, teacher_out, y, inputs)
        return out.loss_sum, out


def smaller_micro_batch(t: TrainConfig, world: int, kind: str) -> str:
    """What makes a step fit: a smaller micro-batch with more accumulation keeps the step the same (the
    split does not change it, docs/method.md §9), but both keys name the run folder, so it starts anew."""
    plan = (
        "see `sekd-train <these overrides> --plan --card <its memory>` for the largest that fits, "
        if kind == "card"
        else ""
    )
    free = "or free the card's memory" if kind == "card" else "or free host memory"
    m, a = t.micro_batch_size, t.grad_accum
    if m == 1:
        return f"train.micro_batch_size is 1 already: shorten data.seq_len, {plan}{free}"
    d = max(k for k in range(1, m) if m % k == 0)
    return (
        f"lower train.micro_batch_size to {d} with train.grad_accum={a * m // d} (the same {m * a * world} "
        f"sequences a step, in a new run folder from step 0), {plan}{free}"
    )


def arrived(teacher_out: Tensor | None, device: torch.device) -> Tensor | None:
    """The teacher's output on the student's device. A teacher on its own card (model.teacher_device) hands
    back its output where it computed it; the copy is queued here, after the student's body, so the student's
    card computes its body while the teacher's computes the teacher's (the copy waits for both, the host for
    neither) instead of idling until the teacher is done."""
    return teacher_out if teacher_out is None or teacher_out.device == device else teacher_out.to(device)
