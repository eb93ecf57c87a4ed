"""English prose from Python's own `pydoc_data.topics`, split by document into train/validation/test.

The split is deterministic: documents are ordered by a hash of their key and dealt out greedily so
that each split gets its share of characters (80/10/10 by default).
"""

from __future__ import annotations

import functools
import hashlib
import re

SPLITS = ("train", "validation", "test")
SHARES = {"train": 0.8, "validation": 0.1, "test": 0.1}


def documents() -> dict[str, str]:
    """topic key -> cleaned prose (markup rules and grammar lines dropped, whitespace folded)."""
    return dict(_documents())


@functools.cache
def _documents() -> dict[str, str]:
    # cleaned once per process: every run asks for the corpus's signature, and cleaning takes seconds
    from pydoc_data.topics import topics

    out = {}
    for key, text in topics.items():
        lines = []
        for line in text.splitlines():
            if re.fullmatch(r"\s*[*=\-~^]{3,}\s*", line):  # section underlines
                continue
            lines.append(line.rstrip())
        body = re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()
        if body:
            out[key] = body
    return out


def _key_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def split_keys() -> dict[str, list[str]]:
    """Deal documents, largest first, to the split furthest below its share of characters."""
    docs = _documents()
    total = sum(len(t) for t in docs.values())
    got = {s: 0 for s in SPLITS}
    keys: dict[str, list[str]] = {s: [] for s in SPLITS}
    for key in sorted(docs, key=lambda k: (-len(docs[k]), _key_hash(k))):
        deficit = {s: SHARES[s] * total - got[s] for s in SPLITS}
        s = max(SPLITS, key=lambda s: (deficit[s], -SPLITS.index(s)))
        keys[s].append(key)
        got[s] += len(docs[key])
    return keys


def load_split(split: str) -> list[str]:
    """The documents of one split, in a fixed order."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; known: {', '.join(SPLITS)}")
    docs = _documents()
    return [docs[k] for k in split_keys()[split]]


@functools.cache
def signature() -> str:
    """Content hash of the whole corpus and its split, for artifact cache keys."""
    docs = _documents()
    h = hashlib.sha256()
    for s, ks in split_keys().items():
        h.update(s.encode())
        for k in ks:
            h.update(k.encode())
            h.update(docs[k].encode())
    return h.hexdigest()[:16]
