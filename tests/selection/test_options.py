"""Every selection piece declares its options (a dataclass at registration); the registry checks names,
types and ranges against it and binds the checked values."""

from __future__ import annotations

import dataclasses
import inspect

import pytest

from sekd.core.registry import NoOptions, OptionError, Registry, RegistryError
from sekd.selection.classes import CLASSES
from sekd.selection.criteria import CRITERIA
from sekd.selection.policies import GLS, POLICIES

REGISTRIES = {"policy": POLICIES, "class selector": CLASSES, "criterion": CRITERIA}
PIECES = [(kind, name) for kind, reg in REGISTRIES.items() for name in reg.names()]


@pytest.mark.parametrize("kind,name", PIECES)
def test_every_piece_declares_options_that_match_its_keywords(kind, name):
    """The dataclass is what build binds; a direct call of the function must default the same way."""
    reg = REGISTRIES[kind]
    spec = reg.declared(name)
    assert spec is not None and dataclasses.is_dataclass(spec), f"{kind} {name!r} declares no options"
    entry = reg.get(name)
    fn = entry if inspect.isclass(entry) else entry.fn  # a class with state (GLS), or a piece's function
    params = inspect.signature(fn).parameters
    keywords = {
        n: p.default
        for n, p in params.items()
        if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and n not in reg.call_time
    }
    if inspect.isfunction(fn):
        keywords = {n: d for n, d in keywords.items() if params[n].kind is params[n].KEYWORD_ONLY}
    declared = {f.name: f.default for f in dataclasses.fields(spec)}
    assert declared.keys() == keywords.keys()
    for option, default in declared.items():
        want = inspect.Parameter.empty if default is dataclasses.MISSING else default
        assert keywords[option] == want, f"{kind} {name!r}: {option} defaults to {keywords[option]}, declared {want}"


BAD = [  # (registry, name, options, what the message says)
    (POLICIES, "top_k", {"k": 0}, "k=0 must be in (0, 1]"),
    (POLICIES, "random", {"k": 1.01}, "k=1.01 must be in (0, 1]"),
    (POLICIES, "curriculum", {"k": 0.2, "S": 0}, "S=0 must be >= 1"),
    (POLICIES, "gls", {"k": 0.2, "Q": "abc"}, "Q='abc' must be an integer"),
    (POLICIES, "gls", {"k": 0.2, "Q": True}, "Q=True must be an integer"),
    (POLICIES, "pos_rs", {"k": 0.2, "tau": 0}, "tau=0 must be > 0"),
    (POLICIES, "pos_rs_star", {"k": 0.2, "coverage": 2}, "coverage=2 must be in [0, 1]"),
    (POLICIES, "pos_rs", {"k": 0.2, "tau": float("inf")}, "tau=inf must be a finite number"),
    (POLICIES, "pos_rs", {"k": 0.2, "tau": "1"}, "tau='1' must be a finite number"),
    (POLICIES, "top_k", {}, "k is required"),
    (CLASSES, "rs_kd", {"n_draws": 0}, "n_draws=0 must be >= 1"),
    (CLASSES, "top_k_truncation", {"top": 0}, "top=0 must be >= 1"),
    (CRITERIA, "atkd", {"hard_fraction": 2}, "hard_fraction=2 must be in [0, 1]"),
    (CRITERIA, "atkd", {"easy_weight": -0.1}, "easy_weight=-0.1 must be in [0, 1]"),
    (CRITERIA, "dkd", {"beta": -1}, "beta=-1 must be >= 0"),
    (CRITERIA, "dkd", {"alpha": 0, "beta": 0.0}, "beta=0.0 must be > 0 when alpha=0"),
    (CRITERIA, "forward_kl", {"tau": 1}, "tau: criterion 'forward_kl' takes no option 'tau'; allowed: none"),
]


@pytest.mark.parametrize("reg,name,opts,message", BAD, ids=[f"{b[1]}-{b[3]}" for b in BAD])
def test_bad_option_values_fail_at_build_with_the_config_key(reg, name, opts, message):
    with pytest.raises(RegistryError) as err:
        reg.check_kwargs(name, opts, key="group.options")
    assert f"group.options.{message}" in str(err.value) and "\n" not in str(err.value)
    assert f"{reg.kind} {name!r}" in str(err.value)
    with pytest.raises(RegistryError):
        reg.build(name, **opts)


def test_build_binds_the_checked_values_and_the_declared_defaults():
    gls = POLICIES.build("gls", k=0.25, Q=10)
    assert isinstance(gls, GLS) and (gls.k, gls.Q) == (0.25, 10)
    assert POLICIES.check_kwargs("pos_rs", {"k": 1, "tau": 2}) == {"k": 1.0, "tau": 2.0, "coverage": 0.0}
    assert type(POLICIES.check_kwargs("pos_rs", {"k": 1})["k"]) is float  # an int from YAML widens
    dkd = CRITERIA.build("dkd", beta=2)
    assert dkd.options == {"alpha": 1.0, "beta": 2.0} and dkd.coupling == "pointwise"  # bound, still declared
    assert CRITERIA.build("forward_kl") is CRITERIA.get("forward_kl")


def test_call_time_keywords_are_not_options():
    assert POLICIES.options("pos_rs") == ["k", "tau", "coverage"]  # generator, step: at call time
    assert CLASSES.options("rs_kd") == ["n_draws"]  # temperature, generator: at call time
    assert CRITERIA.options("atkd") == ["hard_fraction", "easy_weight"]  # temperature, row, u: at call time


def test_a_registry_refuses_options_that_are_not_a_dataclass_and_keeps_undeclared_entries_working():
    reg = Registry("thing", call_time=("x",))
    with pytest.raises(RegistryError, match="must be a dataclass"):
        reg.register("bad", options=dict)

    @reg.register("plain")  # no declaration: the signature names the options, values unchecked
    def plain(x, *, a: int = 1):
        return x + a

    assert reg.options("plain") == ["a"] and reg.build("plain", a=2)(1) == 3
    with pytest.raises(RegistryError, match="takes no option 'b'"):
        reg.build("plain", b=1)

    @dataclasses.dataclass(frozen=True)
    class Opts:
        a: float = 1.0
        label: str | None = None

        def __post_init__(self):
            if self.a > 5:
                raise OptionError("a", self.a, "<= 5")

    @reg.register("declared", options=Opts)
    def declared(x, *, a: float = 1.0, label: str | None = None):
        return x * a

    assert reg.build("declared", a=2, label=None)(3) == 6.0
    with pytest.raises(RegistryError, match=r"^k\.a=6 must be <= 5 \(thing 'declared'\)$"):
        reg.check_kwargs("declared", {"a": 6}, key="k")
    with pytest.raises(RegistryError, match="label=3 must be a string"):
        reg.check_kwargs("declared", {"label": 3})
    assert NoOptions() == NoOptions()
