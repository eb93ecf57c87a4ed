"""Helpers for the cache tests: the tiny teacher's spec, build options, folder bytes, subprocesses."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
SPEC = {"hidden_size": 32, "intermediate_size": 64, "layers": 1, "heads": 2, "kv_heads": 1}
PAD_ROWS = 5  # the head is wider than the tokenizer, as Qwen3's is: the cache must cut it
BUILD = dict(
    teacher_name="tiny-teacher",
    tokenizer_sig="tok-sig",
    n_draws=64,
    temperature=1.0,
    seed=0,
    num_shards=4,
    batch_size=3,
    progress=False,
)


def folder_bytes(root: Path) -> dict[str, bytes]:
    """Every non-hidden file's bytes (hidden: lock files and temp files of atomic writes)."""
    return {p.name: p.read_bytes() for p in sorted(root.iterdir()) if p.is_file() and not p.name.startswith(".")}


def run_py(code: str, *args: str, timeout: int = 120, wait: bool = True):
    """Run python code in a subprocess with one torch thread."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-c", code, *args]
    if not wait:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def edit_manifest(root: Path, edit, reseal: bool) -> None:
    """Apply `edit` (a function of the manifest dict) to root/manifest.json. reseal=True recomputes its
    checksum, as a builder's own write would (a consistent edit); False leaves it stale (plain tampering)."""
    import json

    from sekd.stores.teacher_cache.store import MANIFEST, write_manifest

    man = json.loads((root / MANIFEST).read_text())
    edit(man)
    if reseal:
        write_manifest(root, man)
    else:
        (root / MANIFEST).write_text(json.dumps(man, indent=2, sort_keys=True) + "\n")


def cacheable_kinds():
    """Every registered class sampler a cache can hold, with the options its conformance example gives it
    (plugins' too), and top_k_truncation's raw reading besides."""
    from sekd.selection.classes import CLASSES
    from sekd.stores.teacher_cache.kinds import cache_kind

    kinds = [cache_kind(n, dict(CLASSES.get(n).example)) for n in CLASSES.names() if not CLASSES.get(n).needs_student]
    return [*kinds, cache_kind("top_k_truncation", {"top": 5, "normalization": "raw"})]
