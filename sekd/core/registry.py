"""One registry per axis: short stable names -> small functions (or classes with state).

A piece that takes options declares them where it is registered, as a small dataclass whose fields are the
option names, types and defaults and whose `__post_init__` checks ranges with the helpers below
(`@POLICIES.register("gls", options=GLSOptions)`). `check_kwargs` / `build` construct it, so a wrong name,
type or range fails at start-up with one line naming the config key (`position.options.Q='abc' must be an
integer (policy 'gls')`); keywords supplied at call time (generator, step, temperature, ...) are not
options. What a piece is beyond its options (a criterion's coupling of positions, a policy's state, a class
sampler's randomness) is declared by its kind's protocol: an entry that is a `Piece` binds its options
itself and keeps its declaration (`Criterion`, `ClassSampler`, `Policy`); flows read only that.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import sys
import types
import typing
from typing import Any, Callable, Generic, Iterator, Protocol, TypeVar, cast, runtime_checkable

E = TypeVar("E")  # what a registry serves: its entries, and what `build` returns
F = TypeVar("F")  # what a decorator registers, returned as it is


class RegistryError(ValueError):
    """An unknown name, a duplicate name or a bad keyword for a registered component."""


class OptionError(RegistryError):
    """One option's value breaks its declared type or range; `check_kwargs` adds the config key."""

    def __init__(self, option: str, value: Any, rule: str):
        super().__init__(f"{option}={value!r} must be {rule}")
        self.option, self.value, self.rule = option, value, rule


@runtime_checkable
class Piece(Protocol):
    """A registered entry that declares what kind of piece it is (a criterion's coupling, a policy's state,
    ...) and binds its own options, so what `build` returns still says what it declared."""

    @property
    def name(self) -> str: ...

    def bind(self, **options: Any) -> "Piece": ...


@dataclasses.dataclass(frozen=True)
class NoOptions:
    """A piece that takes no options (declared, so an option given to it is refused by name)."""


# ---- range checks for options' __post_init__ ------------------------------------------------


def at_least(option: str, value: float, lo: float) -> None:
    if not value >= lo:
        raise OptionError(option, value, f">= {lo:g}")


def positive(option: str, value: float) -> None:
    if not value > 0:
        raise OptionError(option, value, "> 0")


def in_range(option: str, value: float, lo: float, hi: float, *, open_lo: bool = False) -> None:
    """lo <= value <= hi, or lo < value <= hi with open_lo."""
    if not ((lo < value) if open_lo else (lo <= value)) or not value <= hi:
        raise OptionError(option, value, f"in {'(' if open_lo else '['}{lo:g}, {hi:g}]")


def _typed(option: str, hint: Any, value: Any) -> Any:
    """value as the declared type: ints for int, finite numbers for float (ints widen), no bools for
    either; command-line values arrive as whatever YAML made of them (`Q=abc` is a string)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):  # Optional[X], X | None
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None and len(args) < len(typing.get_args(hint)):
            return None
        hint = args[0] if len(args) == 1 else Any
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is float:
        if not number or not math.isfinite(value):
            raise OptionError(option, value, "a finite number")
        return float(value)
    if hint is int and not (number and isinstance(value, int)):
        raise OptionError(option, value, "an integer")
    if hint in (bool, str) and not isinstance(value, hint):
        raise OptionError(option, value, "true or false" if hint is bool else "a string")
    return value


def registering_module() -> str:
    """The module that registers a piece: the nearest frame that is a module's body (a plugin's applying a
    decorator, a built-in's) or that lies outside the registration helpers (a function that registers one:
    a test's, a notebook's)."""
    frame = sys._getframe(1)
    while frame is not None:
        module = frame.f_globals.get("__name__", "?")
        if frame.f_code.co_name == "<module>" or module not in _HELPERS:
            return module
        frame = frame.f_back  # type: ignore[assignment]
    return "?"


PLUGIN_MODULES: set[str] = set()  # every module outside sekd that registered a piece in this process

# the modules whose functions register on a caller's behalf (the decorators of each kind)
_HELPERS = {
    __name__,
    "sekd.selection.signals",
    "sekd.selection.policies",
    "sekd.selection.criteria",
    "sekd.selection.classes",
    "sekd.selection.samples",
    "sekd.data.sources",
}


class Registry(Generic[E]):
    """Entries of one kind E by name (`SIGNALS: Registry[Signal]`). An entry that is a class is its own
    factory: `build` constructs it, and its instances are the E (the GLS policy)."""

    def __init__(self, kind: str, call_time: tuple[str, ...] = ()):
        self.kind = kind
        self.call_time = set(call_time)  # keywords supplied at call time, not options
        self._entries: dict[str, Any] = {}  # an E, or a class whose instances are
        self._declared: dict[str, type] = {}  # name -> its options dataclass
        self._origin: dict[str, str] = {}  # name -> the module that registered it (sekd's, or a plugin's)

    def register(self, name: str, options: type | None = None) -> Callable[[F], F]:
        """Add an entry; `options` is the dataclass declaring its options (None: read the signature)."""
        if options is not None and not dataclasses.is_dataclass(options):
            raise RegistryError(f"{self.kind} {name!r}: options must be a dataclass, not {options!r}")

        def add(fn: F) -> F:
            if name in self._entries:
                raise RegistryError(f"{self.kind} {name!r} is already registered by {self._origin[name]}")
            self._entries[name] = fn
            self._origin[name] = origin = registering_module()
            if not (origin == "sekd" or origin.startswith("sekd.")):
                PLUGIN_MODULES.add(origin)
            if options is not None:
                self._declared[name] = options
            return fn

        return add

    def declared(self, name: str) -> type | None:
        """The options dataclass the entry was registered with (None when it declared none)."""
        self.get(name)
        return self._declared.get(name)

    def options(self, name: str) -> list[str]:
        """The option names `build` accepts for this entry."""
        spec = self.declared(name)
        if spec is not None:
            return [f.name for f in dataclasses.fields(spec)]
        fn = self._entry(name)
        params = inspect.signature(fn).parameters
        positional = inspect.isclass(fn)  # a class's constructor takes its options by name too
        return [
            n
            for n, p in params.items()
            if (p.kind is p.KEYWORD_ONLY or (positional and p.kind is p.POSITIONAL_OR_KEYWORD))
            and n not in self.call_time
        ]

    def origin(self, name: str) -> str:
        """The module whose import registered the entry: `sekd.selection.signals`, or a plugin's module."""
        self.get(name)
        return self._origin[name]

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def get(self, name: str) -> E:
        """The entry as registered (a class entry: the class; `build` makes the E)."""
        return self._entry(name)

    def _entry(self, name: str) -> Any:
        """The entry as registered (an E, or a class whose instances are)."""
        if name not in self._entries:
            raise RegistryError(f"unknown {self.kind} {name!r}; known: {', '.join(self.names())}")
        return self._entries[name]

    def check_kwargs(self, name: str, kwargs: dict[str, Any], key: str | None = None) -> dict[str, Any]:
        """Fail at start-up, not at step ten thousand, on an option that does not exist or whose value
        breaks its declared type or range; `key` (e.g. `position.options`) prefixes the option's name.
        Returns the options to bind: for a declared entry checked, typed and completed by its defaults."""
        fn = self._entry(name)
        spec = self._declared.get(name)
        if spec is None and any(p.kind is p.VAR_KEYWORD for p in inspect.signature(fn).parameters.values()):
            return dict(kwargs)

        def where(kw: str) -> str:
            return f"{key}.{kw}" if key else kw

        allowed = self.options(name)
        for kw in kwargs:
            if kw not in allowed:
                raise RegistryError(
                    f"{where(kw)}: {self.kind} {name!r} takes no option {kw!r}; allowed: {', '.join(allowed) or 'none'}"
                )
        if spec is None:
            return dict(kwargs)
        for f in dataclasses.fields(spec):
            required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            if required and f.name not in kwargs:
                raise RegistryError(f"{where(f.name)} is required: {self.kind} {name!r} has no default for it")
        hints = typing.get_type_hints(spec)
        try:
            opts = spec(**{kw: _typed(kw, hints[kw], v) for kw, v in kwargs.items()})
        except OptionError as err:
            shown = kwargs.get(err.option, err.value)  # as the user wrote it (0, not 0.0)
            raise RegistryError(f"{where(err.option)}={shown!r} must be {err.rule} ({self.kind} {name!r})") from None
        return {f.name: getattr(opts, f.name) for f in dataclasses.fields(spec)}

    def build(self, name: str, **kwargs: Any) -> E:
        """Bind keyword options now (checked), call later with tensors. A class is constructed with them;
        a `Piece` (an entry that declares its protocol, e.g. a `Criterion`) binds them itself, keeping
        what it declares; a plain function gets them through `functools.partial`."""
        opts = self.check_kwargs(name, kwargs)
        fn = self._entry(name)
        if inspect.isclass(fn):
            return cast(E, fn(**opts))  # a class entry builds an E
        if not opts:
            return fn
        if isinstance(fn, Piece):
            return cast(E, fn.bind(**opts))  # a piece binds into its own kind
        return cast(E, functools.partial(fn, **opts))  # a function's partial is called as the function
