"""checkpoint.pt: everything a restart needs to end with the same weights. The weights and optimizer state (in the
file; under fsdp in the torch.distributed.checkpoint folder it names, every rank writing its shard), the schedule,
the `Progress`, every rank's RNG states and the selector's state; written by rank 0, read with weights_only=True."""

from __future__ import annotations

import pickle
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from sekd.core.errors import ConfigError
from sekd.core.files import atomic_torch_save
from sekd.distributed.fsdp import load_sharded, remove_sharded, save_sharded

if TYPE_CHECKING:
    from sekd.training.trainer import Trainer


@dataclass
class Progress:
    """Where training is: optimizer step, and the data position (epoch, sample offset in it)."""

    step: int = 0
    epoch: int = 0
    offset: int = 0
    tokens_seen: int = 0
    tokens_supervised: int = 0
    teacher_tokens: int = 0  # tokens the teacher ran over (0 when training from the offline cache)
    on_policy_batches: int = 0  # micro-batches the student generated (regime=on_policy)


def save_checkpoint(tr: Trainer) -> None:
    """checkpoint.pt, by rank 0; it holds every rank's RNG states (each rank draws for its own samples).
    Sharded (fsdp): every rank first writes its shard into the folder checkpoint.pt then names; the
    older folder goes once checkpoint.pt no longer names it. Every rank learns whether rank 0's write
    went through (a full disk there stops them all)."""
    rngs = tr.dist.all_gather_objects(rng_state(tr.gen))
    sharded = f"checkpoint-{tr.prog.step}.dcp" if tr.sharded else None
    if sharded is not None:  # every rank writes its shard
        save_sharded(tr.objective, tr.opt, tr.run.path / sharded, tr.dist)
    tr.dist.main_writes(lambda: write_checkpoint(tr, rngs, sharded))


def write_checkpoint(tr: Trainer, rngs: list[Any], sharded: str | None) -> None:
    """checkpoint.pt itself (rank 0): the weights, or the sharded folder's name, and the rest."""
    weights: dict[str, Any] = {"sharded": sharded}
    if sharded is None:
        weights = {"student": tr.student.state_dict(), "optimizer": tr.opt.state_dict()}
    extra = {"rng_ranks": rngs} if tr.dist.active else {}
    atomic_torch_save(
        tr.run.checkpoint,
        {
            **weights,
            "schedule": tr.sched.state_dict(),
            "progress": asdict(tr.prog),
            "rng": rngs[0],
            "selector": tr.sel.state_dict(),
            **extra,
        },
        parents=False,  # the run folder removed under the run: a fault (sekd/app/faults.py), not a new folder
    )
    if sharded is not None:
        remove_sharded(tr.run.path, keep=sharded)


def resume(tr: Trainer) -> bool:
    """Continue from checkpoint.pt; without one, start clean: the metrics and trace rows of a run
    killed before its first checkpoint are dropped, so every step is logged once."""
    if not tr.run.checkpoint.exists():
        tr.dist.main_writes(lambda: tr.run.truncate_after(0))
        return False
    ck = load_checkpoint(tr.run.checkpoint, sharded=tr.sharded)
    rngs = ck.get("rng_ranks") or []
    if len(rngs) == tr.dist.world_size:
        ck["rng"] = rngs[tr.dist.rank]
    if tr.sharded:
        load_sharded(tr.objective, tr.opt, tr.run.path / ck["sharded"])
    else:
        tr.student.load_state_dict(ck["student"])
        tr.opt.load_state_dict(ck["optimizer"])
    tr.sched.load_state_dict(ck["schedule"])
    tr.prog = Progress(**ck["progress"])
    set_rng_state(ck["rng"], tr.gen)
    tr.sel.load_state_dict(ck["selector"])
    tr.dist.main_writes(lambda: tr.run.truncate_after(tr.prog.step))
    return True


def rng_state(gen: torch.Generator) -> dict[str, Any]:
    """Every RNG state as tensors and plain data, which torch.load(weights_only=True) reads back."""
    state = np.random.get_state()
    if not isinstance(state, tuple):  # legacy=True, the default: the tuple form
        raise TypeError(f"numpy's RNG state came as {type(state).__name__}, not the legacy tuple")
    name, keys, pos, has_gauss, gauss = state
    return {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)],
        "selection": gen.get_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict[str, Any], gen: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    gen.set_state(state["selection"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class CheckpointError(ConfigError):
    """checkpoint.pt cannot be resumed from; one line naming the file and the way out."""


CHECKPOINT_KEYS = ("schedule", "progress", "rng", "selector")
# the weights and optimizer state: in checkpoint.pt (one process, ddp), or in the folder it names (fsdp)
WEIGHT_KEYS = {"replicated": ("student", "optimizer"), "sharded": ("sharded",)}


def load_checkpoint(path: Path, sharded: bool | None = None) -> dict[str, Any]:
    """checkpoint.pt with weights_only=True: tensors and plain data only, so a planted pickle cannot run
    code on resume. A truncated, foreign or unsafe file is refused in one line, and so is one of the other
    form than `sharded` asks for (fsdp's names a torch.distributed.checkpoint folder). Loaded on the CPU: RNG
    states must be CPU tensors, and load_state_dict moves weights and optimizer state to their device."""

    def refuse(why: str) -> CheckpointError:
        return CheckpointError(
            f"{path}: cannot resume from this checkpoint ({why}); delete it, or rerun with "
            "force=true to train this run from scratch"
        )

    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # torch's own message suggests loading it anyway: not here
        raise refuse(
            "UnpicklingError: it holds objects other than tensors and plain data, and loading them could run code"
        ) from None
    except Exception as err:  # RuntimeError (a truncated zip), EOFError, OSError, ...
        first = (str(err).strip().splitlines() or [""])[0].split(". ")[0][:200]  # its first sentence
        raise refuse(f"{type(err).__name__}: {first}") from None
    form = "sharded" if isinstance(ck, dict) and "sharded" in ck else "replicated"
    missing = [k for k in (*WEIGHT_KEYS[form], *CHECKPOINT_KEYS) if not isinstance(ck, dict) or k not in ck]
    if missing:
        raise refuse(f"it holds no {', '.join(missing)}")
    if sharded is not None and sharded != (form == "sharded"):
        written = "train.distributed=fsdp" if form == "sharded" else "an unsharded run (train.distributed=none or ddp)"
        raise refuse(f"it was written by {written}, and this run's train.distributed differs")
    if form == "sharded" and not (Path(path).parent / ck["sharded"]).is_dir():
        raise refuse(f"the sharded folder it names, {ck['sharded']}, is missing")
    return ck
