"""One run over several processes (ranks): the process group and the few collectives the loop needs.

Everything that can span ranks takes a `Dist` explicitly (no globals), and `Dist.single()` is the
one-process version whose operations are identities, so world size 1 runs the very same code.
Backend: gloo on CPU, nccl on CUDA (LOCAL_RANK picks the card). Rank 0 alone writes shared files.
"""
from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import Tensor

BACKENDS = {"cpu": "gloo", "cuda": "nccl"}


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")  # where this rank computes (cuda:LOCAL_RANK under nccl)
    group: Any = None  # the torch.distributed default group; None for one process

    @staticmethod
    def single(device: torch.device | str = "cpu") -> "Dist":
        return Dist(device=torch.device(device))

    @property
    def is_main(self) -> bool:
        """Rank 0: the only rank that writes the run's shared files."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    # -- collectives (identities for one process) ---------------------------------------------
    def all_reduce_sum(self, x: Tensor | float | int) -> Tensor | float:
        """Σ over ranks. A tensor is summed in place and returned; a number comes back a float."""
        if not self.active:
            return x if isinstance(x, Tensor) else float(x)
        if isinstance(x, Tensor):
            torch.distributed.all_reduce(x, op=torch.distributed.ReduceOp.SUM)
            return x
        t = torch.tensor([float(x)], dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
        return float(t.item())

    def all_gather_cat(self, t: Tensor) -> Tensor:
        """Every rank's `t` concatenated along dim 0 in rank order; lengths may differ between ranks
        (padded to the longest for the collective, then cut back)."""
        if not self.active:
            return t
        n = torch.tensor([t.shape[0]], dtype=torch.long, device=self.device)
        sizes = [torch.zeros_like(n) for _ in range(self.world_size)]
        torch.distributed.all_gather(sizes, n)
        sizes = [int(s) for s in sizes]
        pad = t.new_zeros((max(sizes) - t.shape[0], *t.shape[1:]))
        parts = [t.new_empty((max(sizes), *t.shape[1:])) for _ in range(self.world_size)]
        torch.distributed.all_gather(parts, torch.cat([t, pad]).contiguous())
        return torch.cat([p[:s] for p, s in zip(parts, sizes)])

    def all_gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's picklable `obj`, in rank order."""
        if not self.active:
            return [obj]
        out: list[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank (what it decided, e.g. under a lock only it holds)."""
        if not self.active:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.active:
            torch.distributed.barrier()

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        """Rank 0 runs the block first (building and storing what it makes: a model, scores, a cache);
        the others then run it and find it stored."""
        if self.is_main:
            yield
            self.barrier()
        else:
            self.barrier()
            yield

    def close(self) -> None:
        if self.active and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        self.group = None


def init(launch, device: torch.device | str) -> Dist:
    """Join the process group the launcher set up (`launch`: sekd.launch.Launch). One process (world
    size 1) starts no group. On CUDA each rank takes the card LOCAL_RANK names."""
    device = torch.device(device)
    if launch.world_size <= 1:
        return Dist.single(device)
    if device.type == "cuda":
        device = torch.device("cuda", launch.local_rank)
        torch.cuda.set_device(device)
    backend = BACKENDS.get(device.type)
    if backend is None:
        raise ValueError(f"no torch.distributed backend for device {device}")
    # torchrun's environment as torch reads it (env://: it may point the ranks at the agent's own store);
    # otherwise (Slurm's tasks) the address sekd.launch derived
    init_method = "env://" if {"MASTER_ADDR", "MASTER_PORT"} <= set(os.environ) else None
    if init_method is None and launch.master_addr is not None and launch.master_port is not None:
        init_method = f"tcp://{launch.master_addr}:{launch.master_port}"
    kwargs = {"device_id": device} if device.type == "cuda" else {}
    timeout = datetime.timedelta(minutes=30)
    torch.distributed.init_process_group(backend, store=group_store(init_method or "env://", launch, timeout),
                                         rank=launch.rank, world_size=launch.world_size, timeout=timeout, **kwargs)
    return Dist(rank=launch.rank, world_size=launch.world_size, local_rank=launch.local_rank, device=device,
                group=torch.distributed.group.WORLD)


_joined = 0  # process groups this process has joined: every rank joins the same ones, in the same order


def group_store(init_method: str, launch, timeout: datetime.timedelta):
    """The rendezvous store torch's init_process_group would use, under a prefix of its own for each group
    this process joins. A multirun under torchrun runs its cells one after another in the same ranks,
    each joining a new group (and leaving it): in torchrun's store, which outlives them, a plain re-init
    would find the previous group's keys (its ranks' old addresses) and a late rank would connect there."""
    global _joined
    _joined += 1
    store, _, _ = next(torch.distributed.rendezvous(init_method, launch.rank, launch.world_size, timeout=timeout))
    store.set_timeout(timeout)
    return torch.distributed.PrefixStore(f"sekd/group{_joined}", store)
