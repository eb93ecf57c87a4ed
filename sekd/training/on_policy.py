"""regime=on_policy in the trainer (docs/method.md §10): on the steps `on_policy_step` picks, the student answers
the batch's prompts and the KD runs on its answers. The sampling and the rows' layout are sekd/kd/on_policy.py."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch
from torch import Tensor

from sekd.core.rng import RowKeys, step_keys
from sekd.kd.on_policy import build_rollout, on_policy_step, rollout_answers

if TYPE_CHECKING:
    from transformers import PreTrainedModel


@dataclass
class OnPolicy:
    """The task data's prompts and how the student answers them; `mix`: the fraction of on-policy steps."""

    prompts: Callable[[list[int]], list[Tensor]]  # sample indices -> their prompt token tensors (task data)
    pad_id: int
    eos_id: int
    mix: float
    temperature: float
    top_p: float
    max_new_tokens: int
    seq_len: int | None = None  # rows cut and padded to the data's length (None: the batch's longest)

    def on_step(self, step: int) -> bool:
        """Whether optimizer step `step` trains on the student's answers."""
        return on_policy_step(step, self.mix)

    def sample(
        self, student: PreTrainedModel, micro_idx: list[list[int]], *, step: int, generator: torch.Generator
    ) -> list[list[Tensor]]:
        """The student's answers for every micro-batch of an on-policy step, sampled in one batched loop. Each
        sample's answer is drawn from its key (run seed, step, global sample index): the same on any rank, in any
        micro-batch, and again on resume."""
        flat = [i for idx in micro_idx for i in idx]
        answers = self.answers(student, flat, step_keys(len(flat), generator=generator, step=step, rows=flat))
        ends = torch.tensor([len(idx) for idx in micro_idx]).cumsum(0).tolist()
        return [answers[a:b] for a, b in zip([0] + ends[:-1], ends)]

    def answers(self, student: PreTrainedModel, idx: list[int], keys: RowKeys) -> list[Tensor]:
        """The student's answers to the prompts of samples `idx`, row i from its own key (sekd/core/rng.py RowKeys):
        a sample's answer does not depend on what it is sampled with, so a step samples all its micro-batches
        in one batched loop (half the forwards of two)."""
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

    def batch(self, idx: list[int], answers: list[Tensor]) -> tuple[Tensor, Tensor]:
        """The training rows of samples `idx` and their answers. With seq_len every batch has the data rows'
        shape, so a step's tokens do not depend on the split."""
        r = build_rollout(self.prompts(idx), answers, pad_id=self.pad_id, seq_len=self.seq_len)
        return r.input_ids, r.labels
