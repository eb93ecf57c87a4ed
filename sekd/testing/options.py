"""A piece's options refuse bad values at build, in one line naming the key: an unknown option; a value of
the wrong type for each field of its options dataclass (from the type hints: bool, int, float, str, or an
Optional of one; any other hint cannot be checked and is reported); and a value that the options check
lets through but the piece refuses when called (an option without a range check in `__post_init__`).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Callable, Mapping

import torch

from sekd.core.registry import Registry, RegistryError
from sekd.testing.references import flat, scores

WRONG: dict[Any, list[Any]] = {bool: ["yes", 1], int: ["abc", 1.5, True], float: ["abc", True, float("nan")], str: [1]}
PROBES: dict[Any, list[Any]] = {int: [-1, 0, 1, 1000], float: [-1.0, 0.0, 0.5, 1.5, 1e6], bool: [True, False], str: []}


def _plain(hint: Any) -> Any:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0] if len(args) == 1 else None
    return hint


def _refused(reg: Registry, name: str, opts: dict[str, Any], key: str, what: str) -> None:
    where = f"{reg.kind}.options"
    try:
        reg.check_kwargs(name, opts, key=where)
    except RegistryError as err:
        msg = str(err)
        assert "\n" not in msg, f"{reg.kind} {name!r}: {what} is refused in more than one line: {msg!r}"
        assert key in msg, f"{reg.kind} {name!r}: {what} is refused without naming {key!r}: {msg}"
        return
    raise AssertionError(f"{reg.kind} {name!r}: {what} is not refused at build")


def check_options(reg: Registry, name: str, example: Mapping[str, Any], call: Callable[[Any], Any]) -> None:
    """`call(piece)` runs a built piece on small inputs (to find values refused only when called)."""
    _refused(reg, name, {**example, "no_such_option": 1}, "no_such_option", "an unknown option no_such_option")
    spec = reg.declared(name)
    if spec is None:
        return
    hints = typing.get_type_hints(spec)
    for f in dataclasses.fields(spec):
        hint = _plain(hints.get(f.name))
        assert hint in WRONG, (
            f"{reg.kind} {name!r}: option {f.name!r} has type {hints.get(f.name)!r}, which the options check cannot "
            f"check; declare it bool, int, float or str"
        )
        for bad in WRONG[hint]:
            _refused(reg, name, {**example, f.name: bad}, f.name, f"{f.name}={bad!r} (not a {hint.__name__})")
        for probe in PROBES[hint]:
            opts = {**example, f.name: probe}
            try:
                piece = reg.build(name, **opts)
            except RegistryError:
                continue
            try:
                call(piece)
            except (ValueError, RegistryError) as err:
                raise AssertionError(
                    f"{reg.kind} {name!r}: option {f.name}={probe!r} passes the options check but the piece refuses "
                    f"it when called ({err}); check it in the options dataclass's __post_init__"
                ) from None


def call_policy(piece: Any) -> None:
    u, valid = scores()
    piece(u, valid, generator=torch.Generator().manual_seed(0), step=5)


def call_criterion(piece: Any) -> None:
    s, t, y, row, u = flat()
    piece(s, t, y, temperature=1.0, row=row, u=u)


def call_class_sampler(piece: Any) -> None:
    s, t = flat()[:2]
    piece(t, temperature=1.0, generator=torch.Generator().manual_seed(0), student=s)
