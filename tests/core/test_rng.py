"""Random draws (sekd/core/rng.py) are device-correct: every random number comes from a CPU generator as
uniforms (drawn on the CPU, moved to the tensor's device), and categorical draws are an inverse CDF
on the device. CUDA refuses a CPU generator for a CUDA tensor; `DrawAudit` catches the calls that
would meet it without a GPU, by flagging any generator given to anything but a CPU factory call."""

from __future__ import annotations

import types

import pytest
import torch
from torch.overrides import TorchFunctionMode

import sekd.core.rng as rng
from sekd.selection.draws import rs_kd_draws
from sekd.kd.flows import chunked_kd_loss
from sekd.kd.objective import IGNORE, LossInputs, Selector, selective_kd_loss
from sekd.selection.classes import CLASSES
from sekd.selection.criteria import CRITERIA
from sekd.selection.policies import POLICIES
from sekd.selection.signals import SIGNALS, importance

torch.set_num_threads(1)

FACTORIES = {"rand", "randn", "randint", "randperm"}
RANDOM_OPS = {
    "multinomial",
    "bernoulli",
    "bernoulli_",
    "normal",
    "normal_",
    "poisson",
    "rand_like",
    "randn_like",
    "randint_like",
    "uniform_",
    "random_",
    "exponential_",
    "geometric_",
    "cauchy_",
    "log_normal_",
}


class DrawAudit(TorchFunctionMode):
    """Every torch call that draws: `ok` counts CPU factory calls on a CPU generator; `bad` names the
    others (a random op on a tensor, which on CUDA needs a CUDA generator, or a generator/device pair
    that differ)."""

    def __init__(self):
        super().__init__()
        self.ok, self.bad = 0, []

    def __torch_function__(self, func, types_, args=(), kwargs=None):
        kwargs = kwargs or {}
        name, g = getattr(func, "__name__", str(func)), kwargs.get("generator")
        if name in RANDOM_OPS:
            self.bad.append(name)
        elif g is not None:
            device = torch.device(kwargs.get("device") or "cpu")
            if name in FACTORIES and device.type == g.device.type == "cpu":
                self.ok += 1
            else:
                self.bad.append(f"{name} on {device} with a {g.device} generator")
        return func(*args, **kwargs)


def audited(fn):
    with DrawAudit() as audit:
        fn()
    return audit


def test_the_audit_catches_a_generator_applied_to_a_tensor():
    """The pattern that crashed CUDA runs: torch.multinomial(device tensor, generator=CPU generator)."""
    g = torch.Generator().manual_seed(0)
    audit = audited(lambda: torch.multinomial(torch.ones(2, 3), 2, generator=g))
    assert audit.bad == ["multinomial"]


B, T, V = 3, 11, 13


def inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(B, T, V, generator=g, dtype=torch.float64)
    t = torch.randn(B, T, V, generator=g, dtype=torch.float64) * 2
    y = torch.randint(0, V, (B, T), generator=g)
    y[torch.rand(B, T, generator=g) < 0.3] = IGNORE
    return s, t, y


def selector(policy, signal, classes, **opts):
    return Selector(
        SIGNALS.get(signal) if signal else None,
        POLICIES.build(policy, **opts),
        CRITERIA.build("forward_kl"),
        signal_normalization="sum",
        classes=classes,
    )


HEAD_S = torch.nn.Linear(4, V, dtype=torch.float64)  # made here: their init draws from the global RNG
HEAD_T = torch.nn.Linear(5, V, dtype=torch.float64).requires_grad_(False)
CASES = {  # every place a generator reaches: class draws, sampling policies, the random signal
    "rs_kd draws": lambda g: rs_kd_draws(inputs()[1].reshape(-1, V), 16, 1.5, g),
    "rs_kd classes": lambda g: CLASSES.build("rs_kd", n_draws=8)(inputs()[1][0], temperature=1.0, generator=g),
    "random signal": lambda g: importance(
        SIGNALS.get("random"), None, None, inputs()[2], inputs()[2] != IGNORE, generator=g
    ),
    **{
        f"{p} policy": (
            lambda p: lambda g: POLICIES.build(p, k=0.4)(inputs()[1][..., 0].abs(), inputs()[2] != IGNORE, generator=g)
        )(p)
        for p in ("random", "pos_rs", "pos_rs_star")
    },
    "dense flow": lambda g: selective_kd_loss(
        *inputs(),
        LossInputs(
            selector("pos_rs", "random", CLASSES.build("rs_kd", n_draws=8), k=0.5),
            lam=1.0,
            temperature=1.0,
            generator=g,
        ),
    ),
    "chunked flow": lambda g: chunked_kd_loss(
        torch.randn(B, T, 4, dtype=torch.float64),
        HEAD_S,
        torch.randn(B, T, 5, dtype=torch.float64),
        HEAD_T,
        inputs()[2],
        LossInputs(
            selector("pos_rs_star", "random", CLASSES.build("rs_kd", n_draws=8), k=0.5, coverage=0.3),
            lam=1.0,
            temperature=1.0,
            generator=g,
        ),
        vocab=V,
        chunk_size=4,
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_draw_uses_the_cpu_generator_on_cpu_factories_only(case):
    g = torch.Generator().manual_seed(3)
    audit = audited(lambda: CASES[case](g))
    assert audit.bad == [] and audit.ok > 0, audit.bad


def test_categorical_runs_on_a_device_tensor_without_device_randomness():
    """On the meta device (a stand-in for CUDA without one) the draw is a device tensor of the right shape."""
    g = torch.Generator().manual_seed(0)
    audit = DrawAudit()
    with audit:
        out = rng.categorical(torch.rand(5, 7, device="meta"), 4, g)
    assert out.device.type == "meta" and out.shape == (5, 4) and out.dtype == torch.long
    assert audit.bad == [] and audit.ok == 1


def test_a_device_generator_is_refused_in_one_line():
    cuda_gen = types.SimpleNamespace(device=torch.device("cuda", 0))
    with pytest.raises(ValueError, match=r"^rs_kd draws: the generator is on cuda:0; .*CPU generator"):
        rs_kd_draws(torch.zeros(2, 3), 4, 1.0, cuda_gen)


@pytest.mark.parametrize("shape", [(1, 5), (7, 3), (20, 50)])
def test_cpu_draws_are_torch_multinomials(shape):
    """On the CPU the inverse CDF reproduces torch.multinomial's draws for the same generator, so runs
    and caches made before this scheme keep their numbers; a CUDA run now draws the same ones."""
    p = torch.rand(*shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    p[0, 0] = 0.0
    ours = rng.categorical(p, 33, torch.Generator().manual_seed(2))
    ref = torch.multinomial(p, 33, replacement=True, generator=torch.Generator().manual_seed(2))
    assert torch.equal(ours, ref)


def test_inverse_cdf_matches_the_distribution():
    """Frequencies over many draws are p / sum(p) within 5 standard errors, classes of probability 0 are
    never drawn, and a row of zeros draws uniformly; rows need not be normalized."""
    w = torch.tensor(
        [
            [0.0, 3.0, 0.0, 1.0, 0.5, 0.0, 1e-3],
            [2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0],
            [0.0] * 7,
            [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 5.0],
        ],
        dtype=torch.float64,
    )
    n = 200_000
    draws = rng.categorical(w, n, torch.Generator().manual_seed(0))
    freq = torch.stack([torch.bincount(r, minlength=7) for r in draws]).double() / n
    p = torch.where(w.sum(-1, keepdim=True) > 0, w, torch.ones_like(w))
    p = p / p.sum(-1, keepdim=True)
    se = (p * (1 - p) / n).sqrt()
    assert ((freq - p).abs() <= 5 * se + 1e-12).all(), (freq, p)
    assert (freq[w.sum(-1) > 0][w[w.sum(-1) > 0] == 0] == 0).all()


def test_draws_do_not_depend_on_the_cdf_chunking(monkeypatch):
    p = torch.rand(40, 9, generator=torch.Generator().manual_seed(4))
    whole = rng.categorical(p, 5, torch.Generator().manual_seed(6))
    monkeypatch.setattr(rng, "_CDF_ELEMENTS", 9 * 3)  # three rows per CDF chunk
    assert torch.equal(rng.categorical(p, 5, torch.Generator().manual_seed(6)), whole)


def test_a_rounded_up_draw_lands_on_the_last_positive_class(monkeypatch):
    """u * sum may round to the sum; the draw must not fall on the trailing zero-probability classes."""
    monkeypatch.setattr(rng, "uniform", lambda shape, g, device, dtype, who: torch.ones(shape, dtype=dtype))
    assert rng.categorical(torch.tensor([[0.2, 0.8, 0.0, 0.0]]), 2, None).tolist() == [[1, 1]]
