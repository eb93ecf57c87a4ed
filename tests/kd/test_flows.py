"""The chunked flow (sekd/kd/flows.py) equals the dense reference on the heads' logits, in float64:
loss, weight, draws, scores and every gradient (hidden states, head weight and bias); and it holds
far less memory at a logit-heavy shape."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from sekd.kd.flows import chunked_kd_loss
from sekd.kd.objective import IGNORE, LossInputs, Selector, selective_kd_loss
from sekd.selection.classes import CLASSES
from sekd.selection.criteria import CRITERIA
from sekd.selection.policies import POLICIES
from sekd.selection.signals import SIGNALS

from sekd.testing.flows import D_S, PAD, V, assert_same, batch, both, cached_targets, heads  # noqa: F401  shared with users


def sel(policy="all", signal=None, criterion="forward_kl", classes=None, normalization="sum", crit_opts=None, **opts):
    return Selector(
        SIGNALS.get(signal) if signal else None,
        POLICIES.build(policy, **opts),
        CRITERIA.build(criterion, **(crit_opts or {})),
        signal_normalization=normalization,
        classes=classes,
    )


CASES = {
    "full_kd": lambda: sel("all"),
    "se_kd": lambda: sel("top_k", "student_entropy", k=0.3),
    "kl_top_k": lambda: sel("top_k", "kl", k=0.3),
    "zscore_kl_plus_entropy": lambda: sel("top_k", "kl_plus_student_entropy", normalization="zscore", k=0.4),
    "ce_ratio_curriculum": lambda: sel("curriculum", "ce_ratio", k=0.3, S=10),
    "pos_rs_star": lambda: sel("pos_rs_star", "student_entropy", k=0.3),
    "pos_rs_coverage": lambda: sel("pos_rs", "teacher_entropy", k=0.5, coverage=0.5, tau=0.5),
    "random_signal": lambda: sel("top_k", "random", k=0.3),
    "random_policy": lambda: sel("random", None, k=0.3),
    "reverse_kl": lambda: sel("top_k", "student_entropy", "reverse_kl", k=0.5),
    "dkd": lambda: sel("all", None, "dkd", crit_opts={"beta": 4.0}),
    "atkd": lambda: sel("all", None, "atkd"),
    "atkd_options": lambda: sel(
        "top_k", "student_entropy", "atkd", k=0.6, crit_opts={"hard_fraction": 0.3, "easy_weight": 0.1}
    ),
    "weighted": lambda: sel("top_k", "student_entropy", "weighted", k=0.5),
    "weighted_all": lambda: sel("all", "teacher_ce", "weighted"),
    "top_k_truncation": lambda: sel(
        "top_k", "student_entropy", k=0.4, classes=CLASSES.build("top_k_truncation", top=5)
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("normalization", ["per_sequence", "batch_tokens"])
def test_chunked_equals_dense(case, normalization):
    assert_same(*both(CASES[case], normalization=normalization, chunk_size=3))


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 1000])
@pytest.mark.parametrize("case", ["full_kd", "se_kd", "atkd", "weighted", "kl_top_k"])
def test_any_chunk_size(chunk_size, case):
    assert_same(*both(CASES[case], chunk_size=chunk_size, seed=chunk_size))


@pytest.mark.parametrize("lam,temperature", [(0.5, 2.0), (0.0, 1.0), (0.3, 1.5)])
@pytest.mark.parametrize("case", ["full_kd", "se_kd", "dkd", "top_k_truncation"])
def test_lam_and_temperature(lam, temperature, case):
    assert_same(*both(CASES[case], lam=lam, temperature=temperature, seed=2))


def test_pure_ce_needs_no_teacher():
    assert_same(*both(CASES["se_kd"], lam=0.0, teacher=False))


@pytest.mark.parametrize("chunk_size", [1, 4, 1000])
@pytest.mark.parametrize("case", ["se_kd", "full_kd", "pos_rs_star"])
def test_cached_targets_need_no_teacher(chunk_size, case):
    d, c = both(CASES[case], cached=cached_targets(), teacher=False, seed=3, chunk_size=chunk_size, lam=0.7)
    assert_same(d, c)
    assert c[0].metrics["head_positions_teacher"] == 0


def test_rs_kd_draws_as_dense_in_any_chunking():
    """rs_kd draws per position from its row's key (sekd/core/rng.py `PositionKeys`): one chunk or many, the
    chunked flow draws the dense flow's classes."""
    case = lambda: sel("top_k", "student_entropy", k=0.4, classes=CLASSES.build("rs_kd", n_draws=8))  # noqa: E731
    assert_same(*both(case, chunk_size=1000))
    assert_same(*both(case, chunk_size=2))


def test_unknown_criterion_runs_as_one_chunk():
    """A criterion this module does not know may couple positions: it sees all of them at once."""
    seen = []

    def batch_mean_kl(s, t, y, *, temperature=1.0, row=None, u=None):
        seen.append(s.shape[0])
        kl = CRITERIA.get("forward_kl")(s, t, y, temperature=temperature)
        return kl * (1 + kl.detach().mean())  # couples every position through the batch mean

    case = lambda: Selector(SIGNALS.get("student_entropy"), POLICIES.build("top_k", k=0.5), batch_mean_kl)  # noqa
    d, c = both(case, chunk_size=2)
    assert_same(d, c)
    assert seen[0] == seen[1]  # dense call, then the chunked flow's single chunk


def test_selective_heads_run_only_where_needed():
    h_s, h_t, y = batch()
    head_s, head_t = heads()
    n_valid = int((y != IGNORE).sum())

    def run(selector):
        return chunked_kd_loss(
            h_s.clone().requires_grad_(),
            head_s,
            h_t,
            head_t,
            y,
            LossInputs(selector, lam=1.0, temperature=1.0),
            vocab=V,
            chunk_size=4,
        ).metrics

    m = run(sel("top_k", "student_entropy", k=0.2))  # SE-KD: teacher head at the selected positions only
    assert m["head_positions_teacher"] == m["positions_selected"] < n_valid
    assert m["head_positions_student"] == n_valid + m["positions_selected"]
    m = run(sel("top_k", "kl", k=0.2))  # a teacher signal: teacher head everywhere, then at the selection
    assert m["head_positions_teacher"] == n_valid + m["positions_selected"]
    m = run(sel("all"))  # Full KD: no scoring pass
    assert m["head_positions_student"] == m["head_positions_teacher"] == n_valid


def test_tied_head_and_frozen_head():
    """A tied head sums the gradients of both uses; a frozen head gets none and costs none."""
    h_s, h_t, y = batch()
    head_s, head_t = heads(bias=False)
    emb = torch.nn.Embedding(V + PAD, D_S, dtype=torch.float64)
    emb.weight = head_s.weight  # tied
    x = y.clamp_min(0)
    for flow in ("dense", "chunked"):
        head_s.zero_grad()
        h = h_s + emb(x)
        if flow == "dense":
            out = selective_kd_loss(
                F.linear(h, head_s.weight)[..., :V],
                F.linear(h_t, head_t.weight)[..., :V],
                y,
                LossInputs(sel("top_k", "student_entropy", k=0.3), lam=1.0, temperature=1.0),
            )
        else:
            out = chunked_kd_loss(
                h,
                head_s,
                h_t,
                head_t,
                y,
                LossInputs(sel("top_k", "student_entropy", k=0.3), lam=1.0, temperature=1.0),
                vocab=V,
                chunk_size=5,
            )
        out.loss_sum.backward()
        if flow == "dense":
            dense_grad = head_s.weight.grad.clone()
    torch.testing.assert_close(head_s.weight.grad, dense_grad, rtol=1e-9, atol=1e-12)

    head_s.zero_grad()
    head_s.requires_grad_(False)
    h = h_s.clone().requires_grad_()
    out = chunked_kd_loss(
        h, head_s, h_t, head_t, y, LossInputs(sel("all"), lam=1.0, temperature=1.0), vocab=V, chunk_size=5
    )
    out.loss_sum.backward()
    assert h.grad is not None and head_s.weight.grad is None


def test_errors_match_the_dense_flow():
    h_s, h_t, y = batch()
    head_s, head_t = heads()
    with pytest.raises(ValueError, match="needs teacher logits"):
        chunked_kd_loss(h_s, head_s, None, None, y, LossInputs(sel("all"), lam=1.0, temperature=1.0), vocab=V)
    with pytest.raises(ValueError, match="needs teacher logits at every position"):
        chunked_kd_loss(
            h_s, head_s, None, None, y, LossInputs(sel("top_k", "kl", k=0.2), lam=0.0, temperature=1.0), vocab=V
        )
    with pytest.raises(ValueError, match="wider than the LM head"):
        chunked_kd_loss(
            h_s, head_s, h_t, head_t, y, LossInputs(sel("all"), lam=1.0, temperature=1.0), vocab=V + PAD + 1
        )
    with pytest.raises(ValueError, match="normalization"):
        chunked_kd_loss(
            h_s, head_s, h_t, head_t, y, LossInputs(sel("all"), lam=1.0, temperature=1.0, normalization="mean"), vocab=V
        )


def test_no_valid_target_gives_zero_loss_and_grads():
    h_s, h_t, y = batch()
    head_s, head_t = heads()
    h = h_s.clone().requires_grad_()
    out = chunked_kd_loss(
        h,
        head_s,
        h_t,
        head_t,
        torch.full_like(y, IGNORE),
        LossInputs(sel("top_k", "student_entropy", k=0.2), lam=1.0, temperature=1.0),
        vocab=V,
    )
    out.loss_sum.backward()
    assert out.weight == 0.0 and float(out.loss_sum.detach()) == 0.0 and not h.grad.any()


# ---- memory: the point of the flow -------------------------------------------------------------

PEAK = textwrap.dedent("""
    import json, re, sys, torch, torch.nn.functional as F
    from sekd.kd.flows import chunked_kd_loss
    from sekd.kd.objective import LossInputs, Selector, selective_kd_loss
    from sekd.selection.criteria import forward_kl
    from sekd.selection.policies import POLICIES
    from sekd.selection.signals import SIGNALS
    torch.set_num_threads(1)
    torch.manual_seed(0)  # the heads' init
    flow, signal = sys.argv[1], sys.argv[2]
    B, T, d, V = 4, 256, 64, 32768
    g = torch.Generator().manual_seed(0)
    head_s, head_t = torch.nn.Linear(d, V, bias=False), torch.nn.Linear(d, V, bias=False).requires_grad_(False)
    h_s = torch.randn(B, T, d, generator=g, requires_grad=True)
    h_t = torch.randn(B, T, d, generator=g)
    y = torch.randint(0, V, (B, T), generator=g)
    sel = Selector(SIGNALS.get(signal) if signal != "none" else None,
                   POLICIES.build("top_k", k=0.2) if signal != "none" else POLICIES.build("all"), forward_kl)
    # VmHWM, this process's own peak RSS: ru_maxrss would carry over the forking pytest's (Linux keeps it
    # across exec), which can dwarf what the flows use
    hwm = lambda: int(re.search(r"VmHWM:\\s+(\\d+)", open("/proc/self/status").read())[1])  # KiB
    base = hwm()
    if flow == "dense":
        out = selective_kd_loss(head_s(h_s), head_t(h_t), y, LossInputs(sel, lam=1.0, temperature=1.0))
    else:
        out = chunked_kd_loss(h_s, head_s, h_t, head_t, y, LossInputs(sel, lam=1.0, temperature=1.0), vocab=V, chunk_size=128)
    out.loss_sum.backward()
    peak = hwm()
    print(json.dumps({"base_kib": base, "peak_kib": peak, "loss": float(out.loss_sum.detach())}))
""")


def peak_rss(flow: str, signal: str) -> dict:
    from tests.helpers import ROOT

    res = subprocess.run(
        [sys.executable, "-c", PEAK, flow, signal], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("signal", ["none", "student_entropy"])  # Full KD, SE-KD
def test_chunked_peak_memory_is_far_below_dense(signal):
    """[4,256,32768] float32 logits are 128 MiB a tensor; the chunked flow holds [128,32768] at a time."""
    dense, chunked = peak_rss("dense", signal), peak_rss("chunked", signal)
    assert chunked["loss"] == pytest.approx(dense["loss"], rel=1e-4)
    above = {k: r["peak_kib"] - r["base_kib"] for k, r in (("dense", dense), ("chunked", chunked))}
    assert above["chunked"] < 0.3 * above["dense"], above
    assert chunked["peak_kib"] < 0.7 * dense["peak_kib"], (chunked, dense)


def test_tiny_qwen3_pair_trainer_recipe():
    """The trainer's call: body hidden states + get_output_embeddings() equals model(x).logits[..., :V],
    in every student parameter's gradient (tied embedding included), float64, padded vocabulary."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    def model(d, layers, seed):
        torch.manual_seed(seed)
        cfg = Qwen3Config(
            vocab_size=V + PAD,
            hidden_size=d,
            intermediate_size=2 * d,
            num_hidden_layers=layers,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=d // 2,
            tie_word_embeddings=True,
            use_cache=False,
        )
        return Qwen3ForCausalLM._from_config(cfg, dtype=torch.float64)

    student, teacher = model(16, 1, 0), model(32, 2, 1).requires_grad_(False)
    _, _, y = batch(4)
    x = torch.randint(0, V, y.shape, generator=torch.Generator().manual_seed(4))
    selector = lambda: sel("top_k", "student_entropy", k=0.4)  # noqa: E731
    grads = {}
    for flow in ("dense", "chunked"):
        student.zero_grad()
        kw = dict(lam=0.8, temperature=1.0, generator=torch.Generator().manual_seed(0))
        if flow == "dense":
            out = selective_kd_loss(
                student(input_ids=x).logits[..., :V],
                teacher(input_ids=x).logits[..., :V],
                y,
                LossInputs(selector(), **kw),
            )
        else:
            h_s = student.get_decoder()(input_ids=x).last_hidden_state  # [B,T,d]
            with torch.no_grad():
                h_t = teacher.get_decoder()(input_ids=x).last_hidden_state
            out = chunked_kd_loss(
                h_s,
                student.get_output_embeddings(),
                h_t,
                teacher.get_output_embeddings(),
                y,
                LossInputs(selector(), **kw),
                vocab=V,
                chunk_size=4,
            )
        (out.loss_sum / out.weight).backward()
        grads[flow] = {n: p.grad.clone() for n, p in student.named_parameters()}
    assert grads["dense"].keys() == grads["chunked"].keys()
    for name, g in grads["dense"].items():
        torch.testing.assert_close(grads["chunked"][name], g, rtol=1e-9, atol=1e-12, msg=name)


def test_scratch_blocks_are_reused_across_chunks_and_steps():
    # the chunked flow's [C,V] blocks: one allocation serves every chunk of every step (no fresh block per chunk)
    from sekd.kd.flows import Scratch

    scratch = Scratch()
    a, b, c = scratch.blocks(3, 8, 100, torch.float32, "cpu")
    again = scratch.blocks(3, 5, 100, torch.float32, "cpu")  # a smaller last chunk: views of the same blocks
    assert [x.data_ptr() for x in again] == [x.data_ptr() for x in (a, b, c)]
    assert again[0].shape == (5, 100) and again[0].is_contiguous()
    bigger = scratch.blocks(2, 16, 100, torch.float32, "cpu")  # a larger chunk: new blocks, the old ones dropped
    assert bigger[0].shape == (16, 100) and len(scratch._blocks[(torch.device("cpu"), torch.float32)]) == 3
    scratch.release(torch.device("cpu"))  # kept on the CPU for the next step
    assert scratch.blocks(1, 16, 100, torch.float32, "cpu")[0].data_ptr() == bigger[0].data_ptr()
    assert scratch.blocks(1, 4, 4, torch.float64, "cpu")[0].dtype == torch.float64  # per dtype


@pytest.mark.parametrize("name", CLASSES.names())
def test_every_class_sampler_runs_the_teacher_head_at_the_selected_positions_a_chunk_at_a_time(name, monkeypatch):
    """No [B,T,V] teacher logits under any sparse target: the teacher's head runs at the selected
    positions only, at most chunk_size of them a call (the selective head), counted where it runs."""
    from sekd.kd import flows

    h_s, h_t, y = batch(2)
    head_s, head_t = heads()
    calls: list[int] = []
    run = flows.Head.__call__

    def counted(self, h):
        if self.weight.shape[1] == head_t.in_features and self.weight.shape[1] != head_s.in_features:
            calls.append(h.shape[0])
        return run(self, h)

    monkeypatch.setattr(flows.Head, "__call__", counted)
    sampler = CLASSES.build(name, **CLASSES.get(name).example)
    out = chunked_kd_loss(
        h_s.clone().requires_grad_(),
        head_s,
        h_t,
        head_t,
        y,
        LossInputs(sel("top_k", "student_entropy", k=0.5, classes=sampler), lam=1.0, temperature=1.0),
        vocab=V,
        chunk_size=4,
    )
    n = out.metrics["positions_selected"]
    assert calls and max(calls) <= 4 and sum(calls) == n == out.metrics["head_positions_teacher"]
