"""A content-keyed cache of built artifacts (tokenizer, pretrained models): build once, reuse.

An artifact lives in `<cache>/<kind>-<hash of its inputs>/`. It is built in a temporary folder and
renamed into place, under a file lock, so concurrent runs never see (or build) half of one.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

from filelock import FileLock

FORMAT = 1


def key_hash(inputs: dict[str, Any]) -> str:
    blob = json.dumps({"format": FORMAT, **inputs}, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def cached(cache_dir: Path, kind: str, inputs: dict[str, Any], build: Callable[[Path], None]) -> Path:
    """Path of the artifact for `inputs`, calling `build(tmp_folder)` only if it is not there yet."""
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    final = cache_dir / f"{kind}-{key_hash(inputs)}"
    if (final / "inputs.json").exists():
        return final
    with FileLock(str(final) + ".lock"):
        if (final / "inputs.json").exists():  # another process built it while we waited
            return final
        tmp = Path(tempfile.mkdtemp(dir=cache_dir, prefix=f".{kind}-"))
        try:
            build(tmp)
            (tmp / "inputs.json").write_text(json.dumps(inputs, indent=2, sort_keys=True, default=str))
            if final.exists():
                shutil.rmtree(final)  # a partial folder from a crash before the rename's era
            tmp.rename(final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final
