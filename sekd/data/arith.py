"""The embedded task (docs/method.md §10 task-specific regime, at CPU scale): short arithmetic word problems.

Every problem is one (a, op, b, template) with operands 0..MAX_OPERAND, + or -, and a result >= 0:

    question: "Tom has 7 apples and buys 5 more. How many apples does Tom have now?"
    answer:   "7 + 5 = 12. #### 12"          (GSM8K's layout, so qa_format.final_answer scores it)

Small numbers and a handful of templates keep it learnable by a ~1M-parameter teacher in a few
hundred steps. The split is by a hash of the problem's key, not its position, so splits are disjoint
and stay put when the generator grows; each split is listed in a fixed hash order, which mixes
templates and operands, so its first n problems are a fair sample.
"""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache

VERSION = 1  # bump when templates, ranges or the answer layout change
MAX_OPERAND = 20
SHARES = {"train": 0.8, "validation": 0.1, "test": 0.1}
SPLITS = tuple(SHARES)

# op -> templates; {a} and {b} are the operands, in the order the answer writes them
TEMPLATES: dict[str, tuple[str, ...]] = {
    "+": (
        "Tom has {a} apples and buys {b} more. How many apples does Tom have now?",
        "A box has {a} pens and Sara adds {b} more. How many pens are in the box?",
        "There are {a} birds on a tree and {b} more come. How many birds are there now?",
        "Ben reads {a} pages and then {b} more pages. How many pages does Ben read?",
        "A farm has {a} cows and {b} sheep. How many animals does the farm have?",
    ),
    "-": (
        "Tom has {a} apples and eats {b} of them. How many apples does Tom have left?",
        "A box has {a} pens and Sara takes {b} out. How many pens are left in the box?",
        "There are {a} birds on a tree and {b} fly away. How many birds are left?",
        "Ben has {a} stickers and gives {b} to Ann. How many stickers does Ben have left?",
        "A shop has {a} cakes and sells {b} of them. How many cakes does the shop have left?",
    ),
}


def _apply(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a - b


def _split_of(key: str) -> str:
    x = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64  # uniform in [0,1)
    edge = 0.0
    for split, share in SHARES.items():
        edge += share
        if x < edge:
            return split
    return SPLITS[-1]  # x within rounding of 1.0


@lru_cache(maxsize=None)
def _all() -> dict[str, tuple[tuple[str, dict[str, str]], ...]]:
    """split -> ((key, problem), ...) in hash order; built once per process (~3k problems)."""
    out: dict[str, list[tuple[str, dict[str, str]]]] = {s: [] for s in SPLITS}
    for op, templates in TEMPLATES.items():
        for t, template in enumerate(templates):
            for a in range(MAX_OPERAND + 1):
                for b in range(MAX_OPERAND + 1):
                    c = _apply(a, op, b)
                    if c < 0:
                        continue
                    key = f"{a}{op}{b}/{op}{t}"
                    problem = {"question": template.format(a=a, b=b), "answer": f"{a} {op} {b} = {c}. #### {c}"}
                    out[_split_of(key)].append((key, problem))
    # hash order, not generation order: the first n of a split mix all templates and operands
    return {s: tuple(sorted(v, key=lambda kp: hashlib.sha256(kp[0].encode()).hexdigest())) for s, v in out.items()}


def problems(split: str, n: int | None = None) -> list[dict[str, str]]:
    """The first `n` (default all) problems of a split, each {"question", "answer"}; fresh dicts."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; known: {', '.join(SPLITS)}")
    if n is not None and n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    return [dict(p) for _, p in _all()[split][:n]]


def signature() -> str:
    """16 hex chars identifying the generator (version, range, templates, shares), for cache keys."""
    blob = json.dumps(
        {"version": VERSION, "max_operand": MAX_OPERAND, "templates": TEMPLATES, "shares": SHARES}, sort_keys=True
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
