"""Every kind of selection piece declares its protocol where it is registered, and the flows dispatch on
it: the chunked flow equals the dense reference for EVERY registered criterion x policy x class selector
(and the cached sparse target), generated from the registries, in float64 (loss, weight, draws, u and
every gradient; tests/kd/test_flows.py `assert_same`), with a student-entropy signal and k = 0.4.

What each combination checks:
- deterministic pieces: 3 positions per chunk, so scoring, a batch-level criterion's prepare pass and
  the selective heads all run over several chunks;
- random policies (declared `random`): both flows key every row's draws the same way (sekd/core/rng.py
  `RowKeys`), so the draws are equal whatever the chunking: compared over split chunks too;
- random class selectors (declared `random`: `rs_kd`): the chunked flow draws chunk by chunk, the dense
  flow for all selected positions at once. Compared with every position in one chunk (the same call), and
  over split chunks too: position (r, c) draws from row r's key (sekd/core/rng.py `PositionKeys`), so any
  chunking gives the dense flow's draws;
- stateful policies (GLS): each flow's policy first sees the same warm-up batch, so the threshold comes
  from the queue, not the top_k fallback; every call passes step 1000, inside curriculum's move;
- a sparse class target (a selector or the cache) with a criterion that declares no sparse form:
  the protocol refuses it, as config.validate refuses that config; the test asserts the refusal.
"""

from __future__ import annotations

import pytest
import torch

from sekd.kd.flows import chunked_kd_loss
from sekd.kd.objective import LossInputs, Selector, selective_kd_loss
from sekd.selection.classes import CLASSES, ClassSampler
from sekd.selection.criteria import COUPLINGS, CRITERIA, NEEDS, Criterion, criterion, forward_kl, sparse_capable
from sekd.selection.policies import POLICIES, PolicyPiece
from sekd.selection.signals import SIGNALS
from tests.kd.test_flows import B, T, V, assert_same, batch, both, cached_targets, heads

SIGNAL, K, STEP = "student_entropy", 0.4, 1000  # u >= 0: what weighted KD and Pos RS-KD need
CLASS_AXIS = ["full", *CLASSES.names(), "cached"]
PRODUCT = [(c, p, a) for c in CRITERIA.names() for p in POLICIES.names() for a in CLASS_AXIS]


def build_policy(name: str):
    """The policy with k where it takes one and its declared defaults; a stateful one warmed up."""
    policy = POLICIES.build(name, **({"k": K} if "k" in POLICIES.options(name) else {}))
    if policy.stateful:  # GLS: fill the queue from one earlier batch, the same for both flows
        g = torch.Generator().manual_seed(11)
        valid = torch.rand(B, T, generator=g) < 0.8
        policy(torch.rand(B, T, generator=g).masked_fill(~valid, float("-inf")), valid, generator=g)
    return policy


def selector(crit: str, policy: str, classes: str) -> Selector:
    sampler = CLASSES.build(classes) if classes in CLASSES else None
    return Selector(SIGNALS.get(SIGNAL), build_policy(policy), CRITERIA.build(crit), classes=sampler)


def refused(crit: str, policy: str, classes: str) -> bool:
    return classes != "full" and CRITERIA.get(crit).sparse is None


@pytest.mark.parametrize("crit,policy,classes", PRODUCT, ids=["-".join(c) for c in PRODUCT])
def test_chunked_equals_dense_for_every_combination(crit, policy, classes):
    if refused(crit, policy, classes):
        assert_refused(crit, policy, classes)
        return
    random_classes = classes in CLASSES and CLASSES.get(classes).random
    cached = cached_targets() if classes == "cached" else None
    for chunk_size in [3, 1000] if random_classes else [3]:
        d, c = both(
            lambda: selector(crit, policy, classes),
            chunk_size=chunk_size,
            step=STEP,
            seed=3,
            cached=cached,
            teacher=cached is None,
            lam=0.7,
        )
        assert_same(d, c)
        assert c[0].metrics["positions_selected"] > 3, "3 positions a chunk must split the selected positions"


def assert_refused(crit: str, policy: str, classes: str) -> None:
    """A sparse target for a criterion without a sparse form: refused in the harness's words, when the
    selector is put together (a class selector) or by both flows (the cache's targets come per step)."""
    message = f"criterion {crit!r} cannot use a sparse class target .* choose one of: {', '.join(sparse_capable())}$"
    if classes in CLASSES:
        with pytest.raises(ValueError, match=message):
            selector(crit, policy, classes)
        return
    h_s, h_t, y = batch(3)
    head_s, _ = heads(3)
    sel = Selector(SIGNALS.get(SIGNAL), build_policy(policy), CRITERIA.build(crit))
    s_logits = torch.nn.functional.linear(h_s, head_s.weight, head_s.bias)[..., :V]
    with pytest.raises(ValueError, match=message):
        selective_kd_loss(s_logits, None, y, LossInputs(sel, lam=1.0, temperature=1.0, cached=cached_targets()))
    with pytest.raises(ValueError, match=message):
        chunked_kd_loss(
            h_s, head_s, None, None, y, LossInputs(sel, lam=1.0, temperature=1.0, cached=cached_targets()), vocab=V
        )


def test_sparse_capable_criteria_are_the_ones_config_allows():
    from tests.helpers import compose_cfg

    from sekd.core.errors import ConfigError

    from sekd.app.checks import validate

    for name in CRITERIA.names():
        cfg = compose_cfg(["classes=rs_kd", f"criterion={name}"])
        if name in sparse_capable():
            validate(cfg)
        else:
            with pytest.raises(ConfigError, match="cannot use a sparse class target"):
                validate(cfg)


# ---- what each registered piece declares -------------------------------------------------------


@pytest.mark.parametrize("name", CRITERIA.names())
def test_every_criterion_declares_how_it_may_be_chunked(name):
    crit = CRITERIA.get(name)
    assert isinstance(crit, Criterion) and crit.coupling in ("pointwise", "batch")  # "all": undeclared only
    assert (crit.coupling == "batch") == (crit.prepare is not None)
    assert set(crit.needs) <= set(NEEDS)
    built = CRITERIA.build(name, **({"beta": 2.0} if name == "dkd" else {}))
    assert (built.coupling, built.prepare, built.sparse) == (crit.coupling, crit.prepare, crit.sparse)


def test_declarations_of_the_registered_pieces():
    couplings = {n: CRITERIA.get(n).coupling for n in CRITERIA.names()}
    assert couplings == {
        "forward_kl": "pointwise",
        "reverse_kl": "pointwise",
        "dkd": "pointwise",
        "atkd": "batch",
        "weighted": "batch",
    }
    assert CRITERIA.get("atkd").needs == {"teacher"} and CRITERIA.get("weighted").needs == {"u"}
    assert sparse_capable() == ["forward_kl"]
    assert all(isinstance(CLASSES.get(n), ClassSampler) for n in CLASSES.names())
    assert {n: CLASSES.get(n).random for n in CLASSES.names()} == {"rs_kd": True, "top_k_truncation": False}
    traits = {n: (p.random, p.stepped, p.stateful) for n in POLICIES.names() for p in [build_policy(n)]}
    assert all(isinstance(build_policy(n), PolicyPiece) for n in POLICIES.names())
    assert traits == {
        "all": (False, False, False),
        "top_k": (False, False, False),
        "random": (True, False, False),
        "curriculum": (False, True, False),
        "gls": (False, False, True),
        "pos_rs": (True, False, False),
        "pos_rs_star": (True, False, False),
    }
    assert {n: (SIGNALS.get(n).random, SIGNALS.get(n).needs_teacher) for n in ("random", "kl", SIGNAL)} == {
        "random": (True, False),
        "kl": (False, True),
        SIGNAL: (False, False),
    }


def test_a_batch_level_criterion_without_a_prepare_step_is_refused():
    """It could only run as one [N,V] chunk: refused when declared, so it never reaches the registry."""

    def coupled(s, t, y, *, temperature=1.0, row=None, u=None):
        return forward_kl(s, t, y, temperature=temperature)

    with pytest.raises(ValueError, match="'coupled_kl' is batch-level but declares no prepare step"):
        criterion("coupled_kl", coupling="batch")(coupled)
    assert "coupled_kl" not in CRITERIA
    with pytest.raises(ValueError, match="only a batch-level criterion has a prepare step"):
        Criterion("kl", coupled, needs=frozenset({"u"}))
    with pytest.raises(ValueError, match="needs .'logits'.; known: u, teacher"):
        Criterion("kl", coupled, coupling="batch", needs=frozenset({"logits"}), prepare=lambda sel: None)
    assert set(COUPLINGS) == {"pointwise", "batch", "all"}


def test_a_new_batch_level_criterion_with_a_prepare_step_is_chunked_exactly():
    """D_t = KL_t - mean over the batch's selected positions of the teacher's target probability: a
    batch quantity from a no-grad teacher pass, declared, so the chunked flow needs no knowledge of it."""

    def dense(s, t, y, *, temperature=1.0, row=None, u=None):
        p_y = torch.softmax(t.double() / temperature, -1).gather(1, y.unsqueeze(-1)).squeeze(-1)
        return forward_kl(s, t, y, temperature=temperature) * (1 + p_y.mean())

    def prepare(sel):
        from sekd.selection.criteria import teacher_target_prob

        scale = 1 + teacher_target_prob(sel).mean()
        return lambda s, t, sl: forward_kl(s, t, sel.y[sl], temperature=sel.temperature) * scale

    crit = Criterion("scaled_kl", dense, coupling="batch", needs=frozenset({"teacher"}), prepare=prepare)
    make = lambda: Selector(SIGNALS.get(SIGNAL), POLICIES.build("top_k", k=0.5), crit)  # noqa: E731
    d, c = both(make, chunk_size=2, temperature=1.5)
    assert_same(d, c)
    n = c[0].metrics["positions_selected"]
    assert c[0].metrics["head_positions_teacher"] == 2 * n  # the prepare pass, then the chunks


def test_a_criterion_that_reads_u_is_refused_without_a_signal():
    with pytest.raises(ValueError, match="criterion 'weighted' needs a signal: it reads u"):
        Selector(None, POLICIES.build("all"), CRITERIA.build("weighted"))


def test_undeclared_policy_and_criterion_are_taken_as_the_careful_kind():
    sel = Selector(None, lambda u, valid, **kw: POLICIES.build("all")(u, valid), lambda s, t, y, **kw: s.sum(-1))
    assert sel.criterion.coupling == "all" and not sel.policy.stateful and sel.state_dict() == {}
