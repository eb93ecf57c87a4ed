"""Sample selection (docs/method.md §7): U_i against float64 references, exact budgets, seeded random, the
score store's reuse (docs/method.md §13), and a contract over every SAMPLE_SELECTORS entry."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch

from sekd.data.packing import IGNORE, PackedData, sample_id
from sekd.stores.sample_importance import select_samples, store_fields, store_path
from sekd.selection.samples import SAMPLE_SELECTORS, sample_budget, top_samples
from sekd.selection.signals import SIGNALS

N, L, V, V_HEAD = 12, 10, 37, 40  # the heads carry 3 padding rows that `vocab` cuts away
SPEC = {"hidden_size": 32, "layers": 1, "heads": 2, "kv_heads": 1, "intermediate_size": 64}
SIGS = {"student_sig": "student-a", "teacher_sig": "teacher-a", "tokenizer_sig": "tok-a"}


def model(seed: int, spec: dict = SPEC):
    from transformers import Qwen3ForCausalLM

    from sekd.embedded.build import qwen3_config

    torch.manual_seed(seed)
    m = Qwen3ForCausalLM(qwen3_config(spec, V_HEAD, 0))
    with torch.no_grad():  # logits spread enough that U_i differ, not so sharp that CE_t ~ 0 (ce_ratio ill-conditioned)
        m.lm_head.weight.mul_(5.0)
    return m


class Counter:
    """Counts a model's forward calls through a forward hook."""

    def __init__(self, m: torch.nn.Module):
        self.calls = 0
        m.register_forward_hook(self)

    def __call__(self, mod, args, out):
        self.calls += 1

    def reset(self):
        self.calls = 0


@pytest.fixture(scope="module")
def models():
    torch.set_num_threads(1)
    s, t = model(0), model(1, {**SPEC, "hidden_size": 48})
    return s, t, Counter(s), Counter(t)


@pytest.fixture(scope="module")
def data() -> PackedData:
    """Random samples; some labels -100, one sample with no valid position at all."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, V, (N, L), generator=g)
    y = torch.randint(0, V, (N, L), generator=g)
    y[torch.rand(N, L, generator=g) < 0.3] = IGNORE
    y[4] = IGNORE
    return PackedData(x, y, [sample_id(x[i], y[i]) for i in range(N)])


def run(name, data, models, **kw):
    s, t, cs, ct = models
    cs.reset(), ct.reset()
    kw = {"l": 0.25, "seed": 0, "student": s, "teacher": t, "vocab": V, "batch_size": 5, **kw}
    return select_samples(name, data, **kw)


# ---- float64 references: the selector's signal's, declared where it is registered -------------


def reference_U(name, data, models, T=1.0) -> np.ndarray:
    """U_i = mean over valid t of u(t), float64 models, softmax over the first V logits."""
    s64, t64 = (copy.deepcopy(m).double().eval() for m in models[:2])
    U = np.full(len(data), -np.inf)
    with torch.no_grad():
        for i in range(len(data)):
            x = data.input_ids[i : i + 1]
            valid = data.labels[i] != IGNORE
            zs = s64(input_ids=x).logits[0, :, :V][valid]
            zt = t64(input_ids=x).logits[0, :, :V][valid]
            u = SIGNALS.get(SAMPLE_SELECTORS.get(name).signal).reference(zs, zt, data.labels[i][valid], temperature=T)
            if u.numel():
                U[i] = float(u.mean())
    return U


# ---- equation tests ---------------------------------------------------------------------------


@pytest.mark.parametrize("name,T", [("top_student_entropy", 1.0), ("kl", 1.0), ("ce_ratio", 1.0), ("kl", 2.0)])
@pytest.mark.parametrize("l", [0.25, 0.5])
def test_scores_match_reference_and_keep_the_largest(name, T, l, data, models):
    sel = run(name, data, models, l=l, temperature=T)
    ref = reference_U(name, data, models, T)
    got = sel.importance.double().numpy()
    assert np.isneginf(got[4]) and np.isneginf(ref[4])  # no valid position: never preferred
    np.testing.assert_allclose(got[np.isfinite(ref)], ref[np.isfinite(ref)], rtol=1e-4, atol=1e-5)
    n_keep = math.floor(l * N)
    assert len(sel.indices) == n_keep
    assert sel.indices == sorted(np.argsort(-ref, kind="stable")[:n_keep].tolist())
    assert min(got[sel.indices]) > max(np.delete(got, sel.indices))
    assert sel.prepass_seconds > 0 and not sel.reused and sel.n_scored == N
    needs_teacher = SAMPLE_SELECTORS.get(name).needs_teacher
    assert sel.forward_tokens == {"student": N * L, "teacher": N * L if needs_teacher else 0}
    assert models[3].calls == (3 if needs_teacher else 0)  # ceil(12 / 5) batches


def test_prepass_restores_train_flags_and_takes_no_gradient(data, models):
    s, t = models[:2]
    s.train(), t.eval()
    sel = run("kl", data, models)
    assert s.training and not t.training
    assert not sel.importance.requires_grad and all(p.grad is None for p in s.parameters())
    s.eval()


def test_budget_is_floor_at_least_one():
    assert sample_budget(100, 0.29) == 29  # 0.29 * 100 = 28.999999999999996 in floating point
    assert sample_budget(10, 0.2) == 2 and sample_budget(10, 0.01) == 1 and sample_budget(7, 1.0) == 7
    assert sample_budget(0, 0.5) == 0
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="l must be"):
            sample_budget(10, bad)


def test_ties_go_to_the_lower_index_and_nan_ranks_last():
    U = torch.tensor([1.0, 2.0, 2.0, float("nan"), 2.0, float("-inf")])
    assert top_samples(U, 2) == [1, 2]
    assert top_samples(U, 4) == [0, 1, 2, 4]


def test_random_is_seeded_sized_and_needs_no_model(data):
    a = select_samples("random", data, l=0.5, seed=1)
    b = select_samples("random", data, l=0.5, seed=1)
    others = [select_samples("random", data, l=0.5, seed=s).indices for s in range(2, 7)]
    assert a.indices == b.indices and len(a.indices) == 6
    assert any(o != a.indices for o in others)
    assert a.importance is None and a.prepass_seconds == 0 and a.forward_tokens == {"student": 0, "teacher": 0}


@pytest.mark.parametrize("name", SAMPLE_SELECTORS.names())
def test_l_one_keeps_all_without_a_prepass(name, data, models):
    sel = run(name, data, models, l=1.0)
    assert sel.indices == list(range(N)) and sel.prepass_seconds == 0 and models[2].calls == 0


def test_all_ignores_l(data):
    assert select_samples("all", data, l=0.2, seed=0).indices == list(range(N))


def test_missing_model_or_signature_fails(data, models, tmp_path):
    with pytest.raises(ValueError, match="needs the teacher"):
        select_samples("kl", data, l=0.5, seed=0, student=models[0])
    with pytest.raises(ValueError, match="needs the student"):
        select_samples("top_student_entropy", data, l=0.5, seed=0)
    with pytest.raises(ValueError, match="student_sig"):
        run("top_student_entropy", data, models, store_dir=tmp_path, tokenizer_sig="tok")


# ---- the score store ---------------------------------------------------------------------------


def stored(path) -> dict:
    blob = json.loads(path.read_text())
    assert blob["format"] == 1 and isinstance(blob["fields"], dict)
    return blob["scores"]


@pytest.mark.parametrize("name", ["top_student_entropy", "ce_ratio"])
def test_scores_are_reused_by_key_and_by_sample(name, data, models, tmp_path):
    cs, ct = models[2:]
    first = run(name, data, models, store_dir=tmp_path, **SIGS)
    assert first.n_scored == N and cs.calls == 3 and not first.reused
    path = store_path(tmp_path, store_fields(SAMPLE_SELECTORS.get(name), vocab=V, temperature=1.0, **SIGS))
    table = stored(path)
    assert set(table) == set(data.sample_ids) and table[data.sample_ids[4]] is None

    again = run(name, data, models, store_dir=tmp_path, **SIGS)  # Table 7's "reuse" row
    assert cs.calls == 0 and ct.calls == 0 and again.reused and again.prepass_seconds == 0
    assert again.forward_tokens == {"student": 0, "teacher": 0} and again.n_scored == 0
    assert again.indices == first.indices and torch.equal(again.importance, first.importance)

    perm = torch.randperm(N, generator=torch.Generator().manual_seed(3))[:7]
    sub = run(name, data.subset(perm), models, store_dir=tmp_path, l=0.5, **SIGS)  # another order, fewer
    assert cs.calls == 0 and sub.reused and torch.equal(sub.importance, first.importance[perm])

    other = run(name, data, models, store_dir=tmp_path, **{**SIGS, "student_sig": "student-b"})
    assert cs.calls == 3 and not other.reused and other.n_scored == N
    assert len(list(tmp_path.glob("*.json"))) == 2


def test_a_partial_store_scores_only_the_missing_samples(data, models, tmp_path):
    tokens = []
    h = models[0].register_forward_hook(lambda m, a, kw, out: tokens.append(kw["input_ids"].numel()), with_kwargs=True)
    try:
        run("kl", data.subset(range(5)), models, store_dir=tmp_path, **SIGS)
        tokens.clear()
        full = run("kl", data, models, store_dir=tmp_path, **SIGS)
    finally:
        h.remove()
    assert full.n_scored == N - 5 and not full.reused and sum(tokens) == (N - 5) * L
    assert full.forward_tokens == {"student": (N - 5) * L, "teacher": (N - 5) * L}
    path = store_path(tmp_path, store_fields(SAMPLE_SELECTORS.get("kl"), vocab=V, temperature=1.0, **SIGS))
    assert set(stored(path)) == set(data.sample_ids)
    fresh = run("kl", data, models)  # no store: every sample scored in one pass
    torch.testing.assert_close(full.importance, fresh.importance, rtol=1e-5, atol=1e-6)
    assert full.indices == fresh.indices


def test_temperature_keys_only_the_signals_that_use_it(data, models, tmp_path):
    cs = models[2]
    run("top_student_entropy", data, models, store_dir=tmp_path, **SIGS)
    run("top_student_entropy", data, models, store_dir=tmp_path, temperature=2.0, **SIGS)
    assert cs.calls == 0  # H(q_t) uses raw logits: T does not change U_i
    run("kl", data, models, store_dir=tmp_path, **SIGS)
    run("kl", data, models, store_dir=tmp_path, temperature=2.0, **SIGS)
    assert cs.calls == 3


def test_a_store_written_for_other_fields_is_refused(data, models, tmp_path):
    run("top_student_entropy", data, models, store_dir=tmp_path, **SIGS)
    (path,) = tmp_path.glob("*.json")
    blob = json.loads(path.read_text())
    blob["fields"]["student_sig"] = "someone-else"
    path.write_text(json.dumps(blob))
    with pytest.raises(ValueError, match="score store written for"):
        run("top_student_entropy", data, models, store_dir=tmp_path, **SIGS)


# ---- contract over every entry ----------------------------------------------------------------


@pytest.mark.parametrize("name", SAMPLE_SELECTORS.names())
def test_contract(name, data, models, tmp_path):
    selector = SAMPLE_SELECTORS.get(name)
    sel = run(name, data, models, l=0.4, store_dir=tmp_path, **SIGS)
    assert sel.indices == sorted(set(sel.indices)) and all(isinstance(i, int) for i in sel.indices)
    assert all(0 <= i < N for i in sel.indices)
    assert len(sel.indices) == (N if name == "all" else math.floor(0.4 * N))
    assert (sel.importance is None) == (selector.signal is None)
    if sel.importance is not None:
        assert sel.importance.shape == (N,) and sel.importance.dtype == torch.float32
    assert (models[2].calls > 0) == selector.needs_student and (models[3].calls > 0) == selector.needs_teacher
    assert run(name, data, models, l=0.4, store_dir=tmp_path, **SIGS).indices == sel.indices  # deterministic
