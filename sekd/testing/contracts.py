"""The public checks: each runs, for one registered piece, the contract every built-in piece meets, and
raises AssertionError with a message naming the piece and what broke. The parts: its float64 reference
(references.py), dense == chunked under every compatible partner (combos.py), its options (options.py),
reproducibility per seed and a checkpoint resume (here), and 2 ranks == 1 process (ranks.py; `ranks=False`
leaves it to a separate `check_ranks` call, as the registry-wide test does once per kind).
"""

from __future__ import annotations

import io
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch

from sekd.core.rng import PositionKeys, RowKeys
from sekd.selection.classes import CLASSES
from sekd.selection.criteria import CRITERIA
from sekd.selection.policies import POLICIES
from sekd.selection.signals import SIGNALS, importance
from sekd.testing import options as O
from sekd.testing import ranks as RK
from sekd.testing import references as RF
from sekd.testing.combos import STEP, check_combo, combos

REGISTRIES: dict[str, Any] = {"signal": SIGNALS, "policy": POLICIES, "criterion": CRITERIA, "class_sampler": CLASSES}


def _options(kind: str, name: str, options: Mapping[str, Any] | None) -> dict[str, Any]:
    """The options to check with: the given ones, else the example declared at registration (checked)."""
    reg = REGISTRIES[kind]
    opts = dict(options) if options is not None else dict(getattr(reg.get(name), "example", None) or {})
    return reg.check_kwargs(name, opts, key=f"{kind}.options")


def _flows(kind: str, name: str, options: Mapping[str, Any] | None) -> None:
    for c in combos(kind, name, options):
        check_combo(c)


def module_of(kind: str, name: str) -> str:
    """The module that defines the piece, which a spawned rank imports to register it."""
    piece = REGISTRIES[kind].get(name)
    if isinstance(piece, type):  # a stateful policy class
        defined = piece
    elif kind == "signal":  # its first term (a random signal: its reference, if any)
        defined = piece.terms[0] if piece.terms else piece.reference
    else:
        defined = piece.fn
    module = getattr(defined, "__module__", None) or "sekd.selection.signals"
    assert module != "__main__", f"{kind} {name!r} is defined in __main__; a spawned rank cannot import it"
    return module


def check_ranks(kind: str, names: list[str], options: Mapping[str, Any] | None = None) -> None:
    """2 gloo ranks == 1 process for each named piece of `kind`, in one spawn (ranks.py)."""
    jobs = [(kind, n, options) for n in names]
    RK.check_ranks(jobs, sorted({module_of(kind, n) for n in names}))


def check_ranks_of(pieces: Sequence[tuple[str, str]]) -> None:
    """2 gloo ranks == 1 process for every (kind, name) with its example options, in one spawn."""
    RK.check_ranks([(k, n, None) for k, n in pieces], sorted({module_of(k, n) for k, n in pieces}))


def _same_draws(a: Any, b: Any) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b))


def _policy_draws(policy: Any, u: torch.Tensor, valid: torch.Tensor, seed: int, step: int = STEP) -> tuple:
    kw = {"keys": RowKeys.of_samples(seed, step, range(u.shape[0]))} if policy.random else {}
    d = policy(u, valid, step=step, generator=torch.Generator().manual_seed(seed), **kw)
    return d.index, d.weight, d.mask


def _policy_resume(name: str, opts: dict[str, Any], seed: int) -> None:
    """Fresh pieces with the same keys draw the same (a resumed run's draws); another seed draws anew; a
    stateful policy's state_dict through torch.save/load continues exactly as the uninterrupted one."""
    u, valid = RF.scores(seed=seed)
    first: Any = POLICIES.build(name, **opts)
    a = _policy_draws(first, u, valid, seed)
    resumed: Any = POLICIES.build(name, **opts)
    if first.stateful:
        buf = io.BytesIO()
        torch.save(first.state_dict(), buf)
        buf.seek(0)
        resumed.load_state_dict(torch.load(buf, weights_only=True))  # as the checkpoint reads it
        u2, valid2 = RF.scores(seed=seed + 1)
        after = [_policy_draws(p, u2, valid2, seed, STEP + 1) for p in (first, resumed)]
        assert _same_draws(*after), f"policy {name!r}: after a state_dict round trip it selects differently"
        s1, s2 = first.state_dict(), resumed.state_dict()
        assert s1.keys() == s2.keys() and all(
            torch.equal(v, s2[k]) if isinstance(v, torch.Tensor) else v == s2[k] for k, v in s1.items()
        ), f"policy {name!r}: its state after a resume differs from the uninterrupted run's"
        return
    assert _same_draws(a, _policy_draws(resumed, u, valid, seed)), f"policy {name!r}: the same keys draw differently"
    if first.random:
        other = _policy_draws(POLICIES.build(name, **opts), u, valid, seed + 1)
        assert not _same_draws(a, other), f"policy {name!r} is declared random but another seed draws the same"


def _random_signal_draws(name: str, seed: int) -> None:
    """Drawn scores: in [0, 1), the same for the same per-sample keys (a resume), new for another seed, and a
    row's the same whatever the batch holds."""
    sig = SIGNALS.get(name)
    y = torch.randint(0, 5, (4, 9), generator=torch.Generator().manual_seed(seed))
    valid = torch.ones(4, 9, dtype=torch.bool)

    def run(s: int, rows: list[int]) -> torch.Tensor:
        keys = RowKeys.of_samples(s, STEP, rows)
        return importance(sig, y[rows, :, None].float(), None, y[rows], valid[rows], keys=keys)

    rows = list(range(4))
    u = run(seed, rows)
    assert bool(((u >= 0) & (u < 1)).all()), f"signal {name!r}: drawn scores outside [0, 1)"
    assert torch.equal(u, run(seed, rows)), f"signal {name!r}: the same keys draw differently"
    assert not torch.equal(u, run(seed + 1, rows)), f"signal {name!r}: another seed draws the same"
    assert torch.equal(u[2:], run(seed, rows[2:])), f"signal {name!r}: a row's draws depend on the batch"


def check_signal(name: str, *, seed: int = 0, ranks: bool = True) -> None:
    """u(t) against its reference (and its needs_teacher declaration); a random signal reproducible per seed
    and keyed per sample; dense == chunked under every policy, criterion and class axis; 2 ranks."""
    RF.signal_reference(name)
    if SIGNALS.get(name).random:
        _random_signal_draws(name, seed)
    _flows("signal", name, None)
    if ranks:
        check_ranks("signal", [name])


def check_policy(name: str, options: Mapping[str, Any] | None = None, *, seed: int = 0, ranks: bool = True) -> None:
    """Expected weights against its reference (random: unbiased over keyed draws); options; reproducible per
    seed, resumable (state_dict); dense == chunked under every signal, criterion and class axis; 2 ranks."""
    opts = _options("policy", name, options)
    O.check_options(POLICIES, name, opts, O.call_policy)
    RF.policy_reference(name, opts, seed)
    _policy_resume(name, opts, seed)
    _flows("policy", name, options)
    if ranks:
        check_ranks("policy", [name], options)


def check_criterion(name: str, options: Mapping[str, Any] | None = None, *, seed: int = 0, ranks: bool = True) -> None:
    """D and dD/ds against its reference in float64; options; deterministic; dense == chunked (value and
    gradient) under every signal, policy and class axis (a dense-only criterion refuses sparse targets); 2 ranks."""
    opts = _options("criterion", name, options)
    O.check_options(CRITERIA, name, opts, O.call_criterion)
    RF.criterion_reference(name, opts)
    s, t, y, row, u = RF.flat(seed=seed)
    crit = CRITERIA.build(name, **opts)
    D = [crit(s, t, y, temperature=1.5, row=row, u=u) for _ in range(2)]
    assert torch.equal(D[0], D[1]), f"criterion {name!r} gives different values on the same input"
    _flows("criterion", name, options)
    if ranks:
        check_ranks("criterion", [name], options)


def check_class_sampler(
    name: str, options: Mapping[str, Any] | None = None, *, seed: int = 0, ranks: bool = True
) -> None:
    """The target in expectation against its reference (random: unbiased over many draws); options;
    reproducible per seed and per position key; dense == chunked under every signal, policy and sparse-capable
    criterion; 2 ranks."""
    opts = _options("class_sampler", name, options)
    O.check_options(CLASSES, name, opts, O.call_class_sampler)
    RF.class_sampler_reference(name, opts, seed)
    sampler, (s, t) = CLASSES.build(name, **opts), RF.flat(seed=seed)[:2]
    draw = lambda k: sampler(t, temperature=1.0, generator=torch.Generator().manual_seed(k), student=s)  # noqa: E731
    a, b = draw(seed), draw(seed)
    assert torch.equal(a.ids, b.ids) and torch.equal(a.probs, b.probs), (
        f"class sampler {name!r}: the same seed draws differently"
    )
    if sampler.random:  # a resumed run's fresh sampler, given the same per-sample keys, draws the same
        n = t.shape[0]
        keys = lambda: PositionKeys(
            RowKeys.of_samples(seed, STEP, [0, 1]), torch.arange(n) % 2, torch.arange(n) // 2, n
        )  # noqa: E731
        k1, k2 = (CLASSES.build(name, **opts)(t, temperature=1.0, keys=keys(), student=s) for _ in range(2))
        assert torch.equal(k1.ids, k2.ids) and torch.equal(k1.probs, k2.probs), (
            f"class sampler {name!r}: the same position keys draw differently"
        )
        c = draw(seed + 1)
        differs = a.ids.shape != c.ids.shape or not (torch.equal(a.ids, c.ids) and torch.equal(a.probs, c.probs))
        assert differs, f"class sampler {name!r} is declared random but another seed draws the same"
    _flows("class_sampler", name, options)
    if ranks:
        check_ranks("class_sampler", [name], options)


CHECKS: dict[str, Callable[..., None]] = {
    "signal": lambda name, options=None, **kw: check_signal(name, **kw),
    "policy": check_policy,
    "criterion": check_criterion,
    "class_sampler": check_class_sampler,
}


def check_piece(kind: str, name: str, options: Mapping[str, Any] | None = None, **kw: Any) -> None:
    """The check of `kind` (signal, policy, criterion, class_sampler) for the piece `name`."""
    if kind not in CHECKS:
        raise ValueError(f"sekd.testing: kind {kind!r}; known: {', '.join(CHECKS)}")
    if options is not None and kind == "signal":
        raise ValueError(f"sekd.testing: signal {name!r} takes no options")
    CHECKS[kind](name, options, **kw)


def pieces_of(module: str) -> Iterator[tuple[str, str]]:
    """(kind, name) of every registered piece defined in `module` (for a user's parametrized test)."""
    for kind, reg in REGISTRIES.items():
        for name in reg.names():
            if module_of(kind, name) == module:
                yield kind, name
