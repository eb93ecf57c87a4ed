"""The sample-score store and pre-pass (docs/method.md §7): U_i of every sample, computed once per model pair.

One pre-pass of the frozen initial student (and the teacher, for ce_ratio / kl) gives each sample U_i
(sekd.selection.samples.mean_signal). Scores are stored by sample content hash, never by batch, step or
order, one JSON file per key: `<store_dir>/<sampler>-<key>.json` = {"format", "fields", "scores":
{sample_id: U_i, or null for no valid position}}, locked while written (sekd.core.artifacts.lock), `key`
a hash of `store_fields`. A later run with the same key scores only the samples the file lacks. Across
ranks (`Ranks`) the missing samples are cut into the single process's batches, rank r scores batches
r::world and every rank gathers all scores; rank 0 alone locks, reads and writes the store, so the file is
the one a single process writes.
"""

from __future__ import annotations

import json
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import torch
from torch import Tensor
from tqdm.auto import tqdm

from sekd.core.artifacts import content_key, lock
from sekd.core.errors import EchoedFault
from sekd.data.packing import PackedData
from sekd.core.files import atomic_write_json
from sekd.selection.samples import (
    SAMPLE_SELECTORS,
    SampleSelector,
    mean_signal,
    random_samples,
    sample_budget,
    top_samples,
)

STORE_FORMAT = 1  # bump when the store's layout or the meaning of U_i changes


@dataclass
class SampleSelection:
    """Kept sample indices (ascending) into the data, U_i [N] (None without a pre-pass), and its cost."""

    indices: list[int]
    importance: Tensor | None = None  # U_i
    prepass_seconds: float = 0.0
    reused: bool = False  # every score came from the store: no forward pass ran
    forward_tokens: dict[str, int] = field(default_factory=lambda: {"student": 0, "teacher": 0})
    n_scored: int = 0  # samples the pre-pass ran over in this call


# ---- ranks ----------------------------------------------------------------------------------


class Ranks(Protocol):
    """What the pre-pass needs of a process group (sekd.distributed.process_group.Dist has it)."""

    @property
    def rank(self) -> int: ...

    @property
    def world_size(self) -> int: ...

    def all_gather_objects(self, obj: Any) -> list[Any]: ...


@dataclass(frozen=True)
class OneProcess:
    """The single-process group: rank 0 of 1."""

    rank: int = 0
    world_size: int = 1

    def all_gather_objects(self, obj: Any) -> list[Any]:
        return [obj]


def from_main(dist: Ranks, obj: Any) -> Any:
    """Rank 0's `obj` on every rank (the others pass None)."""
    return dist.all_gather_objects(obj if dist.rank == 0 else None)[0]


# ---- the pre-pass ----------------------------------------------------------------------------


def _logits(model: torch.nn.Module, x: Tensor, vocab: int | None) -> Tensor:
    """Next-token logits cut to the tokenizer's vocabulary (padding rows dropped).  [B,T] -> [B,T,V]"""
    z = model(input_ids=x).logits.to(x.device)  # a placed teacher's, from its own card
    return z if vocab is None else z[..., :vocab]


class _Frozen:
    """Eval mode for the pre-pass; each model's own train/eval flag comes back afterwards."""

    def __init__(self, *models: torch.nn.Module | None):
        self.models = [m for m in models if m is not None]

    def __enter__(self) -> None:
        self.flags = [m.training for m in self.models]
        for m in self.models:
            m.eval()

    def __exit__(self, *exc: Any) -> None:
        for m, flag in zip(self.models, self.flags):
            m.train(flag)


@torch.no_grad()
def prepass(
    selector: SampleSelector,
    data: PackedData,
    student: torch.nn.Module,
    teacher: torch.nn.Module | None,
    *,
    batch_size: int = 16,
    device: str | torch.device = "cpu",
    vocab: int | None = None,
    temperature: float = 1.0,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """U_i for every sample of `data`, one forward of each needed model per batch, computed in `dtype` (the
    run's: bf16 autocast on a GPU, so the [B,T,V] logits are half the bytes of fp32's and the forwards run
    at the run's speed, which Table 7 counts).  -> float32 [N]"""
    sig = selector.signal
    assert sig is not None, f"sample selector {selector.name!r} has no pre-pass"  # select_samples skips it
    needed = teacher if selector.needs_teacher else None
    U = torch.empty(len(data), dtype=torch.float32)
    kind = torch.device(device).type
    with _Frozen(student, teacher), torch.autocast(kind, dtype=dtype, enabled=dtype != torch.float32):
        for lo in tqdm(
            range(0, len(data), batch_size), desc=f"score samples ({selector.name})", leave=False, unit="batch"
        ):
            x = data.input_ids[lo : lo + batch_size].to(device)  # [B,T]
            y = data.labels[lo : lo + batch_size].to(device)  # x_{t+1} or -100   [B,T]
            s = _logits(student, x, vocab)  # [B,T,V]
            t = _logits(needed, x, vocab) if needed is not None else None  # [B,T,V]
            U[lo : lo + batch_size] = mean_signal(sig, s, t, y, temperature=temperature).cpu()
    return U


# ---- the score store ---------------------------------------------------------------------------


DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}


def store_fields(
    selector: SampleSelector,
    *,
    student_sig: str,
    teacher_sig: str,
    tokenizer_sig: str,
    vocab: int | None,
    temperature: float,
    dtype: torch.dtype = torch.float32,
) -> dict[str, Any]:
    """Everything U_i depends on besides the sample itself (hashed into the store key)."""
    needed = {
        "student_sig": (selector.needs_student, student_sig),
        "teacher_sig": (selector.needs_teacher, teacher_sig),
        "tokenizer_sig": (True, tokenizer_sig),
    }
    missing = [k for k, (used, v) in needed.items() if used and not v]
    if missing:  # an empty signature would let different models share one store
        raise ValueError(f"sample selector {selector.name!r} stores scores; give {', '.join(missing)}")
    fields: dict[str, Any] = {
        "format": STORE_FORMAT,
        "sampler": selector.name,
        "signal": selector.signal,
        "student_sig": student_sig,
        "tokenizer_sig": tokenizer_sig,
        "vocab": vocab,
        "dtype": DTYPE_NAMES[dtype],
    }  # bf16 scores are not fp32 scores
    if selector.needs_teacher:
        fields["teacher_sig"] = teacher_sig
    if selector.uses_temperature:
        fields["temperature"] = float(temperature)
    return fields


def store_path(store_dir: Path, fields: dict[str, Any]) -> Path:
    """<store_dir>/<sampler>-<16 hex of sha256(fields)>.json"""
    return Path(store_dir) / f"{fields['sampler']}-{content_key(fields)}.json"


def load_importance(path: Path, fields: dict[str, Any]) -> dict[str, float]:
    """sample_id -> U_i from a store file ({} when absent); refuses a file written for other fields."""
    if not path.exists():
        return {}
    blob = json.loads(path.read_text())
    if blob.get("fields") != fields:
        raise ValueError(f"{path}: score store written for {blob.get('fields')}, expected {fields}")
    return {k: float("-inf") if v is None else float(v) for k, v in blob["scores"].items()}


def save_importance(path: Path, fields: dict[str, Any], scores: dict[str, float]) -> None:
    """Atomic write; -inf (no valid position) as null, since JSON has no infinities."""
    out = {k: None if math.isinf(v) else v for k, v in sorted(scores.items())}
    atomic_write_json(path, {"format": STORE_FORMAT, "fields": fields, "scores": out})


# ---- selection ---------------------------------------------------------------------------------


def sample_importance(
    selector: SampleSelector,
    data: PackedData,
    *,
    student: torch.nn.Module | None,
    teacher: torch.nn.Module | None,
    fields: dict[str, Any] | None,
    store_dir: Path | None,
    dist: Ranks | None = None,
    **run: Any,
) -> SampleSelection:
    """U_i for every sample: stored ones read, only the missing ones scored (then stored).  indices unset."""
    ranks: Ranks = dist or OneProcess()
    if store_dir is None:
        return _score_missing(selector, data, list(range(len(data))), {}, student, teacher, dist=ranks, **run)
    assert fields is not None  # a store's key (store_fields)
    path = store_path(store_dir, fields)
    main = ranks.rank == 0
    if main:
        path.parent.mkdir(parents=True, exist_ok=True)
    # one scorer per key; a run sharing it waits, then finds the scores and pays nothing. Only rank 0
    # touches the file: it locks, reads and writes; the other ranks get what it read.
    with lock(path) if main else nullcontext():
        got: tuple[dict[str, float] | None, str | None] | None = None
        if main:
            try:
                got = (load_importance(path, fields), None)
            except ValueError as e:  # every rank stops with rank 0's one line
                got = (None, str(e))
        stored, error = from_main(ranks, got)
        if error is not None:
            raise ValueError(error)
        missing = [i for i, sid in enumerate(data.sample_ids) if sid not in stored]
        out = _score_missing(selector, data, missing, stored, student, teacher, dist=ranks, **run)
        if missing:
            main_saves(ranks, lambda: save_importance(path, fields, stored))
    return out


def main_saves(ranks: Ranks, save: Callable[[], None]) -> None:
    """Rank 0 stores the scores and every rank learns how it went: a full disk stops all ranks at once, rank 0
    with its own error (the one line names the file), the others quietly, rather than at their next collective."""
    failure: OSError | None = None
    if ranks.rank == 0:
        try:
            save()
        except OSError as err:
            failure = err
    told = from_main(ranks, None if failure is None else f"rank 0 stopped: {failure}")
    if failure is not None:
        raise failure
    if told is not None:
        raise EchoedFault(told)


def shard_batches(missing: list[int], batch_size: int, rank: int, world_size: int) -> list[int]:
    """The samples rank `rank` scores: batches r::world of the single process's batches of `missing`,
    so each batch (and its U_i, to the bit) is the one a single process computes."""
    batches = [missing[a : a + batch_size] for a in range(0, len(missing), batch_size)]
    return [i for b in batches[rank::world_size] for i in b]


def _score_missing(
    selector: SampleSelector,
    data: PackedData,
    missing: list[int],
    stored: dict[str, float],
    student: torch.nn.Module | None,
    teacher: torch.nn.Module | None,
    *,
    dist: Ranks,
    **run: Any,
) -> SampleSelection:
    """Runs the pre-pass over `missing` only (this rank's share), gathers every rank's scores into
    `stored`, returns U for all of `data`."""
    seconds = 0.0
    if missing:
        assert student is not None  # the pre-pass reads the student's logits (select_samples checks it)
        t0 = time.perf_counter()
        mine = shard_batches(missing, int(run.get("batch_size", 16)), dist.rank, dist.world_size)
        U_mine = prepass(selector, data.subset(mine), student, teacher, **run) if mine else torch.empty(0)
        seconds = time.perf_counter() - t0
        for part in dist.all_gather_objects(list(zip(mine, U_mine.tolist()))):  # every rank's, in rank order
            stored.update({data.sample_ids[i]: u for i, u in part})
    U = torch.tensor([stored[sid] for sid in data.sample_ids], dtype=torch.float32)
    tokens = len(missing) * data.seq_len
    return SampleSelection(
        [],
        U,
        seconds,
        reused=not missing,
        n_scored=len(missing),
        forward_tokens={
            "student": tokens if selector.needs_student else 0,
            "teacher": tokens if selector.needs_teacher else 0,
        },
    )


def select_samples(
    name: str,
    data: PackedData,
    *,
    l: float,
    seed: int,
    student: torch.nn.Module | None = None,
    teacher: torch.nn.Module | None = None,
    student_sig: str = "",
    teacher_sig: str = "",
    tokenizer_sig: str = "",
    store_dir: Path | None = None,
    batch_size: int = 16,
    device: str | torch.device = "cpu",
    vocab: int | None = None,
    temperature: float = 1.0,
    dtype: torch.dtype = torch.float32,
    dist: Ranks | None = None,
) -> SampleSelection:
    """The samples training iterates over (docs/method.md §7): floor(l * N) of them (all for `all` or l = 1).
    `dist`: the ranks that share the pre-pass (one process when None); every rank gets the same selection."""
    selector = SAMPLE_SELECTORS.get(name)
    n, n_keep = len(data), sample_budget(len(data), l)
    if selector.signal is None or n_keep == n:  # nothing to rank: no pre-pass, no cost
        keep = random_samples(n, n_keep, seed) if selector.random else list(range(n))
        return SampleSelection(keep)
    for role, model, needed in (
        ("student", student, selector.needs_student),
        ("teacher", teacher, selector.needs_teacher),
    ):
        if needed and model is None:
            raise ValueError(f"sample selector {name!r} needs the {role} for its pre-pass")
    fields = None
    if store_dir is not None:
        fields = store_fields(
            selector,
            student_sig=student_sig,
            teacher_sig=teacher_sig,
            tokenizer_sig=tokenizer_sig,
            vocab=vocab,
            temperature=temperature,
            dtype=dtype,
        )
    sel = sample_importance(
        selector,
        data,
        student=student,
        teacher=teacher,
        fields=fields,
        store_dir=store_dir,
        batch_size=batch_size,
        device=device,
        vocab=vocab,
        temperature=temperature,
        dtype=dtype,
        dist=dist,
    )
    assert sel.importance is not None  # the pre-pass's U_i
    sel.indices = top_samples(sel.importance, n_keep)
    return sel
