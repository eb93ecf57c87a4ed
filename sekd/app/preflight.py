"""The folders a run writes, checked before any model loads: each one writable (readable where read), and
enough free space for what the run will write there, roughly, from the config's shapes (sekd/app/plan.py).

A folder that fails is refused in one line naming the key and the path (`sekd: config error: ...`, exit 2),
as a bad input is: nothing has been built or loaded yet, and nothing is left behind.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from sekd.app.faults import size
from sekd.core.errors import ConfigError

if TYPE_CHECKING:
    from sekd.config.schema import RunConfig
    from sekd.stores.runs import RunDir

WRITES = {
    "paths.root": "checkpoint.pt, kept whole while it is replaced, and the model",
    "paths.cache": "the embedded pair, the teacher cache and the sample scores it builds",
}
MARGIN = 1.25  # the estimate is rough: the tokenizer, data, metrics and lm-eval's output ride on top


def preflight(cfg: RunConfig, run: RunDir) -> None:
    """Each written folder writable, a named teacher cache readable, then the free space of each disk."""
    written = folders(cfg, run)
    for key, path in written:
        check_writable(key, path)
    if cfg.classes.cache not in (None, "auto"):
        check_readable("classes.cache", Path(str(cfg.classes.cache)))
    check_space(cfg, written, run.trained())


def folders(cfg: RunConfig, run: RunDir) -> list[tuple[str, Path]]:
    """(key, folder) for every folder the run writes: the run folder, its eval folder, the build artifacts
    and the teacher cache it builds (classes.cache=auto; a named cache is only read)."""
    out = [("paths.root", run.path), ("paths.cache", Path(cfg.paths.cache))]
    if cfg.eval.suite != "none":
        out.append(("paths.root", run.eval_dir))
    if cfg.classes.cache == "auto":
        out.append(("classes.cache=auto, under paths.cache", Path(cfg.paths.cache) / "teacher_cache"))
    return out


def existing(path: Path) -> Path:
    """`path`, or its nearest ancestor that exists: where the run's first write will land."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable(key: str, path: Path) -> None:
    """Probe by writing (and removing) a file: permissions and a read-only mount both show."""
    here = existing(path)
    if not here.is_dir():
        raise ConfigError(f"{key}: {path} cannot be made: {here} is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(dir=here, prefix=".sekd-probe.", suffix=".tmp")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise ConfigError(
            f"{key}: cannot write in {here} ({err.strerror or err}) for {path}; make it writable, or point "
            f"{key.split(',')[0].split('=')[0]} at a writable folder"
        ) from None


def check_readable(key: str, path: Path) -> None:
    if path.exists() and not os.access(path, os.R_OK | os.X_OK):
        raise ConfigError(f"{key}={path}: cannot read this folder (permission denied)")


def check_space(cfg: RunConfig, written: list[tuple[str, Path]], trained: bool = False) -> None:
    """Free space per disk against the bytes the run writes there; folders on one disk add up."""
    needs = estimate(cfg, trained)
    if not needs:
        return
    disks: dict[int, tuple[Path, list[str], int]] = {}
    for key, path in written:
        need = needs.get(key, 0)
        here = existing(path)
        dev = here.stat().st_dev
        where, keys, total = disks.get(dev, (here, [], 0))
        disks[dev] = (where, keys + ([key] if need and key not in keys else []), total + need)
    for where, keys, need in disks.values():
        free = shutil.disk_usage(where).free
        if need * MARGIN > free:
            raise ConfigError(
                f"{' and '.join(keys)}: {where} has {size(free)} free, but this run writes about "
                f"{size(need * MARGIN)} there ({'; '.join(WRITES[k.split('=')[0]] for k in keys if k.split('=')[0] in WRITES)}); "
                "free space there, or point the key at a larger disk"
            )


def estimate(cfg: RunConfig, trained: bool = False) -> dict[str, int]:
    """Bytes per key, from the pair's shapes (nothing loaded): under paths.root two checkpoints (the old one
    stays until the new is whole: fp32 weights + the optimizer's state) and the fp32 model (none once
    `trained`: the run only scores); under paths.cache the embedded pair when it is not built yet, the teacher
    cache (classes.cache=auto) and the sample scores. {} when the shapes are not on local disk (the run will
    say so itself)."""
    from sekd.app.plan import OPTIMIZER_BYTES, pair_shapes

    try:
        teacher, student = pair_shapes(cfg)
    except (ConfigError, OSError, ValueError, KeyError):
        return {}
    needs = {}
    if cfg.mode == "distill" and cfg.stage != "score" and not trained:
        checkpoint = student.params * (4 + OPTIMIZER_BYTES.get(cfg.train.optimizer, 8))
        needs["paths.root"] = 2 * checkpoint + 4 * student.params
    cache = 0
    if cfg.model.source == "embedded" and not any((Path(cfg.paths.cache) / "embedded").glob("model-*")):
        cache += 4 * (teacher.params + student.params)  # built once, for every later run
    if not trained:
        cache += sample_store_bytes(cfg) + teacher_cache_bytes(cfg, student.vocab)
    if cache:
        needs["paths.cache"] = cache
    return needs


def data_tokens(cfg: RunConfig) -> int:
    """The training data's tokens, roughly: data.token_budget, else what train.steps consume (a floor: the
    whole train split is not known before it is read; 0 when train.steps=None counts epochs of it)."""
    t = cfg.train
    return int(cfg.data.token_budget or (t.steps or 0) * t.micro_batch_size * t.grad_accum * cfg.data.seq_len)


def teacher_cache_bytes(cfg: RunConfig, vocab: int) -> int:
    """classes.cache=auto: per position its valid bit, its count of classes, its records and a tail form's
    tail mass (sekd/stores/teacher_cache/format.py); 0 for another cache setting."""
    if cfg.classes.cache != "auto" or cfg.mode != "distill":
        return 0
    from sekd.stores.teacher_cache.kinds import bytes_per_position_bound, cache_kind

    kind = cache_kind(cfg.classes.name, dict(cfg.classes.options))
    return int(data_tokens(cfg) * bytes_per_position_bound(kind, vocab))


SCORE_ENTRY_BYTES = 48  # one `"<16 hex>": <float>,` line of the sample-score store's JSON


def sample_store_bytes(cfg: RunConfig) -> int:
    """The sample-score store (samples.name scored by a pre-pass): one JSON entry per training sample."""
    from sekd.selection.samples import SAMPLE_SELECTORS, SampleSelector

    kind = SAMPLE_SELECTORS.get(cfg.samples.name) if cfg.mode == "distill" else None
    if not isinstance(kind, SampleSelector) or kind.signal is None:
        return 0
    return SCORE_ENTRY_BYTES * max(1, data_tokens(cfg) // cfg.data.seq_len)
