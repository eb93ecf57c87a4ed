"""On-policy rollouts (docs/method.md §10; Agarwal et al. 2024): the student samples answers to a batch of
prompts and this module turns them into the training batch the selective objective reads.

    rollout(student, prompts, ...) = build_rollout(prompts, sample_answers(student, prompts, ...))

Prompts are left-padded for batched sampling over the KV cache; the training rows are re-aligned to the
right (prompt + answer, then padding), so a forward with no mask gives every real position its unpadded
logits. Labels are the generated tokens only; `seq_len` cuts an answer's tail, never the prompt. Row i's
t-th token is an inverse-CDF draw from its own key (sekd/core/rng.py), so an answer depends on its key,
prompt and weights only. docs/method.md §10 has the rules in full.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from fractions import Fraction
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from sekd.core.rng import RowKeys, categorical
from sekd.core.tensors import IGNORE

if TYPE_CHECKING:
    from transformers import DynamicCache, PreTrainedModel


@dataclass
class Rollout:
    """One on-policy training batch (LongTensors, all on one device)."""

    input_ids: Tensor  # [B,L]  prompt + answer, right-padded with pad_id
    labels: Tensor  # [B,L]  the next token where it is a generated token, else -100
    prompt_lens: Tensor  # [B]  tokens of each prompt
    gen_lens: Tensor  # [B]  generated tokens kept in the row (= its number of labels != -100)

    def to(self, device: torch.device | str) -> "Rollout":
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
        ids[i, P - n :] = p.to(device=device, dtype=torch.long)
        mask[i, P - n :] = 1
    return ids, mask


# ---- sampling -----------------------------------------------------------------------------

# the stream a row's sampling uniforms come from (sekd/core/rng.py RowKeys): one uniform per generated token
STREAM = "on_policy"
# generated tokens between the host's checks whether every row has finished (a sync on a GPU)
SYNC_EVERY = 16


def nucleus(logits: Tensor, temperature: float, top_p: float) -> tuple[Tensor, Tensor]:
    """The top-p nucleus of softmax(logits / temperature), in float64: its probabilities in descending
    order, zero outside the nucleus, and the token ids of that order.  [B,V] -> ([B,K], [B,K] long), K <= V

    The nucleus is the shortest prefix of the sorted distribution whose mass reaches top_p (a token is
    kept while the mass before it is < top_p), so the most likely token is always kept; ties keep the
    lower id first (a stable sort), as greedy's argmax does. Only the k most likely tokens are sorted
    (k = 64, then 1024, then all): where the tokens strictly more likely than the k-th already reach top_p,
    the nucleus lies among them and is the full sort's own prefix, ties and all. Whether it does is read on
    the host; where that read is a sync (a GPU: once per generated token), the full sort is taken instead
    (`_sorts_in_full`): the same tokens, no sync."""
    p = torch.softmax(logits.double() / temperature, dim=-1)
    V = p.shape[-1]
    for k in () if _sorts_in_full(p.device) else (64, 1024):
        if k >= V:
            break
        top, ids = torch.topk(p, k, dim=-1)  # every token more likely than the k-th is among them    [B,k]
        n_above = (top > top[:, -1:]).sum(-1, keepdim=True)  # strictly: ties at the k-th may be cut   [B,1]
        ids = ids.sort(-1).values  # by id, so the stable sort below orders ties as the full sort does
        probs, order = torch.sort(p.gather(-1, ids), dim=-1, descending=True, stable=True)
        cdf = probs.cumsum(-1)
        if bool(((n_above > 0) & (cdf.gather(-1, (n_above - 1).clamp_min(0)) >= top_p)).all()):
            return _cut(probs, cdf, top_p), ids.gather(-1, order)
    probs, order = torch.sort(p, dim=-1, descending=True, stable=True)
    return _cut(probs, probs.cumsum(-1), top_p), order


def _sorts_in_full(device: torch.device) -> bool:
    """Whether `nucleus` sorts the whole vocabulary rather than decide on the host if the k most likely
    suffice: on a GPU that decision is a host sync per token, dearer than one sort of [B,V] there; on CPU
    a host read costs nothing and the full sort is what is slow."""
    return device.type != "cpu"


def _cut(probs: Tensor, cdf: Tensor, top_p: float) -> Tensor:
    """Sorted probabilities, zero after the nucleus: a token stays while the mass before it is < top_p."""
    return torch.where(cdf - probs < top_p, probs, torch.zeros_like(probs))


def draw_tokens(logits: Tensor, u: Tensor, temperature: float, top_p: float) -> Tensor:
    """One token per row from the top-p nucleus of softmax(logits / temperature), by inverse CDF of the
    row's uniform u (sekd/core/rng.py `categorical`); temperature 0 is argmax.  logits [B,V], u [B] -> [B] long"""
    if temperature == 0:
        return logits.argmax(-1)
    probs, order = nucleus(logits, temperature, top_p)
    pick = categorical(probs, 1, None, who="on-policy sampling", u=u[:, None])  # [B,1] index in sorted order
    return order.gather(-1, pick).squeeze(-1)


def _cache_kwarg(student: PreTrainedModel) -> str:
    """The name the model's forward takes its KV cache by (`cache` in recent transformers, `past_key_values`
    before)."""
    import inspect

    return "cache" if "cache" in inspect.signature(student.forward).parameters else "past_key_values"


def _check_sampling(temperature: float, top_p: float) -> None:
    if not temperature >= 0:
        raise ValueError(f"temperature={temperature!r}; must be >= 0 (0 = greedy)")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p={top_p!r}; must be in (0, 1]")


def sample_answers(
    student: PreTrainedModel,
    prompts: list[Tensor],
    *,
    pad_id: int,
    eos_id: int,
    temperature: float,
    top_p: float,
    max_new_tokens: int | list[int],
    keys: RowKeys,
) -> list[Tensor]:
    """The student's answers to `prompts`: a batched sampling loop over the model's KV cache.

    The left-padded prompts run once (attention mask, and position ids counted from each row's first
    token, so a row's logits do not depend on the other rows beyond rounding); then one forward per
    new token for the whole batch. Row i's t-th token is drawn from softmax(z / temperature) truncated
    to the top-p nucleus (`draw_tokens`), nothing else (no top-k, none of the model's generation_config),
    by inverse CDF of the t-th uniform of row i's key (sekd/core/rng.py RowKeys, stream "on_policy"): its
    answer depends on its prompt, its key and the weights only, never on the batch, the rank or the
    global RNG, which is not touched. temperature = 0 is greedy decoding. max_new_tokens: one cap for
    every row, or one per row. The student samples in eval mode under no_grad and gets its mode back.

    Returns one 1-D LongTensor per prompt, on the student's device: its generated tokens up to and
    including the first eos, or its cap's worth when it never emitted eos.
    """
    _check_prompts(prompts)
    _check_sampling(temperature, top_p)
    caps = _row_caps(max_new_tokens, len(prompts), keys)
    device = next(student.parameters()).device
    ids, mask = left_pad([p.to(device) for p in prompts], pad_id)
    u = keys.uniform(caps, STREAM, device, torch.float64)  # [B,max cap]: row i's first caps[i] uniforms
    cap = torch.tensor(caps, device=device)
    was_training = student.training
    student.eval()
    try:
        with torch.no_grad():
            out = _decode(student, ids, mask, u, cap, max(caps), pad_id, eos_id, float(temperature), float(top_p))
    finally:
        student.train(was_training)
    return [row[:n] for row, n in zip(out, _answer_lengths(out, eos_id, cap))]


def _row_caps(max_new_tokens: int | list[int], B: int, keys: RowKeys) -> list[int]:
    """Each row's cap on new tokens (one for every row, or one per row), checked, and the keys' count."""
    caps = [int(max_new_tokens)] * B if isinstance(max_new_tokens, int) else [int(n) for n in max_new_tokens]
    if len(caps) != B or min(caps) < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens!r}; must be >= 1 (one value, or one per prompt)")
    if len(keys) != B:
        raise ValueError(f"{len(keys)} row keys for {B} prompts")
    return caps


def _decode(
    student: PreTrainedModel,
    ids: Tensor,
    mask: Tensor,
    u: Tensor,
    cap: Tensor,
    width: int,
    pad_id: int,
    eos_id: int,
    temperature: float,
    top_p: float,
) -> Tensor:
    """The sampling loop: the left-padded prompts ids, mask [B,P] run once, then one forward per new token for
    the whole batch over the model's KV cache; token t of row i drawn with u[i, t].  -> [B,width], pad after
    each row's end (its eos, or its cap)"""
    B = ids.shape[0]
    out = torch.full((B, width), int(pad_id), dtype=torch.long, device=ids.device)
    done = torch.zeros(B, dtype=torch.bool, device=ids.device)
    step = {_cache_kwarg(student): _new_cache(student), "use_cache": True, "logits_to_keep": 1}
    pos = (mask.cumsum(-1) - 1).clamp_min(0)  # each row's own positions 0.. from its first token
    logits = student(input_ids=ids, attention_mask=mask, position_ids=pos, **step).logits[:, -1]
    for t in range(width):
        tok = draw_tokens(logits, u[:, t], temperature, top_p)
        tok = torch.where(done, torch.full_like(tok, int(pad_id)), tok)
        out[:, t] = tok
        done |= (tok == int(eos_id)) | (t + 1 >= cap)
        # whether every row has finished is read on the host every SYNC_EVERY tokens (and at the last):
        # a row that finished earlier only writes pad, which its answer drops, so the answers are the
        # same; a batch that ended early runs at most SYNC_EVERY - 1 forwards more
        if t + 1 == width or ((t + 1) % SYNC_EVERY == 0 and bool(done.all())):
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        pos = pos[:, -1:] + 1
        logits = student(input_ids=tok[:, None], attention_mask=mask, position_ids=pos, **step).logits[:, -1]
    return out


def _new_cache(student: PreTrainedModel) -> DynamicCache:
    """An empty KV cache the forward fills in place (transformers' DynamicCache)."""
    from transformers import DynamicCache

    try:
        return DynamicCache(config=student.config)
    except TypeError:  # older transformers: no config argument
        return DynamicCache()


def _answer_lengths(out: Tensor, eos_id: int, cap: Tensor) -> list[int]:
    """Each row's answer length: up to and including its first eos, or its cap without one; read to the host
    once for the batch.  out [B,W], cap [B] -> B ints"""
    hit = out == eos_id  #                                                                    [B,W]
    first = torch.where(hit.any(-1), hit.int().argmax(-1) + 1, cap)  # argmax: the first of equal maxima
    return torch.minimum(first, cap).tolist()


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
    rows = [
        torch.cat([p.to(device=device, dtype=torch.long), a.to(device=device, dtype=torch.long).reshape(-1)])
        for p, a in zip(prompts, answers)
    ]
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


def answer_caps(prompts: list[Tensor], max_new_tokens: int, seq_len: int | None) -> list[int]:
    """Each row's cap on generated tokens: max_new_tokens, and with seq_len no more than its row can keep
    (seq_len + 1 - its prompt length, at least 0). A row's own, never the batch's."""
    caps = [int(max_new_tokens)] * len(prompts)
    if seq_len is None:
        return caps
    return [max(0, min(c, int(seq_len) + 1 - p.numel())) for c, p in zip(caps, prompts)]


def rollout(
    student: PreTrainedModel,
    prompts: list[Tensor],
    *,
    pad_id: int,
    eos_id: int,
    temperature: float,
    top_p: float,
    max_new_tokens: int,
    keys: RowKeys,
    seq_len: int | None = None,
) -> Rollout:
    """sample_answers then build_rollout; with seq_len, each row samples at most what it can keep."""
    answers = rollout_answers(
        student,
        prompts,
        pad_id=pad_id,
        eos_id=eos_id,
        temperature=temperature,
        top_p=top_p,
        max_new_tokens=max_new_tokens,
        keys=keys,
        seq_len=seq_len,
    )
    return build_rollout(prompts, answers, pad_id=pad_id, seq_len=seq_len)


def rollout_answers(
    student: PreTrainedModel,
    prompts: list[Tensor],
    *,
    pad_id: int,
    eos_id: int,
    temperature: float,
    top_p: float,
    max_new_tokens: int,
    keys: RowKeys,
    seq_len: int | None = None,
) -> list[Tensor]:
    """The answers `rollout` trains on, one per prompt (empty where the prompt fills seq_len). A row's answer
    depends on its prompt and key only, so the prompts of several micro-batches can be sampled at once."""
    _check_prompts(prompts)
    if len(keys) != len(prompts):
        raise ValueError(f"{len(keys)} row keys for {len(prompts)} prompts")
    _check_sampling(temperature, top_p)
    caps = answer_caps(prompts, max_new_tokens, seq_len)
    answers = [torch.zeros(0, dtype=torch.long, device=p.device) for p in prompts]
    live = [i for i, c in enumerate(caps) if c > 0]  # a prompt that fills seq_len gets no answer
    if live:
        got = sample_answers(
            student,
            [prompts[i] for i in live],
            pad_id=pad_id,
            eos_id=eos_id,
            temperature=temperature,
            top_p=top_p,
            max_new_tokens=[caps[i] for i in live],
            keys=RowKeys(tuple(keys.keys[i] for i in live)),
        )
        for i, a in zip(live, got):
            answers[i] = a
    return answers


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
