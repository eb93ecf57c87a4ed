"""No host sync per chunk or per generated token (docs/method.md §9).

On a GPU, reading a tensor's value on the host (`.item()`, `bool(t)`, `.tolist()`, `.nonzero()`, ...)
waits for every queued kernel, so the next launches cannot overlap the running ones. The chunked step
syncs a fixed number of times per step (selection, counts), never per chunk: the criteria's closed forms
keep their 0 log 0 = 0 guard branch-free, and the positions' keys are drawn once per step and read on the
device (sekd/core/rng.py `PositionKeys`). On-policy sampling checks whether every row has finished once every
`SYNC_EVERY` tokens, not per token, and draws each token's nucleus without a host-side decision.

Counted on CPU by wrapping the Tensor methods that read values to the host; the numbers themselves are
held equal across chunkings and samplings by tests/kd/test_protocols.py, test_flows.py, test_on_policy.py.
"""

from __future__ import annotations

import os
import sys
from collections import Counter
from contextlib import contextmanager

import pytest
import torch

from sekd.kd.flows import chunked_kd_loss
from sekd.kd.objective import LossInputs, Selector
from sekd.selection.classes import CLASSES
from sekd.selection.criteria import CRITERIA
from sekd.selection.policies import POLICIES
from sekd.selection.signals import SIGNALS
from tests.kd.test_flows import V, batch, heads

SYNCS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero", "cpu", "numpy")


@contextmanager
def host_syncs(skip: tuple[str, ...] = (), only: str = ""):
    """Counts calls of the Tensor methods that read a value to the host, by (method, calling file); calls
    from a file whose path ends with one of `skip`, or does not contain `only`, are not counted."""
    seen: Counter = Counter()
    originals = {name: getattr(torch.Tensor, name) for name in SYNCS}

    def wrapped(name, orig):
        def call(self, *args, **kwargs):
            where = sys._getframe(1).f_code.co_filename
            if not where.endswith(skip) and only in where:
                seen[name, os.path.basename(where)] += 1
            return orig(self, *args, **kwargs)

        return call

    for name, orig in originals.items():
        setattr(torch.Tensor, name, wrapped(name, orig))
    try:
        yield seen
    finally:
        for name, orig in originals.items():
            setattr(torch.Tensor, name, orig)


CASES = {
    "forward_kl_closed_form": (
        lambda: Selector(SIGNALS.get("student_entropy"), POLICIES.build("top_k", k=0.8), CRITERIA.build("forward_kl")),
        1.0,
    ),
    "reverse_kl_closed_form": (
        lambda: Selector(SIGNALS.get("student_entropy"), POLICIES.build("top_k", k=0.8), CRITERIA.build("reverse_kl")),
        1.0,
    ),
    # rs_kd's sparse target has a data-dependent width per chunk (the most distinct classes a position drew,
    # sekd/selection/draws.py): those reads are its own; what is held here is the positions' keys (sekd/core/rng.py)
    "rs_kd_keys": (
        lambda: Selector(
            SIGNALS.get("student_entropy"),
            POLICIES.build("top_k", k=0.8),
            CRITERIA.build("forward_kl"),
            classes=CLASSES.build("rs_kd", n_draws=8),
        ),
        0.7,
    ),
}


def chunked_step_syncs(case: str, chunk_size: int) -> Counter:
    head_s, head_t = heads(0)
    h_s, h_t, y = batch(0)
    sel, lam = CASES[case]
    h = h_s.clone().requires_grad_()
    selector = sel()
    with host_syncs(skip=("sekd/selection/draws.py",) if case == "rs_kd_keys" else ()) as seen:
        out = chunked_kd_loss(
            h,
            head_s,
            h_t,
            head_t,
            y,
            LossInputs(selector, lam=lam, temperature=1.0, generator=torch.Generator().manual_seed(0), rows=[4, 5, 6]),
            vocab=V,
            chunk_size=chunk_size,
        )
        out.loss_sum.backward()
    return seen


@pytest.mark.parametrize("case", sorted(CASES))
def test_chunked_step_syncs_do_not_grow_with_the_chunks(case):
    """1, 2 or 1000 positions a chunk (~25 chunks to one): the same host reads, all of them per step."""
    counts = {c: chunked_step_syncs(case, c) for c in (1000, 2, 1)}
    assert counts[1] == counts[2] == counts[1000], counts


# ---- on-policy sampling ---------------------------------------------------------------------


def tiny_student(vocab: int):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen3Config(
        vocab_size=vocab,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        eos_token_id=1,
        pad_token_id=0,
        bos_token_id=None,
        tie_word_embeddings=True,
    )
    return Qwen3ForCausalLM._from_config(cfg, dtype=torch.float64)


def sampled(model, vocab: int, max_new: int, top_p: float) -> tuple[list[torch.Tensor], Counter]:
    from sekd.kd.on_policy import sample_answers
    from sekd.core.rng import RowKeys

    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(2, vocab, (n,), generator=g) for n in (2, 5, 9)]
    with host_syncs(only=os.sep + "sekd" + os.sep) as seen:  # the model's own forward is not sekd's to change
        answers = sample_answers(
            model,
            prompts,
            pad_id=0,
            eos_id=1,
            temperature=1.5,
            top_p=top_p,
            max_new_tokens=max_new,
            keys=RowKeys.of_samples(3, 0, range(3)),
        )
    return answers, seen


def test_on_policy_sampling_syncs_do_not_grow_with_the_tokens():
    """3 or 15 new tokens (under SYNC_EVERY): the same host reads (each answer's cut after its eos), none per
    token; 40 tokens add one check every SYNC_EVERY tokens."""
    from sekd.kd.on_policy import SYNC_EVERY

    model = tiny_student(50)
    counts = {n: sampled(model, 50, n, 1.0)[1] for n in (3, 15, 40)}
    assert counts[3] == counts[15], counts
    assert sum(counts[40].values()) <= sum(counts[15].values()) + 40 // SYNC_EVERY, counts


def test_nucleus_without_host_decision_samples_the_same_tokens(monkeypatch):
    """On a GPU `nucleus` sorts the whole vocabulary instead of deciding on the host whether the most likely
    tokens suffice (a sync per token there): forced here on CPU, at a vocabulary past the top-k path's
    1024, the answers are the top-k path's bit for bit, with no host read per token."""
    import sekd.kd.on_policy as on_policy

    model = tiny_student(3000)
    ref = {n: sampled(model, 3000, n, 0.9) for n in (3, 15)}
    assert sum(ref[15][1].values()) > sum(ref[3][1].values())  # the CPU path reads its decision every token
    monkeypatch.setattr(on_policy, "_sorts_in_full", lambda device: True)
    got = {n: sampled(model, 3000, n, 0.9) for n in (3, 15)}
    assert got[3][1] == got[15][1], got
    for n in (3, 15):
        assert all(torch.equal(a, b) for a, b in zip(got[n][0], ref[n][0]))
