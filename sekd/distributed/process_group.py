"""One run over several processes (ranks): the process group and the few collectives training needs.

Everything that can span ranks takes a `Dist` explicitly (no globals), and `Dist.single()` is the
one-process version whose operations are identities, so world size 1 runs the very same code.
Backend: gloo on CPU, nccl on CUDA (LOCAL_RANK mod the visible cards picks the card). Rank 0 alone writes shared files
(`main_writes` tells every rank how the write went).
`broadcast_params` gives every rank rank 0's weights; `GradBuckets` is train.distributed=ddp's gradient sum: DDP's
bucketed, overlapped all-reduce, without its wrapper (docs/method.md §9).
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence, TypeVar, overload

import torch
from torch import Tensor

from sekd.core.errors import EchoedFault, RunFault
from sekd.core.files import storage_error

if TYPE_CHECKING:
    from sekd.distributed.launch import Launch

BACKENDS = {"cpu": "gloo", "cuda": "nccl"}
BUCKET_BYTES = 25 * 2**20  # DDP's default bucket_cap_mb
T = TypeVar("T")
WROTE, FAULT, FAILED = 0, 1, 2  # what rank 0 tells the others after a write only it makes


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
    @overload
    def all_reduce_sum(self, x: Tensor) -> Tensor: ...

    @overload
    def all_reduce_sum(self, x: float) -> float: ...

    def all_reduce_sum(self, x: Tensor | float) -> Tensor | float:
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
        counts = [torch.zeros_like(n) for _ in range(self.world_size)]
        torch.distributed.all_gather(counts, n)
        sizes = [int(s) for s in counts]
        pad = t.new_zeros((max(sizes) - t.shape[0], *t.shape[1:]))
        parts = [t.new_empty((max(sizes), *t.shape[1:])) for _ in range(self.world_size)]
        torch.distributed.all_gather(parts, torch.cat([t, pad]).contiguous())
        return torch.cat([p[:s] for p, s in zip(parts, sizes)])

    def all_gather_others(self, t: Tensor) -> Tensor:
        """`all_gather_cat` where this rank adds no rows (a stand-in micro-batch): the other ranks' rows of `t`."""
        return self.all_gather_cat(t[:0])

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

    def main_writes(self, write: Callable[[], T]) -> T | None:
        """Rank 0 runs `write` (a file only it writes: a checkpoint, metrics, the model) and tells every rank how it
        went, in one small broadcast: a fault there stops every rank at once, rather than leaving the others to
        wait at their next collective (30 minutes; for ever under srun). Rank 0 raises its own error; the others
        an EchoedFault (a run fault) or a RuntimeError (a bug) with its text. Every rank must call it."""
        if not self.active:
            return write()
        outcome = torch.zeros(1, dtype=torch.int32, device=self.device)
        if not self.is_main:
            torch.distributed.broadcast(outcome, src=0)
            if int(outcome.item()) == WROTE:
                return None
            told = self.broadcast_object(None)
            raise (EchoedFault if int(outcome.item()) == FAULT else RuntimeError)(told)
        try:
            out = write()
        except BaseException as err:
            fault = isinstance(err, RunFault) or storage_error(err) is not None
            outcome.fill_(FAULT if fault else FAILED)
            torch.distributed.broadcast(outcome, src=0)
            self.broadcast_object(f"rank 0 stopped: {type(err).__name__}: {err}"[:1000])
            raise
        torch.distributed.broadcast(outcome, src=0)
        return out

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


def init(launch: Launch, device: torch.device | str) -> Dist:
    """Join the process group the launcher set up (`launch`: sekd.distributed.launch.Launch). One process (world
    size 1) starts no group. On CUDA each rank takes card LOCAL_RANK mod the cards it sees."""
    device = torch.device(device)
    if launch.world_size <= 1:
        return Dist.single(device)
    if device.type == "cuda":  # LOCAL_RANK's card among those this task sees (sekd.distributed.launch.card_index)
        from sekd.distributed.launch import card_index

        device = torch.device("cuda", card_index(launch.local_rank, torch.cuda.device_count()))
        torch.cuda.set_device(device)
    backend = BACKENDS.get(device.type)
    if backend is None:
        raise ValueError(f"no torch.distributed backend for device {device}")
    # torchrun's environment as torch reads it (env://: it may point the ranks at the agent's own store);
    # otherwise (Slurm's tasks) the address sekd.distributed.launch derived
    init_method = "env://" if {"MASTER_ADDR", "MASTER_PORT"} <= set(os.environ) else None
    if init_method is None and launch.master_addr is not None and launch.master_port is not None:
        init_method = f"tcp://{launch.master_addr}:{launch.master_port}"
    timeout = datetime.timedelta(minutes=30)
    torch.distributed.init_process_group(
        backend,
        store=group_store(init_method or "env://", launch, timeout),
        rank=launch.rank,
        world_size=launch.world_size,
        timeout=timeout,
        device_id=device if device.type == "cuda" else None,
    )
    return Dist(
        rank=launch.rank,
        world_size=launch.world_size,
        local_rank=launch.local_rank,
        device=device,
        group=torch.distributed.group.WORLD,
    )


_joined = 0  # process groups this process has joined: every rank joins the same ones, in the same order


def group_store(init_method: str, launch: Launch, timeout: datetime.timedelta) -> torch.distributed.PrefixStore:
    """The rendezvous store torch's init_process_group would use, under a prefix of its own for each group
    this process joins. A multirun under torchrun runs its cells one after another in the same ranks,
    each joining a new group (and leaving it): in torchrun's store, which outlives them, a plain re-init
    would find the previous group's keys (its ranks' old addresses) and a late rank would connect there."""
    global _joined
    _joined += 1
    store, _, _ = next(torch.distributed.rendezvous(init_method, launch.rank, launch.world_size, timeout=timeout))
    store.set_timeout(timeout)
    return torch.distributed.PrefixStore(f"sekd/group{_joined}", store)


def broadcast_params(params: list[Tensor], dist: Dist) -> None:
    """Rank 0's values of `params` on every rank. One off the rank's device (the fsdp student, on the CPU
    until it is sharded) goes through the device one parameter at a time: NCCL moves device memory only."""
    if dist.active:
        for p in params:
            if p.device == dist.device:
                torch.distributed.broadcast(p.data, src=0)
            else:
                on_device = p.data.to(dist.device)
                torch.distributed.broadcast(on_device, src=0)
                p.data.copy_(on_device)


class GradBuckets:
    """Σ over ranks of `params`' gradients, as torch's DistributedDataParallel sums them (its math with no_sync
    over the accumulation, and its bucketed, overlapped reduction), for a loop that calls no module's forward.

    One persistent flat buffer per (device, dtype) holds every gradient: `start()` zeroes it and makes each
    parameter's .grad a view of it (autograd then accumulates into it in place, so the micro-batches sum there,
    and no gradient is ever copied or concatenated). The buffer is split into buckets of about `bucket_bytes`,
    the parameters in reverse order (about the order backward produces their gradients). During the last
    micro-batch's backward (after `arm()`), a parameter's post-accumulate-grad hook counts it done; once a
    bucket and every bucket before it are done, their async all-reduces are launched, so communication
    overlaps the rest of the backward. `finish()` launches the remaining ones in order (all of them on a
    rank whose last micro-batch ran no backward, or for parameters that got no gradient in it), and waits:
    every rank issues the same collectives in the same order. A parameter that no rank gave a gradient in
    any micro-batch (the hooks record which did; the flags are summed over ranks) ends with .grad None, as in
    one process."""

    def __init__(self, params: Sequence[Tensor], dist: Dist, bucket_bytes: int = BUCKET_BYTES) -> None:
        self.params, self.dist = list(params), dist
        self.offset: list[int] = [0] * len(self.params)
        self.bucket_of: list[int] = [0] * len(self.params)
        self.buckets: list[tuple[tuple[torch.device, torch.dtype], int, int, int]] = []  # key, start, end, members
        used: dict[tuple[torch.device, torch.dtype], int] = {}
        nbytes = 0
        for i in reversed(range(len(self.params))):
            p = self.params[i]
            key, n = (p.device, p.dtype), p.numel()
            at = used.get(key, 0)
            if not self.buckets or self.buckets[-1][0] != key or nbytes + n * p.element_size() > bucket_bytes:
                self.buckets.append((key, at, at, 0))
                nbytes = 0
            k, start, _, members = self.buckets[-1]
            self.buckets[-1] = (k, start, at + n, members + 1)
            nbytes += n * p.element_size()
            self.offset[i], self.bucket_of[i], used[key] = at, len(self.buckets) - 1, at + n
        self.buffers = {key: torch.zeros(n, dtype=key[1], device=key[0]) for key, n in used.items()}
        self.hooks = [p.register_post_accumulate_grad_hook(self._hook(i)) for i, p in enumerate(self.params)]
        self.touched = [False] * len(self.params)
        self.armed = False
        self.launched_in_backward = 0  # buckets launched from the hooks in the last step (overlapped)
        self._reset()

    def _reset(self) -> None:
        self.pending = [b[3] for b in self.buckets]  # parameters each bucket still waits for
        self.counted = [False] * len(self.params)
        self.next = 0  # the first bucket not launched yet
        self.works: list[Any] = []

    def start(self) -> None:
        """Before an optimizer step's first micro-batch: zeroed buffers, each .grad a view of its place."""
        for buf in self.buffers.values():
            buf.zero_()
        for i, p in enumerate(self.params):
            at = self.offset[i]
            p.grad = self.buffers[(p.device, p.dtype)][at : at + p.numel()].view_as(p)
        self.touched = [False] * len(self.params)
        self.armed = False
        self.launched_in_backward = 0
        self._reset()

    def arm(self) -> None:
        """Before the last micro-batch's backward: from here on a finished bucket is reduced at once."""
        self.armed = True

    def _hook(self, i: int) -> Callable[[Tensor], None]:
        def hook(_: Tensor) -> None:
            self.touched[i] = True
            if self.armed and not self.counted[i]:
                self.counted[i] = True
                b = self.bucket_of[i]
                self.pending[b] -= 1
                before = self.next
                while self.next < len(self.buckets) and self.pending[self.next] == 0:
                    self._launch(self.next)
                self.launched_in_backward += self.next - before

        return hook

    def _launch(self, b: int) -> None:
        (device, dtype), start, end, _ = self.buckets[b]
        view = self.buffers[(device, dtype)][start:end]
        if device == self.dist.device:
            self.works.append(torch.distributed.all_reduce(view, op=torch.distributed.ReduceOp.SUM, async_op=True))
        else:  # a bucket off the rank's device (NCCL moves device memory only): through it, at once
            there = view.to(self.dist.device)
            torch.distributed.all_reduce(there, op=torch.distributed.ReduceOp.SUM)
            view.copy_(there)
        self.next = b + 1

    def finish(self) -> None:
        """After the last micro-batch: the buckets not launched yet, in order; wait for all; then .grad None
        where no rank had a gradient."""
        self.armed = False
        if not self.params:
            return
        while self.next < len(self.buckets):
            self._launch(self.next)
        touched = torch.tensor(self.touched, dtype=torch.float32, device=self.dist.device)
        torch.distributed.all_reduce(touched, op=torch.distributed.ReduceOp.SUM)
        for work in self.works:
            work.wait()
        self.works = []
        for p, had in zip(self.params, touched.tolist()):
            if not had:
                p.grad = None

    def scale(self, factor: float) -> None:
        """Every gradient times `factor`, in place (the one division by the global weight)."""
        for buf in self.buffers.values():
            buf.mul_(factor)

    def remove(self) -> None:
        """The hooks off the parameters."""
        for h in self.hooks:
            h.remove()
        self.hooks = []
