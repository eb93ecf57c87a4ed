"""A piece in the flows: the dense flow (sekd/kd/objective.py) equals the chunked flow (sekd/kd/flows.py) in
float64, value and gradient, for the piece under every compatible registered piece of every other kind.

A combination is (signal, policy, criterion, class axis); the piece's partners default to DEFAULTS and
each other kind is swept one at a time (its registered pieces with their `example` options; the class
axis adds "cached", a teacher cache's targets). A combination that one flow refuses must be refused by
the other with the same message (a sparse target for a criterion without a sparse form is refused when
the selector is put together). Passed combinations are remembered, so a registry-wide run shares them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping

import torch

from sekd.kd.objective import Selector
from sekd.selection.classes import CLASSES
from sekd.selection.criteria import CRITERIA
from sekd.selection.policies import POLICIES
from sekd.selection.signals import SIGNALS
from sekd.testing.flows import B, T, assert_same, both, cached_targets

STEP, LAM, TEMPERATURE, CHUNK = 1000, 0.7, 1.5, 3  # 3 positions a chunk: every pass runs over several chunks
DEFAULTS = {"signal": "student_entropy", "policy": "top_k", "criterion": "forward_kl", "classes": "full"}
_PASSED: set[tuple] = set()  # combinations already shown equal in this process


@dataclass(frozen=True)
class Combo:
    """One selector: names and options of each piece ("full"/"cached" on the class axis: no sampler)."""

    signal: str | None
    policy: str
    criterion: str
    classes: str = "full"
    options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # kind -> options

    def opts(self, kind: str) -> dict[str, Any]:
        if kind in self.options:
            return dict(self.options[kind])
        reg: Any = {"policy": POLICIES, "criterion": CRITERIA, "classes": CLASSES}[kind]
        name = {"policy": self.policy, "criterion": self.criterion, "classes": self.classes}[kind]
        return dict(getattr(reg.get(name), "example", None) or {})

    def key(self) -> tuple:
        """Names, options and the registered objects (a piece registered anew is checked anew)."""
        frozen = tuple(sorted((k, tuple(sorted(v.items()))) for k, v in self.options.items()))
        pieces = (
            SIGNALS.get(self.signal) if self.signal else None,
            POLICIES.get(self.policy),
            CRITERIA.get(self.criterion),
        )
        sampler = CLASSES.get(self.classes) if self.classes in CLASSES else None
        return (self.signal, self.policy, self.criterion, self.classes, frozen, *map(id, (*pieces, sampler)))

    def label(self) -> str:
        return f"signal={self.signal} policy={self.policy} criterion={self.criterion} classes={self.classes}"


def build_policy(name: str, options: Mapping[str, Any], warm: bool = True) -> Any:
    """The policy bound to `options`; a stateful one warmed up on one earlier batch (its state then matters)."""
    policy = POLICIES.build(name, **options)
    if policy.stateful and warm:
        g = torch.Generator().manual_seed(11)
        valid = torch.rand(B, T, generator=g) < 0.8
        policy(torch.rand(B, T, generator=g).masked_fill(~valid, float("-inf")), valid, generator=g)
    return policy


def selector(c: Combo) -> Selector:
    sampler = CLASSES.build(c.classes, **c.opts("classes")) if c.classes in CLASSES else None
    signal = SIGNALS.get(c.signal) if c.signal is not None else None
    return Selector(
        signal,
        build_policy(c.policy, c.opts("policy")),
        CRITERIA.build(c.criterion, **c.opts("criterion")),
        classes=sampler,
    )


def class_axis() -> list[str]:
    return ["full", *CLASSES.names(), "cached"]


def combos(kind: str, name: str, options: Mapping[str, Any] | None = None) -> Iterator[Combo]:
    """The piece with every registered piece of each other kind, one kind at a time (the others DEFAULTS)."""
    axis = {"signal": "signal", "policy": "policy", "criterion": "criterion", "class_sampler": "classes"}[kind]
    mine = {axis: name}
    opts = {axis: dict(options)} if options is not None else {}
    sweeps = {"signal": SIGNALS.names(), "policy": POLICIES.names(), "criterion": CRITERIA.names()}
    sweeps["classes"] = class_axis()
    seen = set()
    for other, names in sweeps.items():
        if other == axis:
            continue
        for partner in names:
            c = Combo(**{**DEFAULTS, **mine, other: partner}, options=opts)
            if c.key() not in seen:
                seen.add(c.key())
                yield c


def check_combo(c: Combo) -> None:
    """Dense == chunked for one combination (random class samplers: one chunk and split chunks)."""
    if c.key() in _PASSED:
        return
    if c.classes != "full" and not accepts(c):
        _assert_refused(c)
        _PASSED.add(c.key())
        return
    random_classes = c.classes in CLASSES and CLASSES.get(c.classes).random
    cached = cached_targets() if c.classes == "cached" else None
    kw: dict[str, Any] = dict(
        step=STEP, seed=3, cached=cached, teacher=cached is None, lam=LAM, temperature=TEMPERATURE
    )
    for chunk_size in [CHUNK, 1000] if random_classes else [CHUNK]:
        try:
            d, ch = both(lambda: selector(c), chunk_size=chunk_size, **kw)
        except ValueError as err:  # refused: the chunked flow must refuse it in the same words
            _assert_chunked_refuses(c, err, chunk_size, kw)
            break
        assert_same(d, ch, what=f"{c.label()}, {chunk_size} positions a chunk")
        n = ch[0].metrics["positions_selected"]
        assert n > CHUNK, f"{c.label()}: {n} positions selected; the check needs more than one chunk's {CHUNK}"
    _PASSED.add(c.key())


def accepts(c: Combo) -> bool:
    """Whether c's criterion takes c's sparse target: it has a sparse form, right for the target's form."""
    crit = CRITERIA.get(c.criterion)
    if crit.sparse is None:
        return False
    sampler = CLASSES.build(c.classes, **c.opts("classes")) if c.classes in CLASSES else None
    return (sampler.form_of() if sampler is not None else cached_targets().form) in crit.sparse_forms


def _assert_chunked_refuses(c: Combo, err: ValueError, chunk_size: int, kw: dict[str, Any]) -> None:
    try:
        both(lambda: selector(c), chunk_size=chunk_size, flows=("chunked",), **kw)
    except ValueError as other:
        assert str(other) == str(err), f"{c.label()}: the flows refuse differently: {err} / {other}"
        return
    raise AssertionError(f"{c.label()}: the dense flow refuses ({err}), the chunked flow runs")


def _assert_refused(c: Combo) -> None:
    """A sparse target for a criterion without a sparse form: refused when the selector is put together
    (a class sampler) or by both flows (a cache's targets arrive per step)."""
    if c.classes in CLASSES:
        try:
            selector(c)
        except ValueError as err:
            _assert_refusal_message(c, str(err), "the selector")
            return
        raise AssertionError(f"{c.label()}: a criterion without a sparse form accepted class sampler {c.classes}")
    kw: dict[str, Any] = dict(
        step=STEP, seed=3, cached=cached_targets(), teacher=False, lam=LAM, temperature=TEMPERATURE
    )
    for flow in ("dense", "chunked"):
        try:
            both(lambda: selector(c), chunk_size=CHUNK, flows=(flow,), **kw)
        except ValueError as err:
            _assert_refusal_message(c, str(err), f"the {flow} flow")
            continue
        raise AssertionError(f"{c.label()}: the {flow} flow used cached sparse targets with a dense-only criterion")


def _assert_refusal_message(c: Combo, msg: str, who: str) -> None:
    capable = ", ".join(n for n in CRITERIA.names() if CRITERIA.get(n).sparse is not None)
    pattern = (
        f"criterion {re.escape(repr(c.criterion))} cannot use "
        f"(a sparse class target .* choose one of: {re.escape(capable)}|[a-z]+ targets .*; it takes: [a-z, ]+)$"
    )
    assert re.fullmatch(pattern, msg), f"{c.label()}: {who} refuses a sparse target in other words: {msg}"
