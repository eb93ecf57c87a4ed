"""Every kind of selection piece declares its protocol where it is registered, and the flows dispatch on
it. The conformance kit (sekd.testing) runs over the WHOLE registry: every signal, policy, criterion and
class sampler against its declared float64 reference, its options, its reproducibility and resume, and the
chunked flow == the dense flow (float64: loss, weight, draws, u and every gradient; sekd/testing/flows.py
`assert_same`) under every compatible piece of every other kind, teacher-needing signals included (each
takes its own chunked scoring path); 2 ranks == 1 process once for the whole registry (one spawn).
The full criterion x policy x class axis product (the cached sparse target too) is run as well, with a
student-entropy signal: a sparse target with a criterion without a sparse form is refused, as
config.validate refuses that config. What each run uses (sekd/testing/combos.py): 3 positions a chunk
(random class samplers also one chunk), step 1000 (inside curriculum's move), a stateful policy warmed up
on one earlier batch, T = 1.5, lambda = 0.7.
"""

from __future__ import annotations

import pytest
import torch

from sekd.kd.objective import Selector
from sekd.selection.classes import CLASSES, ClassSampler
from sekd.selection.criteria import COUPLINGS, CRITERIA, NEEDS, Criterion, criterion, forward_kl, sparse_capable
from sekd.selection.policies import POLICIES, PolicyPiece
from sekd.selection.signals import SIGNALS
from sekd.testing import assert_same, both, check_piece
from sekd.testing.combos import Combo, build_policy, check_combo, class_axis
from sekd.testing.contracts import REGISTRIES, check_ranks_of

SIGNAL = "student_entropy"  # u >= 0: what weighted KD and Pos RS-KD need
PRODUCT = [(c, p, a) for c in CRITERIA.names() for p in POLICIES.names() for a in class_axis()]
PIECES = [(kind, name) for kind, reg in REGISTRIES.items() for name in reg.names()]


@pytest.mark.parametrize("kind,name", PIECES, ids=[f"{k}-{n}" for k, n in PIECES])
def test_every_registered_piece_passes_the_kit(kind, name):
    check_piece(kind, name, ranks=False)


@pytest.mark.e2e  # sekd.testing spawns the two gloo ranks, out of tests/conftest.py's sight
def test_two_ranks_equal_one_process_for_the_whole_registry():
    check_ranks_of(PIECES)


@pytest.mark.parametrize("crit,policy,classes", PRODUCT, ids=["-".join(c) for c in PRODUCT])
def test_chunked_equals_dense_for_every_combination(crit, policy, classes):
    check_combo(Combo(SIGNAL, policy, crit, classes))


def test_sparse_capable_criteria_are_the_ones_config_allows():
    from tests.helpers import compose_cfg

    from sekd.core.errors import ConfigError

    from sekd.app.checks import validate

    for name in CRITERIA.names():
        for classes, form in [("rs_kd", "draws"), ("top_k_tail", "tail"), ("top_p", "renormalized")]:
            cfg = compose_cfg([f"classes={classes}", f"criterion={name}"])
            crit = CRITERIA.get(name)
            if crit.sparse is not None and form in crit.sparse_forms:
                validate(cfg)
            else:
                with pytest.raises(ConfigError, match=f"cannot use (a sparse class target|{form} targets)"):
                    validate(cfg)


# ---- what each registered piece declares -------------------------------------------------------


@pytest.mark.parametrize("name", CRITERIA.names())
def test_every_criterion_declares_how_it_may_be_chunked(name):
    crit = CRITERIA.get(name)
    assert isinstance(crit, Criterion) and crit.coupling in ("pointwise", "batch")  # "all": undeclared only
    assert (crit.coupling == "batch") == (crit.prepare is not None)
    assert set(crit.needs) <= set(NEEDS)
    built = CRITERIA.build(name, **CRITERIA.get(name).example)
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
    assert sparse_capable() == ["forward_kl", "reverse_kl"]
    assert CRITERIA.get("reverse_kl").sparse_forms == {"renormalized", "tail"}
    assert all(isinstance(CLASSES.get(n), ClassSampler) for n in CLASSES.names())
    declared = {n: (CLASSES.get(n).random, CLASSES.get(n).form, CLASSES.get(n).needs_student) for n in CLASSES.names()}
    assert declared == {
        "rs_kd": (True, "draws", False),
        "rs_kd_tail": (True, "draws", False),
        "top_k_truncation": (False, "renormalized", False),
        "top_k_tail": (False, "tail", False),
        "top_p": (False, "renormalized", False),
        "student_top_k": (False, "renormalized", True),
        "union_top_k": (False, "renormalized", True),
    }
    built = {n: build_policy(n, POLICIES.get(n).example) for n in POLICIES.names()}
    traits = {n: (p.random, p.stepped, p.stateful) for n, p in built.items()}
    assert all(isinstance(p, PolicyPiece) for p in built.values())
    assert traits == {
        "all": (False, False, False),
        "top_k": (False, False, False),
        "random": (True, False, False),
        "curriculum": (False, True, False),
        "gls": (False, False, True),
        "pos_rs": (True, False, False),
        "pos_rs_star": (True, False, False),
    }
    needs_teacher = {  # docs/method.md §4's table
        "student_entropy": False,
        "teacher_entropy": True,
        "student_ce": False,
        "teacher_ce": True,
        "kl": True,
        "reverse_kl": True,
        "kl_plus_student_entropy": True,
        "ce_ratio": True,
        "ce_ratio_plus_student_entropy": True,
        "ce_ratio_plus_student_entropy_unscaled": True,
        "random": False,
    }
    assert {n: SIGNALS.get(n).needs_teacher for n in SIGNALS.names()} == needs_teacher
    assert [n for n in SIGNALS.names() if SIGNALS.get(n).random] == ["random"]
    assert all(SIGNALS.get(n).reference is not None for n in SIGNALS.names() if n != "random")


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
