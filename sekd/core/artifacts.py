"""Build once under a content hash: the one helper behind every derived cache of the package.

    <name>-<key>          the artifact (a file or a folder); `key` hashes everything it depends on
    <name>-<key>.lock     held while it is built (sekd.core.files.folder_lock: gone once released), so
                          concurrent builders build it once

It is built into a hidden temporary sibling and renamed into place, so a reader sees all of it or
nothing, and a killed builder leaves no half artifact. Users: packed data (sekd.data.dataset,
sekd.data.qa), the embedded tokenizer and models (sekd.embedded.build), the lm-eval task folders
(sekd.evaluation.tasks, sekd.evaluation.generation); the sample-score store (sekd.stores.sample_importance) shares
`content_key` and `lock`. Each user keeps its own key fields and names, so existing caches stay valid.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, ContextManager

from sekd.core.files import folder_lock


def content_key(fields: Any, length: int = 16) -> str:
    """The first `length` hex digits of sha256 over `fields` as sorted-key JSON (non-JSON values as str)."""
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:length]


def lock(path: Path) -> ContextManager[None]:
    """The lock beside `path` (`<path>.lock`) that its builders and writers hold; its parent must exist."""
    return folder_lock(Path(str(path) + ".lock"))


def build_once(
    final: Path, build: Callable[[Path], None], *, folder: bool = False, ready: Callable[[Path], bool] | None = None
) -> Path:
    """`final`, built by `build(tmp)` only if it is not `ready` yet (default: it exists); returns `final`.

    `build` writes the artifact at `tmp`: a file it creates, or (folder=True) an empty folder it fills.
    A folder left at `final` that is not `ready` (a crash of an older, non-atomic builder) is replaced."""
    final = Path(final)
    ready = ready or Path.exists
    if ready(final):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with lock(final):
        if ready(final):  # another process built it while we waited
            return final
        tmp = _temporary(final, folder)
        try:
            build(tmp)
            if folder and final.is_dir():
                shutil.rmtree(final)
            os.replace(tmp, final)
        finally:
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink(missing_ok=True)
    return final


def _temporary(final: Path, folder: bool) -> Path:
    """A fresh hidden sibling of `final` (`.<name>.<random>[.tmp]`): an empty folder, or a free file name."""
    if folder:
        tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}."))
        tmp.chmod(0o755)  # mkdtemp makes it private; caches are shared
        return tmp
    return final.parent / f".{final.name}.{secrets.token_hex(6)}.tmp"
