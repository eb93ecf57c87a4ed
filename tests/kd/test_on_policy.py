"""On-policy rollouts (docs/method.md §10): the KD mask covers exactly the student's generated tokens, the
right-aligned rows give every real position its unpadded logits, sampling draws each row from its own
key whatever the batch, follows the top-p/temperature distribution, and leaves the global RNG and the
model's mode alone, reverse KL and selection act on generated positions only, and the on/off-policy
mixing schedule."""

from __future__ import annotations

import math

import pytest
import torch

from sekd.kd.objective import LossInputs, Selector, selective_kd_loss
from sekd.kd.on_policy import (
    IGNORE,
    Rollout,
    answer_caps,
    build_rollout,
    draw_tokens,
    left_pad,
    nucleus,
    on_policy_count,
    on_policy_step,
    rollout,
    sample_answers,
)
from sekd.core.rng import RowKeys
from sekd.selection.criteria import CRITERIA
from sekd.selection.policies import POLICIES, n_select
from sekd.selection.signals import SIGNALS

V, EOS, PAD = 50, 1, 0
LENGTHS = (2, 5, 9)
MAX_NEW = 12


def tiny(seed: int, d: int = 32, layers: int = 2):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen3Config(
        vocab_size=V,
        hidden_size=d,
        intermediate_size=2 * d,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=d // 2,
        eos_token_id=EOS,
        pad_token_id=PAD,
        bos_token_id=None,
        tie_word_embeddings=True,
    )
    return Qwen3ForCausalLM._from_config(cfg, dtype=torch.float64)


@pytest.fixture(scope="module")
def student():
    return tiny(0)


@pytest.fixture(scope="module")
def teacher():
    return tiny(1, d=48).requires_grad_(False)


def prompts(lengths=LENGTHS, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, V, (n,), generator=g) for n in lengths]  # no eos/pad inside prompts


def keys(seed: int, n: int = len(LENGTHS)) -> RowKeys:
    """Row i keyed as global sample i at step 0 of a run seeded `seed`."""
    return RowKeys.of_samples(seed, 0, range(n))


def sample(model, ps, seed, pad=PAD, temperature=1.5, top_p=1.0, max_new=MAX_NEW):
    return sample_answers(
        model,
        ps,
        pad_id=pad,
        eos_id=EOS,
        temperature=temperature,
        top_p=top_p,
        max_new_tokens=max_new,
        keys=keys(seed, len(ps)),
    )


def roll(model, ps, seed, **kw):
    opts = {**dict(pad_id=PAD, eos_id=EOS, temperature=1.5, top_p=1.0, max_new_tokens=MAX_NEW), **kw}
    return rollout(model, ps, keys=keys(seed, len(ps)), **opts)


def mixed_seed(model, ps, pad=PAD) -> int:
    """A seed whose samples have both a row that stops at eos and a row that runs to max_new_tokens."""
    for seed in range(200):
        lens = [a.numel() for a in sample(model, ps, seed, pad=pad)]
        if any(n < MAX_NEW for n in lens) and any(n == MAX_NEW for n in lens):
            return seed
    raise AssertionError("no seed gives both an early eos and a full-length answer")


def greedy_unpadded(model, prompt, max_new) -> torch.Tensor:
    """Greedy decoding of one prompt alone: full forward each step, no cache, no padding."""
    seq = prompt.clone()
    with torch.no_grad():
        for _ in range(max_new):
            nxt = model(input_ids=seq[None]).logits[0, -1].argmax()
            seq = torch.cat([seq, nxt[None]])
            if int(nxt) == EOS:
                break
    return seq[prompt.numel() :]


# ---- padding and the mask -------------------------------------------------------------------


def test_left_pad():
    ids, mask = left_pad([torch.tensor([5, 6]), torch.tensor([7, 8, 9])], pad_id=3)
    assert ids.tolist() == [[3, 5, 6], [7, 8, 9]]
    assert mask.tolist() == [[0, 1, 1], [1, 1, 1]]
    with pytest.raises(ValueError):
        left_pad([torch.tensor([], dtype=torch.long)], pad_id=0)


@pytest.mark.parametrize("pad", [PAD, EOS], ids=["pad_ne_eos", "pad_is_eos"])
def test_mask_covers_exactly_the_generated_tokens(student, pad):
    ps = prompts()
    seed = mixed_seed(student, ps, pad=pad)
    answers = sample(student, ps, seed, pad=pad)
    r = build_rollout(ps, answers, pad_id=pad)
    n = [p.numel() + a.numel() for p, a in zip(ps, answers)]
    assert r.input_ids.shape == r.labels.shape == (3, max(n) - 1)
    assert r.prompt_lens.tolist() == list(LENGTHS)
    assert r.gen_lens.tolist() == [a.numel() for a in answers]
    for i, (p, a) in enumerate(zip(ps, answers)):
        # eos ends an early stop, and only there; a full-length row has none
        assert int((a == EOS).sum()) == (a.numel() < MAX_NEW) and (a.numel() == MAX_NEW or int(a[-1]) == EOS)
        w = torch.cat([p, a])
        assert r.input_ids[i, : n[i]].tolist() == w[: r.input_ids.shape[1]].tolist()
        assert (r.input_ids[i, n[i] :] == pad).all()
        expected = torch.full((r.labels.shape[1],), IGNORE)
        expected[p.numel() - 1 : n[i] - 1] = a  # position t predicts w[t+1]: the generated tokens
        assert r.labels[i].tolist() == expected.tolist()
        assert int((r.labels[i] != IGNORE).sum()) == a.numel()


def test_seq_len_cuts_the_answer_tail_never_the_prompt(student):
    ps = prompts((2, 5, 9, 14))
    answers = [torch.arange(10, 10 + k) for k in (6, 3, 8, 2)]
    r = build_rollout(ps, answers, pad_id=PAD, seq_len=10)  # 11 tokens per row
    assert r.input_ids.shape == r.labels.shape == (4, 10)
    assert r.gen_lens.tolist() == [6, 3, 2, 0]  # row 2 keeps 11 - 9 tokens; row 3's prompt fills the row
    for i, (p, a) in enumerate(zip(ps, answers)):
        kept = torch.cat([p, a])[:11]
        assert r.input_ids[i, : kept.numel() - 1].tolist() == kept[:-1].tolist()
        got = r.labels[i][r.labels[i] != IGNORE]
        assert got.tolist() == a[: int(r.gen_lens[i])].tolist()
    # seq_len longer than every row: padded to exactly seq_len
    assert build_rollout(ps, answers, pad_id=PAD, seq_len=40).input_ids.shape == (4, 40)

    # rollout caps each row's answer at what that row can keep: the kept tokens are unchanged
    ps = prompts()
    assert answer_caps(ps, MAX_NEW, 8) == [7, 4, 0] and answer_caps(ps, MAX_NEW, None) == [MAX_NEW] * 3
    full = roll(student, ps, 3)
    cut = roll(student, ps, 3, seq_len=8)
    assert cut.input_ids.shape == (3, 8)
    for i, n in enumerate(LENGTHS):
        keep = max(0, min(int(full.gen_lens[i]), 9 - n))
        assert int(cut.gen_lens[i]) == keep
        a_full = full.labels[i][full.labels[i] != IGNORE][:keep]
        assert cut.labels[i][cut.labels[i] != IGNORE].tolist() == a_full.tolist()
    nothing = roll(student, ps, 3, seq_len=1)
    assert (nothing.labels == IGNORE).all() and nothing.gen_lens.tolist() == [0, 0, 0]


# ---- alignment -------------------------------------------------------------------------------


def test_right_aligned_logits_equal_masked_left_padded_and_unpadded(student):
    ps = prompts()
    seed = mixed_seed(student, ps)
    r = roll(student, ps, seed)
    rows = [torch.cat([p, r.labels[i][r.labels[i] != IGNORE]]) for i, p in enumerate(ps)]
    with torch.no_grad():
        right = student(input_ids=r.input_ids).logits  # the trainer's call: no attention mask
        ids, mask = left_pad(rows, PAD)
        pos = (mask.cumsum(-1) - 1).clamp_min(0)
        left = student(input_ids=ids, attention_mask=mask, position_ids=pos).logits  # the sampler's
        # a plain forward of the left-padded batch is NOT aligned: the test can tell
        naive = student(input_ids=ids).logits
    checked = 0
    for i, w in enumerate(rows):
        n = w.numel()
        with torch.no_grad():
            alone = student(input_ids=w[None]).logits[0]  # [n,V]
        gen = (r.labels[i] != IGNORE).nonzero().squeeze(-1)  # generated positions (right-aligned index)
        off = ids.shape[1] - n  # left padding of this row
        torch.testing.assert_close(right[i, gen], alone[gen], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(right[i, gen], left[i, off + gen], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(right[i, : n - 1], alone[: n - 1], rtol=1e-10, atol=1e-10)  # every real position
        if off:
            assert not torch.allclose(naive[i, off + gen], alone[gen])
        checked += gen.numel()
    assert checked == int(r.gen_lens.sum()) > 0


def test_batched_greedy_equals_unpadded_greedy_and_tiny_top_p_is_greedy(student):
    ps = prompts()
    ref = [greedy_unpadded(student, p, MAX_NEW) for p in ps]
    greedy = sample(student, ps, seed=0, temperature=0.0)
    assert [a.tolist() for a in greedy] == [a.tolist() for a in ref]
    for seed in (0, 1):
        tiny_p = sample(student, ps, seed=seed, temperature=0.7, top_p=1e-6)
        assert [a.tolist() for a in tiny_p] == [a.tolist() for a in ref]
    assert any(a.tolist() != b.tolist() for a, b in zip(sample(student, ps, seed=0, temperature=0.7, top_p=0.9), ref))


# ---- reproducibility -------------------------------------------------------------------------


def test_seeded_rng_untouched_mode_and_generation_config_restored(student):
    ps = prompts()
    own = student.generation_config
    for training in (True, False):
        student.train(training)
        state = torch.get_rng_state()
        a = sample(student, ps, seed=7, temperature=0.7, top_p=0.9)
        assert torch.equal(torch.get_rng_state(), state)
        assert student.training is training
        assert student.generation_config is own
        b = sample(student, ps, seed=7, temperature=0.7, top_p=0.9)
        assert [x.tolist() for x in a] == [x.tolist() for x in b]
    c = sample(student, ps, seed=8, temperature=0.7, top_p=0.9)
    assert [x.tolist() for x in a] != [x.tolist() for x in c]
    student.eval()


def test_a_rows_answer_depends_on_its_key_alone_never_on_its_batch(student):
    """Row i's answer is the same alone, in another order, beside other prompts, and under a longer cap
    (its shorter-capped answer is a prefix): what lets 2 ranks draw what 1 process draws."""
    ps, k = prompts(), keys(4)
    batch = sample_answers(
        student, ps, pad_id=PAD, eos_id=EOS, temperature=0.9, top_p=0.95, max_new_tokens=MAX_NEW, keys=k
    )
    other = prompts((15, 1), seed=9)
    mixed = sample_answers(
        student,
        [other[0], ps[2], other[1], ps[0]],
        pad_id=PAD,
        eos_id=EOS,
        temperature=0.9,
        top_p=0.95,
        max_new_tokens=[3, MAX_NEW, 20, MAX_NEW],
        keys=RowKeys((99, k.keys[2], 98, k.keys[0])),
    )
    assert mixed[1].tolist() == batch[2].tolist() and mixed[3].tolist() == batch[0].tolist()
    for i, p in enumerate(ps):
        alone = sample_answers(
            student,
            [p],
            pad_id=PAD,
            eos_id=EOS,
            temperature=0.9,
            top_p=0.95,
            max_new_tokens=MAX_NEW,
            keys=RowKeys((k.keys[i],)),
        )
        assert alone[0].tolist() == batch[i].tolist()
        short = sample_answers(
            student,
            [p],
            pad_id=PAD,
            eos_id=EOS,
            temperature=0.9,
            top_p=0.95,
            max_new_tokens=4,
            keys=RowKeys((k.keys[i],)),
        )
        assert short[0].tolist() == batch[i][:4].tolist()
    assert len({tuple(a.tolist()) for a in batch}) == 3  # the keys differ, so do the answers


def test_the_trainers_on_policy_batch_is_the_same_however_the_samples_are_split(student):
    """sekd.training.on_policy.OnPolicy keyed as the trainer keys it (run seed, step, global sample index; sekd/core/rng.py
    step_keys): one micro-batch of 4 samples, or two of 2 (two ranks, or two micro-batches), give the same
    rows; rows are the data's length (seq_len), so the shapes match too."""
    from sekd.training.on_policy import OnPolicy
    from sekd.core.rng import step_keys

    ps = prompts((2, 5, 9, 4), seed=1)
    op = OnPolicy(
        prompts=lambda idx: [ps[i] for i in idx],
        pad_id=PAD,
        eos_id=EOS,
        mix=1.0,
        temperature=1.5,
        top_p=0.95,
        max_new_tokens=MAX_NEW,
        seq_len=16,
    )
    gen = torch.Generator().manual_seed(1234)

    def batch(idx, step=3):
        return op.batch(idx, op.answers(student, idx, step_keys(len(idx), generator=gen, step=step, rows=idx)))

    x, y = batch([0, 1, 2, 3])
    halves = [batch([0, 1]), batch([2, 3])]
    assert x.shape == y.shape == (4, 16)
    assert torch.equal(x, torch.cat([h[0] for h in halves])) and torch.equal(y, torch.cat([h[1] for h in halves]))
    assert (y != IGNORE).any(-1).all()
    assert not torch.equal(batch([0, 1, 2, 3], step=4)[1], y)  # another step, other draws


def nucleus_by_hand(z: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """The float64 formula: softmax(z / T), cut to the shortest most-likely set of mass >= top_p, renormalized."""
    p = torch.softmax(z.double() / temperature, -1)
    q = torch.zeros_like(p)
    mass = 0.0
    for v in p.argsort(descending=True, stable=True).tolist():
        if mass >= top_p:
            break
        q[v], mass = p[v], mass + float(p[v])
    return q / q.sum()


def test_nucleus_keeps_the_shortest_prefix_reaching_top_p():
    z = torch.tensor([[0.5, 0.15, 0.3, 0.05]]).log()  # T = 1: these probabilities
    for top_p, kept in ((0.4, {0}), (0.7, {0, 2}), (0.85, {0, 1, 2}), (1.0, {0, 1, 2, 3})):
        probs, order = nucleus(z, 1.0, top_p)
        assert set(order[0][probs[0] > 0].tolist()) == kept
        torch.testing.assert_close(nucleus_by_hand(z[0], 1.0, top_p)[order[0]], probs[0] / probs[0].sum())
    # a uniform grid of u reproduces the renormalized nucleus to within 1/N (the inverse CDF itself)
    z = torch.randn(1, 30, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2
    N = 20000
    got = draw_tokens(z.expand(N, -1), (torch.arange(N, dtype=torch.float64) + 0.5) / N, 0.7, 0.9)
    freq = torch.bincount(got, minlength=30).double() / N
    assert float((freq - nucleus_by_hand(z[0], 0.7, 0.9)).abs().max()) <= 1 / N + 1e-12


def draw_by_full_sort(z: torch.Tensor, u: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """The straightforward draw: stable sort of the whole vocabulary, cut, inverse CDF of u."""
    from sekd.core.rng import categorical

    probs, order = torch.sort(torch.softmax(z.double() / temperature, -1), dim=-1, descending=True, stable=True)
    probs = torch.where(probs.cumsum(-1) - probs < top_p, probs, torch.zeros_like(probs))
    return order.gather(-1, categorical(probs, 1, None, u=u[:, None])).squeeze(-1)


@pytest.mark.parametrize("scale", [0.05, 1.0, 4.0])  # flat (the k most likely do not reach top_p), typical, peaked
@pytest.mark.parametrize("temperature,top_p", [(0.7, 0.9), (1.0, 0.5), (1.5, 1.0)])
def test_nucleus_from_the_most_likely_tokens_draws_what_the_full_sort_draws(scale, temperature, top_p):
    # only the k most likely tokens are sorted where they hold the nucleus; every draw must be the one the full
    # sort gives, tied logits included (a quantized vocabulary: many tokens share each value)
    g = torch.Generator().manual_seed(int(scale * 100))
    z = (torch.randn(64, 5000, generator=g) * 3 * scale).round(decimals=1)
    u = torch.rand(64, generator=g, dtype=torch.float64)
    assert torch.equal(draw_tokens(z, u, temperature, top_p), draw_by_full_sort(z, u, temperature, top_p))
    z[:, :300] = z.max() + 1.0  # 300 tokens tied at the top: more than the first k = 64
    assert torch.equal(draw_tokens(z, u, temperature, top_p), draw_by_full_sort(z, u, temperature, top_p))


@pytest.fixture(scope="module")
def peaked():
    """A student whose next-token distributions have a clear head and a long tail (logits scaled 4x), so the
    nucleus cuts somewhere that matters."""
    model = tiny(5)
    with torch.no_grad():
        model.lm_head.weight.mul_(4.0)
    return model


@pytest.mark.parametrize("temperature,top_p", [(0.7, 0.9), (1.5, 0.6)])
def test_sampled_tokens_follow_the_top_p_temperature_distribution(peaked, temperature, top_p):
    """N rows of one prompt, each its own key: the first token's frequencies, and the second's among the rows
    whose first token was the likeliest (through the KV cache), match the float64 formula: each class
    within 4.5 binomial standard deviations (a false alarm over 2 x 50 classes: ~1e-3; the draws are
    seeded, so the test is deterministic), and a class outside the nucleus is never drawn."""
    student, p, N = peaked, prompts((6,), seed=3)[0], 8000
    got = sample_answers(
        student,
        [p] * N,
        pad_id=PAD,
        eos_id=EOS,
        temperature=temperature,
        top_p=top_p,
        max_new_tokens=2,
        keys=keys(0, N),
    )
    with torch.no_grad():
        z1 = student(input_ids=p[None]).logits[0, -1]
    q1 = nucleus_by_hand(z1, temperature, top_p)
    first = torch.stack([a[0] for a in got])
    top = int(q1.argmax())
    with torch.no_grad():
        z2 = student(input_ids=torch.cat([p, torch.tensor([top])])[None]).logits[0, -1]
    second = torch.stack([a[1] for a in got if int(a[0]) == top and a.numel() > 1])
    for draws, q in ((first, q1), (second, nucleus_by_hand(z2, temperature, top_p))):
        n = draws.numel()
        freq = torch.bincount(draws, minlength=V).double() / n
        sd = (q * (1 - q) / n).sqrt()
        assert (freq[q == 0] == 0).all()
        assert bool(((freq - q).abs() <= 4.5 * sd + 1e-12).all()), (freq - q).abs().max()
        assert 1 < int((q > 0).sum()) < V and n > 1000  # a real cut of a real distribution, enough draws


def test_the_students_own_generation_config_is_ignored(student):
    ps = prompts()
    ref = sample(student, ps, seed=5)
    own = student.generation_config
    try:
        student.generation_config = type(own)(top_k=1, temperature=0.1, repetition_penalty=3.0, do_sample=True)
        got = sample(student, ps, seed=5)
    finally:
        student.generation_config = own
    assert [x.tolist() for x in got] == [x.tolist() for x in ref]


def test_no_top_k_truncation():
    """HF's default top_k=50 is off: with 120 classes and a flat temperature, tokens ranked below 50 get sampled."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(2)
    cfg = Qwen3Config(
        vocab_size=120,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        eos_token_id=EOS,
        pad_token_id=PAD,
        bos_token_id=None,
    )
    model = Qwen3ForCausalLM._from_config(cfg, dtype=torch.float64)
    r = roll(model, prompts(), 0, temperature=100.0)
    with torch.no_grad():
        logits = model(input_ids=r.input_ids).logits
    gen = r.labels != IGNORE
    rank = (logits > logits.gather(-1, r.labels.clamp_min(0)[..., None])).sum(-1)  # classes above the sample
    assert int(rank[gen].max()) >= 50


# ---- the objective on a rollout --------------------------------------------------------------


def log_softmax_by_hand(z: torch.Tensor) -> torch.Tensor:
    m = z.max(-1, keepdim=True).values
    return z - m - (z - m).exp().sum(-1, keepdim=True).log()


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_reverse_kl_on_the_rollout_equals_a_dense_reference(student, teacher, temperature):
    ps = prompts()
    r = roll(student, ps, 11, temperature=0.7, top_p=0.9)
    with torch.no_grad():
        s, t = student(input_ids=r.input_ids).logits, teacher(input_ids=r.input_ids).logits
    assert s.dtype == torch.float64
    # by hand: sum over generated positions of KL(q_s || p_t), both at temperature T
    kl = torch.zeros(r.labels.shape, dtype=torch.float64)
    for i in range(len(ps)):
        for j in range(r.labels.shape[1]):
            if int(r.labels[i, j]) == IGNORE:
                continue
            lq, lp = log_softmax_by_hand(s[i, j] / temperature), log_softmax_by_hand(t[i, j] / temperature)
            kl[i, j] = (lq.exp() * (lq - lp)).sum()
    sel = Selector(None, POLICIES.build("all"), CRITERIA.get("reverse_kl"))
    tok = selective_kd_loss(
        s, t, r.labels, LossInputs(sel, lam=1.0, temperature=temperature, normalization="batch_tokens")
    )
    assert tok.weight == int(r.gen_lens.sum())
    torch.testing.assert_close(tok.loss_sum, temperature**2 * kl.sum(), rtol=1e-10, atol=1e-12)
    seq = selective_kd_loss(
        s, t, r.labels, LossInputs(sel, lam=1.0, temperature=temperature, normalization="per_sequence")
    )
    per_row = temperature**2 * kl.sum(-1) / r.gen_lens.double()
    assert seq.weight == len(ps)
    torch.testing.assert_close(seq.loss_sum, per_row.sum(), rtol=1e-10, atol=1e-12)


def test_selection_picks_generated_positions_only(student, teacher):
    ps = prompts()
    seed = mixed_seed(student, ps)
    r = roll(student, ps, seed)
    with torch.no_grad():
        s, t = student(input_ids=r.input_ids).logits, teacher(input_ids=r.input_ids).logits
    k = 0.25
    sel = Selector(SIGNALS.get("student_entropy"), POLICIES.build("top_k", k=k), CRITERIA.get("reverse_kl"))
    out = selective_kd_loss(s, t, r.labels, LossInputs(sel, lam=1.0, temperature=1.0))
    picked = out.draws.dense(r.labels.shape[1]) != 0  # [B,L]
    generated = r.labels != IGNORE
    assert not (picked & ~generated).any()
    assert picked.sum(-1).tolist() == n_select(generated, k).tolist()
    assert picked.sum(-1).tolist() == [math.ceil(k * int(g)) for g in r.gen_lens]
    # the top-k entropies among generated positions, exactly
    u = out.u.masked_fill(~generated, float("-inf"))
    for i in range(len(ps)):
        top = u[i].topk(int(picked[i].sum())).indices
        assert set(top.tolist()) == set(picked[i].nonzero().squeeze(-1).tolist())
    # the mask matters: over every position, top-k would have picked prompt or pad positions
    everywhere = POLICIES.build("top_k", k=k)(_entropy(s), torch.ones_like(generated))
    assert (everywhere.dense(r.labels.shape[1]).bool() & ~generated).any()


def _entropy(logits: torch.Tensor) -> torch.Tensor:
    lq = torch.log_softmax(logits, -1)
    return -(lq.exp() * lq).sum(-1)


# ---- the mixing schedule ---------------------------------------------------------------------


def test_on_policy_schedule():
    assert all(on_policy_step(s, 1.0) for s in range(100))
    assert not any(on_policy_step(s, 0.0) for s in range(100))
    assert sum(on_policy_step(s, 0.25) for s in range(100)) == 25
    for ratio in (0.1, 0.25, 0.3, 0.5, 0.57, 2 / 3, 0.9):
        count = 0
        for s in range(300):
            count += on_policy_step(s, ratio)
            assert abs(count - (s + 1) * ratio) <= 0.5 + 1e-9, (ratio, s)
            assert count == on_policy_count(s + 1, ratio)
    assert sum(on_policy_step(s, 0.57) for s in range(100)) == 57
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError):
            on_policy_step(0, bad)
    with pytest.raises(ValueError):
        on_policy_step(-1, 0.5)


def test_rollout_to_and_argument_checks(student):
    r = build_rollout(prompts(), [torch.tensor([3, EOS])] * 3, pad_id=PAD)
    assert isinstance(r.to("cpu"), Rollout) and torch.equal(r.to("cpu").labels, r.labels)
    with pytest.raises(ValueError):
        build_rollout(prompts(), [torch.tensor([3])], pad_id=PAD)
    for bad in (dict(temperature=-1.0), dict(top_p=0.0), dict(max_new=0)):
        with pytest.raises(ValueError):
            sample(student, prompts(), seed=0, **bad)
