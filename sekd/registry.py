"""One registry per axis: short stable names -> small functions (or classes with state)."""
from __future__ import annotations

import inspect
from typing import Any, Callable


class RegistryError(ValueError):
    """An unknown name, a duplicate name or a bad keyword for a registered component."""


class Registry:
    def __init__(self, kind: str, call_time: tuple[str, ...] = ()):
        self.kind = kind
        self.call_time = set(call_time)  # keywords supplied at call time, not options
        self._entries: dict[str, Callable] = {}

    def register(self, name: str) -> Callable[[Callable], Callable]:
        def add(fn: Callable) -> Callable:
            if name in self._entries:
                raise RegistryError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = fn
            return fn

        return add

    def options(self, name: str) -> list[str]:
        """The option names `build` accepts for this entry."""
        fn = self.get(name)
        params = inspect.signature(fn).parameters
        kinds = (inspect.Parameter.KEYWORD_ONLY,)
        if inspect.isclass(fn):
            kinds = (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        return [n for n, p in params.items() if p.kind in kinds and n not in self.call_time]

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self):
        return iter(self.names())

    def get(self, name: str) -> Callable:
        if name not in self._entries:
            raise RegistryError(f"unknown {self.kind} {name!r}; known: {', '.join(self.names())}")
        return self._entries[name]

    def check_kwargs(self, name: str, kwargs: dict[str, Any], key: str | None = None) -> None:
        """Fail at start-up, not at step ten thousand, when a keyword does not exist."""
        fn = self.get(name)
        params = inspect.signature(fn).parameters
        if any(p.kind is p.VAR_KEYWORD for p in params.values()):
            return
        allowed = self.options(name)
        for kw in kwargs:
            if kw not in allowed:
                where = f"{key}.{kw}" if key else kw
                raise RegistryError(
                    f"{where}: {self.kind} {name!r} takes no option {kw!r}; allowed: {', '.join(allowed) or 'none'}"
                )

    def build(self, name: str, **kwargs: Any) -> Callable:
        """Bind keyword options now (checked), call later with tensors."""
        self.check_kwargs(name, kwargs)
        fn = self.get(name)
        if inspect.isclass(fn):
            return fn(**kwargs)
        if not kwargs:
            return fn

        def bound(*args: Any, **more: Any) -> Any:
            return fn(*args, **kwargs, **more)

        bound.__name__ = getattr(fn, "__name__", name)
        bound.__doc__ = fn.__doc__
        bound.__wrapped__ = fn  # type: ignore[attr-defined]
        bound.options = dict(kwargs)  # type: ignore[attr-defined]
        return bound
