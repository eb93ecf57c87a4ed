"""Cache kinds (docs/method.md §9): one per registered class sampler that reads the teacher alone, plugins'
too. A kind is the sampler's name, its options (completed by their defaults) and the form of its target;
all three enter the cache's signature. `rs_kd` stores (id, count) records; every other kind stores (id,
probability) records, plus the tail mass of a tail form. A sampler that chooses by the student cannot be
cached: its classes change as the student trains.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import yaml

from sekd.selection.classes import CLASSES, ClassSampler
from sekd.stores.teacher_cache.store import BASE_KEYS

COUNT_KINDS = ("rs_kd",)  # p~ = c_v / N exactly: (id, count) records, lossless


class KindError(ValueError):
    """A kind no cache can hold or a malformed kind spec; the message is one line."""


@dataclass(frozen=True)
class CacheKind:
    """A cacheable class sampler, bound: name, options (all of them), form."""

    name: str
    options: dict[str, Any] = field(default_factory=dict)
    form: str = "draws"

    @classmethod
    def from_signature(cls, sig: dict[str, Any]) -> "CacheKind":
        """The kind a signature (or a run's expectation of one) records."""
        return cls(str(sig["kind"]), {k: v for k, v in sig.items() if k not in BASE_KEYS}, str(sig["form"]))

    @property
    def records(self) -> str:
        return "counts" if self.name in COUNT_KINDS else "probs"

    def signature(self) -> dict[str, Any]:
        """The signature fields of this kind: kind, form, records, and each option under its own name."""
        return {"kind": self.name, "form": self.form, "records": self.records, **self.options}

    def label(self) -> str:
        """A folder name a command line takes as it is (no `=`): `top_p.max_k-64.p-0.9`."""
        return ".".join([self.name, *(f"{k}-{v}" for k, v in sorted(self.options.items()))])

    def overrides(self) -> str:
        """The sekd-train overrides of a run that reads this kind."""
        return " ".join([f"classes={self.name}", *(f"classes.options.{k}={v}" for k, v in self.options.items())])

    def sampler(self) -> ClassSampler:
        return CLASSES.build(self.name, **self.options)


def student_refusal(name: str) -> str:
    return (
        f"classes.cache: classes.name={name} chooses its classes by the student's logits, which change as it "
        "trains, so no offline teacher cache can hold them; unset classes.cache (or choose a teacher-only sampler)"
    )


def cache_kind(name: str, options: dict[str, Any] | None = None) -> CacheKind:
    """The kind of `name` with `options` checked and completed; KindError (one line) for an unknown or a
    student-dependent sampler, a bad option, or an option named like a signature field."""
    if name not in CLASSES:
        raise KindError(f"classes.name={name!r}: no cacheable class sampler of that name; known: {cacheable()}")
    piece = CLASSES.get(name)
    if piece.needs_student:
        raise KindError(student_refusal(name))
    try:
        opts = CLASSES.check_kwargs(name, dict(options or {}), key="classes.options")
    except ValueError as err:
        raise KindError(str(err)) from None
    clash = sorted(BASE_KEYS & set(opts))
    if clash:
        raise KindError(f"class sampler {name!r}: option {clash[0]!r} is a cache signature field; rename it")
    return CacheKind(name, opts, piece.form_of(opts))


def cacheable() -> str:
    return ", ".join(n for n in CLASSES.names() if not CLASSES.get(n).needs_student)


def parse_kind(spec: str) -> CacheKind:
    """`name` or `name:key=value,key=value` (values read as YAML: 20 -> int, 0.9 -> float) -> its kind."""
    name, _, rest = spec.partition(":")
    options: dict[str, Any] = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise KindError(f"--kind {spec!r}: expected name:key=value,key=value, got {item!r}")
        options[key.strip()] = yaml.safe_load(value)
    return cache_kind(name.strip(), options)


def bytes_per_position_bound(kind: CacheKind, vocab_size: int) -> float:
    """About the most a position of `kind` takes (free-space estimates): its valid bit, its len, its records
    (rs_kd: at most min(N, V); another kind: its support on flat logits, where top-p's is widest) and a
    tail mass."""
    import torch

    from sekd.stores.teacher_cache.store import TAIL, Layout, lens_dtype

    if kind.records == "counts":
        n = int(kind.options["n_draws"])
        most = min(n, vocab_size)
        record = Layout("counts", vocab_size, n).record_bytes
    else:
        flat = kind.sampler()(torch.zeros(1, vocab_size), temperature=1.0, generator=torch.Generator().manual_seed(0))
        most = int(flat.mask.sum())
        record = Layout("probs", vocab_size).record_bytes
    return 1 / 8 + lens_dtype(most).itemsize + most * record + TAIL.itemsize * (kind.form == "tail")
