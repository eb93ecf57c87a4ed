"""The conformance kit catches a wrong piece with a message that says what broke: a signal whose reference
disagrees or that reads a teacher it says it does not need, a criterion whose chunked form is wrong, a biased
estimator (policy and class sampler), an option without a check, a stateful policy that loses its state
on resume, a policy whose choice depends on the rank's batch. The built-in pieces passing it is
tests/kd/test_protocols.py; a user's module through the pytest plugin and 2 real ranks is the last test.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from sekd.core.registry import at_least
from sekd.selection import references as R
from sekd.selection.classes import CLASSES, class_sampler, rs_kd
from sekd.core.registry import Registry
from sekd.selection.criteria import CRITERIA, criterion, forward_kl
from sekd.selection.policies import POLICIES, GLS, BudgetOptions, Draws, policy, pos_rs, top_k
from sekd.selection.signals import SIGNALS, signal, student_entropy_term
from sekd.testing import check_class_sampler, check_criterion, check_piece, check_policy, check_signal
from sekd.testing import ranks as RK


@pytest.fixture
def scratch():
    """Names registered by a test are taken out of the registries after it."""
    before = {reg: set(reg.names()) for reg in (SIGNALS, POLICIES, CRITERIA, CLASSES)}
    yield
    for reg, names in before.items():
        for name in set(reg.names()) - names:
            reg._entries.pop(name)
            reg._declared.pop(name, None)


def test_a_signal_whose_reference_disagrees_is_caught(scratch):
    signal("kit_off", needs_teacher=False, reference=lambda s, t, y, *, temperature: 1.01 * R.entropy64(s))(
        student_entropy_term
    )
    with pytest.raises(AssertionError, match="signal 'kit_off' at T=1.0 disagrees with its declared reference"):
        check_signal("kit_off", ranks=False)


def test_a_signal_that_reads_an_undeclared_teacher_is_caught(scratch):
    @signal("kit_sneaky", needs_teacher=False, reference=R.teacher_entropy)
    def sneaky(s, t, y, *, temperature=1.0):
        return R.entropy64(t).float()

    with pytest.raises(AssertionError, match="'kit_sneaky' declares needs_teacher=False but fails without one"):
        check_signal("kit_sneaky", ranks=False)


def test_a_teacher_signal_that_couples_positions_is_caught_on_its_chunked_path(scratch):
    """KL_t minus the mean KL over the positions passed in: right on one batch, wrong chunk by chunk."""

    def reference(s, t, y, *, temperature=1.0):
        kl = R.kl64(t, s, temperature)
        return kl - kl.mean()

    @signal("kit_centered", needs_teacher=True, reference=reference)
    def centered(s, t, y, *, temperature=1.0):
        return reference(s, t, y, temperature=temperature).float()

    with pytest.raises(AssertionError, match=r"chunked flow != dense flow in u \(signal=kit_centered policy="):
        check_signal("kit_centered", ranks=False)


def test_a_criterion_whose_chunked_form_is_wrong_is_caught(scratch):
    """D_t = KL_t (1 + mean p_t(y) over the batch); the prepare step takes the mean per chunk instead."""

    def dense(s, t, y, *, temperature=1.0, row=None, u=None):
        p_y = torch.softmax(t.double() / temperature, -1).gather(1, y.unsqueeze(-1)).squeeze(-1)
        return forward_kl(s, t, y, temperature=temperature) * (1 + p_y.mean())

    def per_chunk(sel):
        def d(s, t, sl):
            p_y = torch.softmax(t.double() / sel.temperature, -1).gather(1, sel.y[sl].unsqueeze(-1)).squeeze(-1)
            return forward_kl(s, t, sel.y[sl], temperature=sel.temperature) * (1 + p_y.mean())

        return d

    reference = lambda s, t, y, *, temperature, row=None, u=None: (
        R.kl64(t, s, temperature)
        * (  # noqa: E731
            1 + R.log_softmax64(t, temperature).exp().gather(1, y.unsqueeze(-1)).mean()
        )
    )
    criterion("kit_chunky", reference=reference, coupling="batch", needs=frozenset({"teacher"}), prepare=per_chunk)(
        dense
    )
    with pytest.raises(
        AssertionError, match=r"chunked flow != dense flow in loss_sum \(signal=\w+ policy=top_k criterion=kit_chunky"
    ):
        check_criterion("kit_chunky", ranks=False)


def test_a_criterion_whose_gradient_disagrees_with_its_reference_is_caught(scratch):
    class Halved(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x

        @staticmethod
        def backward(ctx, g):
            return g / 2

    @criterion("kit_half_grad", reference=R.forward_kl_d)
    def half(s, t, y, *, temperature=1.0, row=None, u=None):
        return forward_kl(Halved.apply(s), t, y, temperature=temperature)

    with pytest.raises(AssertionError, match="criterion 'kit_half_grad''s gradient dD/ds disagrees"):
        check_criterion("kit_half_grad", ranks=False)


def test_a_biased_policy_estimator_is_caught(scratch):
    """pos_rs's draws (unbiased for weighted KD) declared as unbiased for Full KD: pos_rs_star's reference."""
    policy("kit_biased", BudgetOptions, random=True, reference=R.pos_rs_star_expected, example={"k": 0.4})(pos_rs.fn)
    with pytest.raises(AssertionError, match=r"policy 'kit_biased' is biased: over 2000 draws the mean at \("):
        check_policy("kit_biased", ranks=False)


def test_a_biased_class_sampler_is_caught(scratch):
    """rs_kd drawing at half the temperature, declared unbiased for the teacher's tempered softmax."""

    def sharp(t, *, n_draws=8, temperature=1.0, generator=None, keys=None):
        return rs_kd.fn(t, n_draws=n_draws, temperature=temperature / 2, generator=generator, keys=keys)

    options = CLASSES.declared("rs_kd")
    class_sampler("kit_sharp", options, random=True, reference=R.teacher_distribution, example={"n_draws": 8})(sharp)
    with pytest.raises(AssertionError, match="class sampler 'kit_sharp' is biased"):
        check_class_sampler("kit_sharp", ranks=False)


@dataclasses.dataclass(frozen=True)
class LooseOptions:
    k: float  # no range check: the function refuses k = 1.5 only when called


@dataclasses.dataclass(frozen=True)
class UncheckableOptions:
    k: float
    ks: tuple = (0.1,)

    def __post_init__(self):
        at_least("k", self.k, 0.01)


def test_an_option_without_a_check_is_caught(scratch):
    policy("kit_loose", LooseOptions, reference=R.top_k, example={"k": 0.4})(top_k.fn)
    with pytest.raises(AssertionError, match=r"option k=-1.0 passes the options check but the piece refuses it"):
        check_policy("kit_loose", ranks=False)
    policy("kit_tuple", UncheckableOptions, reference=R.top_k, example={"k": 0.4})(lambda u, valid, **kw: None)
    with pytest.raises(AssertionError, match="option 'ks' has type <class 'tuple'>, which the options check cannot"):
        check_policy("kit_tuple", ranks=False)


def test_an_option_the_registry_does_not_check_is_caught():
    """A piece that takes any keyword (no options dataclass, **kw): an unknown option is not refused."""
    from sekd.testing.options import check_options

    reg: Registry = Registry("policy")
    reg.register("kit_any")(lambda u, valid, **kw: None)
    with pytest.raises(AssertionError, match="policy 'kit_any': an unknown option no_such_option is not refused"):
        check_options(reg, "kit_any", {}, lambda piece: None)


def test_a_stateful_policy_that_loses_its_state_on_resume_is_caught(scratch):
    @policy("kit_amnesia", POLICIES.declared("gls"), reference=R.gls_first_call, example={"k": 0.4, "Q": 40})
    class Amnesia(GLS):
        def load_state_dict(self, state):  # forgets the queue
            pass

    with pytest.raises(AssertionError, match="policy 'kit_amnesia': after a state_dict round trip it selects"):
        check_policy("kit_amnesia", ranks=False)


def first_row_all(u, valid, *, step=0, k):
    """top_k, but every position of the batch's first row: a choice that depends on the rank's batch."""
    out = R.top_k(u, valid, step=step, k=k)
    out[0] = valid[0].double()
    return out


def test_a_policy_that_depends_on_the_ranks_batch_is_caught(scratch):
    @policy("kit_first_row", BudgetOptions, reference=first_row_all, example={"k": 0.4})
    def first_row(u, valid, *, k, generator=None, step=0):
        m = top_k(u, valid, k=k).dense(u.shape[1]) > 0
        m[0] = valid[0]
        return Draws.from_mask(m)

    check_piece("policy", "kit_first_row", ranks=False)  # on one batch it is what it says
    job = ("policy", "kit_first_row", None)
    ranks = [RK.run_rows(RK.job_combo(*job), part, None) for part in RK.HALVES]  # each rank's rows, in-process
    with pytest.raises(AssertionError, match=r"2 ranks \(signal=student_entropy policy=kit_first_row .*step 1: the"):
        RK.compare(job, ranks)


USER_MODULE = '''
"""A user's lab: a teacher-student disagreement margin (a new signal that needs the teacher)."""
import torch
from sekd.selection.references import log_softmax64
from sekd.selection.signals import signal


def margin_reference(s, t, y, *, temperature=1.0):
    p, q = log_softmax64(t, temperature).exp(), log_softmax64(s, temperature).exp()
    return (p - q).abs().max(-1).values


@signal("kit_user_margin", needs_teacher=True, reference=margin_reference)
def margin(s, t, y, *, temperature=1.0):
    p, q = torch.softmax(t.float() / temperature, -1), torch.softmax(s.float() / temperature, -1)
    return (p - q).abs().amax(-1)
'''

USER_TEST = """
import kit_user_lab
from sekd.testing.pytest_plugin import conformance_tests

test_lab = conformance_tests("kit_user_lab")
"""


def test_a_users_module_passes_through_the_pytest_plugin_with_two_real_ranks(tmp_path):
    """The user's 5-line test file, run by pytest with the plugin: the kit imports the user's module by
    name in two spawned gloo ranks."""
    (tmp_path / "kit_user_lab.py").write_text(textwrap.dedent(USER_MODULE))
    (tmp_path / "test_lab.py").write_text(textwrap.dedent(USER_TEST))
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "sekd.testing.pytest_plugin", "-p", "no:cacheprovider"]
    res = subprocess.run(
        [*cmd, "--rootdir", str(tmp_path), str(tmp_path / "test_lab.py")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": f"{tmp_path}:{os.environ.get('PYTHONPATH', '')}"},
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "1 passed" in res.stdout
