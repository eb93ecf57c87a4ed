"""On-policy rollouts (docs/method.md §10; Agarwal et al. 2024, "On-policy distillation of language models").

For a batch of training prompts the student samples answers (paper: temperature 0.7, top-p 0.9, up to
256 new tokens); the teacher then scores the student's own tokens and the selective objective (reverse
KL by default) applies to the *generated* positions only. This module produces that training batch:

    rollout(student, prompts, ...) = build_rollout(prompts, sample_answers(student, prompts, ...))

Sampling is batched, so the prompts are LEFT-padded for `generate` (every row's next token is then
written in the same column) with an attention mask; HF derives the position ids from that mask, so
each row is sampled exactly as if it were alone.

The training rows are RE-ALIGNED TO THE RIGHT: row i = prompt_i + answer_i, padded on the right.
The trainer's forward (`Trainer.forward`) runs student and teacher on `input_ids` alone, with no
attention mask and default position ids 0..L-1. With left padding that forward would be wrong: the
real tokens would attend to the pad tokens and sit at shifted rotary positions. With right padding
and causal attention, position t only sees tokens 0..t, all real for every real position, at their
true positions 0..t, so every real position's logits are exactly those of an unpadded forward of
that row alone (and of generate's masked left-padded forward); the pad positions after the row's
end produce logits nobody reads, since their labels are -100. No change to the trainer is needed.

Labels: with w = prompt + answer (+ right padding), input_ids = w[:-1] and labels[t] = w[t+1]
exactly where w[t+1] is a generated token (its eos included), else -100. The first supervised
position is therefore the prompt's last token (it predicts the first generated token), and the
objective's valid mask, selection policies and criterion see generated positions only.

Length rule (`seq_len`): without it, L = longest row - 1 (the batch's own length). With it, every
row is cut to its first seq_len + 1 tokens and padded to exactly that, so L = seq_len: the tail of
a too-long answer is dropped, never the prompt's head, so every kept position keeps the exact
context the student sampled it under. A row whose prompt alone fills seq_len + 1 tokens keeps no
generated token: its labels are all -100 and the objective gives it no weight (s_i = 0).
`rollout` caps max_new_tokens at what the shortest prompt can keep, which drops only tokens the
rule would cut anyway (sampling is column-synchronous, so earlier tokens are unchanged).

Padding id: the pad positions are never attended to by real positions (causal attention) and carry
no label, so any in-vocabulary id gives the same loss; pass the eos id to match the task data rows,
which are right-padded with eos.

Reproducibility: `sample_answers` seeds its own RNG from `seed` inside `torch.random.fork_rng`, so the
global RNG state (and with it the trainer's data order and selection draws on resume) is untouched;
pass e.g. seed = run seed + optimizer step to get fresh, resumable samples every step.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, fields
from fractions import Fraction
from typing import Iterator

import torch
from torch import Tensor

from sekd.tensors import IGNORE


@dataclass
class Rollout:
    """One on-policy training batch (LongTensors, all on one device)."""

    input_ids: Tensor  # [B,L]  prompt + answer, right-padded with pad_id
    labels: Tensor  # [B,L]  the next token where it is a generated token, else -100
    prompt_lens: Tensor  # [B]  tokens of each prompt
    gen_lens: Tensor  # [B]  generated tokens kept in the row (= its number of labels != -100)

    def to(self, device) -> "Rollout":
        return Rollout(*(getattr(self, f.name).to(device) for f in fields(self)))


# ---- padding ------------------------------------------------------------------------------


def _check_prompts(prompts: list[Tensor]) -> None:
    if len(prompts) == 0:
        raise ValueError("no prompts")
    for i, p in enumerate(prompts):
        if p.dim() != 1 or p.numel() == 0:
            raise ValueError(f"prompt {i} must be a non-empty 1-D tensor of token ids; got shape {tuple(p.shape)}")


def left_pad(prompts: list[Tensor], pad_id: int) -> tuple[Tensor, Tensor]:
    """Prompts of different lengths, padded on the left.  -> ids [B,P], attention_mask [B,P] (1 = token)."""
    _check_prompts(prompts)
    device = prompts[0].device
    P = max(p.numel() for p in prompts)
    ids = torch.full((len(prompts), P), int(pad_id), dtype=torch.long, device=device)
    mask = torch.zeros(len(prompts), P, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        n = p.numel()
        ids[i, P - n:] = p.to(device=device, dtype=torch.long)
        mask[i, P - n:] = 1
    return ids, mask


# ---- sampling -----------------------------------------------------------------------------


@contextlib.contextmanager
def _seeded(device: torch.device, seed: int) -> Iterator[None]:
    """Seed the RNG that sampling on `device` draws from; restore every RNG state touched afterwards."""
    if device.type == "cpu":
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(int(seed))
            yield
    elif device.type == "cuda":
        idx = device.index if device.index is not None else torch.cuda.current_device()
        with torch.random.fork_rng(devices=[idx], device_type="cuda"), torch.cuda.device(idx):
            torch.default_generator.manual_seed(int(seed))
            torch.cuda.manual_seed(int(seed))  # this device only
            yield
    else:
        with torch.random.fork_rng(device_type=device.type):
            torch.manual_seed(int(seed))
            yield


def _cut_after_eos(row: Tensor, eos_id: int) -> Tensor:
    """The generated tokens up to and including the first eos (padding generated after it dropped)."""
    hits = (row == eos_id).nonzero()
    return row[: int(hits[0]) + 1] if hits.numel() else row


def sample_answers(student, prompts: list[Tensor], *, pad_id: int, eos_id: int, temperature: float, top_p: float,
                   max_new_tokens: int, seed: int) -> list[Tensor]:
    """The student's answers to `prompts`: one batched HF `generate` over the left-padded prompts.

    Sampling is from softmax(z / temperature) truncated to the top-p nucleus, and nothing else: no
    top-k (HF's default 50 is turned off) and none of the student's own generation_config (a hub
    checkpoint's temperature/top-k/penalties), which is set aside for the call. temperature = 0 is
    greedy decoding. The student samples in eval mode under no_grad and gets its train/eval mode
    back; the RNG is seeded from `seed` inside fork_rng, so the global RNG state is unchanged.

    Returns one 1-D LongTensor per prompt, on the student's device: its generated tokens up to and
    including the first eos, or all max_new_tokens of them when it never emitted eos.
    """
    from transformers import GenerationConfig

    _check_prompts(prompts)
    if not temperature >= 0:
        raise ValueError(f"temperature={temperature!r}; must be >= 0 (0 = greedy)")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p={top_p!r}; must be in (0, 1]")
    if int(max_new_tokens) < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens!r}; must be >= 1")
    device = next(student.parameters()).device
    ids, mask = left_pad([p.to(device) for p in prompts], pad_id)
    opts = dict(max_new_tokens=int(max_new_tokens), pad_token_id=int(pad_id), eos_token_id=int(eos_id),
                use_cache=True, num_beams=1, num_return_sequences=1)
    if temperature > 0:
        opts.update(do_sample=True, temperature=float(temperature), top_p=float(top_p), top_k=0)
    else:
        opts.update(do_sample=False)

    was_training, own_config = student.training, getattr(student, "generation_config", None)
    student.eval()
    student.generation_config = GenerationConfig()  # HF's global defaults, then exactly `opts`
    try:
        with torch.no_grad(), _seeded(device, seed):
            out = student.generate(input_ids=ids, attention_mask=mask, **opts)
    finally:
        student.generation_config = own_config
        student.train(was_training)
    return [_cut_after_eos(row, eos_id) for row in out[:, ids.shape[1]:]]


# ---- the training batch -------------------------------------------------------------------


def build_rollout(prompts: list[Tensor], answers: list[Tensor], *, pad_id: int, seq_len: int | None = None) -> Rollout:
    """Right-aligned training rows: w_i = prompt_i + answer_i, right-padded with pad_id.

    L = longest row - 1, or seq_len (rows cut to their first seq_len + 1 tokens, padded to exactly
    that). input_ids = w[:, :-1]; labels[t] = w[t+1] where w[t+1] is a kept generated token, else -100.
    Built on the answers' device (the prompts' when every answer is empty).
    """
    _check_prompts(prompts)
    if len(answers) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")
    if seq_len is not None and int(seq_len) < 1:
        raise ValueError(f"seq_len={seq_len!r}; must be >= 1")
    device = next((a.device for a in answers if a.numel()), prompts[0].device)
    rows = [torch.cat([p.to(device=device, dtype=torch.long), a.to(device=device, dtype=torch.long).reshape(-1)])
            for p, a in zip(prompts, answers)]
    W = max(r.numel() for r in rows) if seq_len is None else int(seq_len) + 1  # tokens per row
    L = W - 1
    w = torch.full((len(rows), W), int(pad_id), dtype=torch.long, device=device)
    prompt_lens = torch.tensor([p.numel() for p in prompts], dtype=torch.long, device=device)
    kept = torch.tensor([min(r.numel(), W) for r in rows], dtype=torch.long, device=device)
    for i, r in enumerate(rows):
        w[i, : int(kept[i])] = r[:W]
    gen_lens = (kept - prompt_lens).clamp_min(0)
    nxt = torch.arange(1, W, device=device)  # the index of the token each position predicts  [L]
    generated = (nxt >= prompt_lens[:, None]) & (nxt < kept[:, None])  # [B,L]
    labels = torch.where(generated, w[:, 1:], torch.full_like(w[:, 1:], IGNORE))
    return Rollout(w[:, :L].contiguous(), labels, prompt_lens, gen_lens)


def rollout(student, prompts: list[Tensor], *, pad_id: int, eos_id: int, temperature: float, top_p: float,
            max_new_tokens: int, seed: int, seq_len: int | None = None) -> Rollout:
    """sample_answers then build_rollout; with seq_len, max_new_tokens is capped at what can be kept."""
    _check_prompts(prompts)
    if seq_len is not None:
        room = int(seq_len) + 1 - min(p.numel() for p in prompts)  # tokens the shortest prompt's row can keep
        max_new_tokens = min(int(max_new_tokens), room)
        if max_new_tokens < 1:  # every prompt fills seq_len: nothing generated could be supervised
            empty = [torch.zeros(0, dtype=torch.long, device=prompts[0].device) for _ in prompts]
            return build_rollout(prompts, empty, pad_id=pad_id, seq_len=seq_len)
    answers = sample_answers(student, prompts, pad_id=pad_id, eos_id=eos_id, temperature=temperature, top_p=top_p,
                             max_new_tokens=max_new_tokens, seed=seed)
    return build_rollout(prompts, answers, pad_id=pad_id, seq_len=seq_len)


# ---- mixing on- and off-policy steps --------------------------------------------------------


def _ratio(ratio: float) -> Fraction:
    r = float(ratio)
    if not 0.0 <= r <= 1.0:  # NaN fails too
        raise ValueError(f"on-policy ratio={ratio!r}; must be in [0, 1]")
    return Fraction(r).limit_denominator(1_000_000)  # 0.57 means 57/100, not its binary neighbour


def on_policy_count(n_steps: int, ratio: float) -> int:
    """How many of the first n_steps optimizer steps are on-policy: round(n_steps * ratio), halves up."""
    if int(n_steps) < 0:
        raise ValueError(f"n_steps={n_steps!r}; must be >= 0")
    r = _ratio(ratio)
    return (2 * int(n_steps) * r.numerator + r.denominator) // (2 * r.denominator)


def on_policy_step(step: int, ratio: float) -> bool:
    """Whether optimizer step `step` (0-based) trains on an on-policy batch.

    Deterministic (resume-safe) and as even as possible: over every prefix of n steps exactly
    round(n * ratio) are on-policy, so the running fraction is always within 1/(2n) of `ratio`.
    ratio 1 -> every step, 0 -> none; ValueError outside [0, 1].
    """
    if int(step) < 0:
        raise ValueError(f"step={step!r}; must be >= 0")
    return on_policy_count(int(step) + 1, ratio) > on_policy_count(int(step), ratio)
