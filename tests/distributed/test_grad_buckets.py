"""train.distributed=ddp's gradient sum (sekd.distributed.process_group.GradBuckets, used by sekd.training.trainer.Trainer): between two
real gloo processes, the Trainer's accumulated gradients are the one-process ones; they live in one persistent
flat buffer (each .grad a view of it, the same memory every step) and the reduction allocates no
gradient-sized tensor (the old path concatenated every gradient into a new one, then cloned each back); with
small buckets, some are all-reduced from the hooks during the last backward (overlapped), while a rank whose
last micro-batch is a stand-in launches them all at the end, in the same order."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch.utils._python_dispatch import TorchDispatchMode

BUCKET_BYTES = 4096  # the tiny student's ~100 KiB of gradients in many buckets


class NewBig(TorchDispatchMode):
    """Counts the ops whose output is a new tensor of at least `numel` elements outside `inside` (the buffers)."""

    def __init__(self, numel: int, inside: list[torch.Tensor]):
        super().__init__()
        self.numel, self.count, self.ops = numel, 0, []
        self.ranges = [(b.data_ptr(), b.data_ptr() + b.numel() * b.element_size()) for b in inside]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.numel() >= self.numel and not self.within(t):
                self.count += 1
                self.ops.append(str(func))
        return out

    def within(self, t: torch.Tensor) -> bool:
        return any(lo <= t.data_ptr() < hi for lo, hi in self.ranges)


def in_buffers(tr) -> bool:
    ranges = [(b.data_ptr(), b.data_ptr() + b.numel() * b.element_size()) for b in tr.buckets.buffers.values()]
    return all(any(lo <= p.grad.data_ptr() < hi for lo, hi in ranges) for p in tr.params if p.grad is not None)


def _rank(rank: int, port: int, out: str) -> None:
    from sekd.distributed.process_group import GradBuckets, init
    from sekd.distributed.launch import Launch
    from sekd.training.batches import StandIn, micro_batches
    from tests.training.test_trainer import trainer

    torch.set_num_threads(1)
    dist = init(Launch(rank=rank, world_size=2, master_addr="127.0.0.1", master_port=port), "cpu")
    tr = trainer(1, 2, n=3, dist=dist)  # global micro-batches [a, b], [c]: rank 1's second is a stand-in
    tr.buckets.remove()
    tr.buckets = GradBuckets(tr.params, dist, bucket_bytes=BUCKET_BYTES)
    buffers = {k: v.data_ptr() for k, v in tr.buckets.buffers.items()}
    shares = []
    stream = micro_batches(tr.data, 1, tr.seed, tr.prog, rank, 2)

    def recorded():
        for idx in stream:
            shares.append(isinstance(idx, StandIn))
            yield idx

    total = sum(p.numel() for p in tr.params)
    got = {"buckets": len(tr.buckets.buckets), "steps": []}
    it = recorded()
    for _ in range(2):
        with NewBig(total, list(tr.buckets.buffers.values())) as big:
            loss = tr.accumulate(it).loss
        got["steps"].append(
            {
                "loss": loss,
                "new_gradient_sized": big.count,
                "ops": big.ops,
                "in_buffers": in_buffers(tr),
                "launched_in_backward": tr.buckets.launched_in_backward,
                "grads": {n: p.grad.tolist() if p.grad is not None else None for n, p in tr.student.named_parameters()},
            }
        )
        tr.opt.step()
        tr.opt.zero_grad(set_to_none=True)
    got["same_buffers"] = buffers == {k: v.data_ptr() for k, v in tr.buckets.buffers.items()}
    got["stand_ins"] = shares
    dist.close()
    Path(out, f"rank{rank}.json").write_text(json.dumps(got))


def test_two_ranks_sum_the_one_process_gradients_in_place(tmp_path):
    from sekd.training.batches import micro_batches
    from tests.training.test_trainer import trainer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank, args=(port, str(tmp_path)), nprocs=2)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]

    one = trainer(2, 2, n=3)
    stream = micro_batches(one.data, 2, one.seed, one.prog)
    for step in range(2):
        loss = one.accumulate(stream).loss
        for got in ranks:
            mine = got["steps"][step]
            assert mine["loss"] == pytest.approx(loss, rel=1e-5)
            for n, p in one.student.named_parameters():
                assert (mine["grads"][n] is None) == (p.grad is None), n
                if p.grad is not None:
                    torch.testing.assert_close(torch.tensor(mine["grads"][n]), p.grad, rtol=1e-4, atol=1e-7)
        one.opt.step()
        one.opt.zero_grad(set_to_none=True)

    assert ranks[0]["buckets"] > 4
    assert ranks[0]["stand_ins"] == [False, False, False, False] and ranks[1]["stand_ins"] == [False, True, False, True]
    for got in ranks:
        assert got["same_buffers"]  # one persistent buffer, not one per step
        for step in got["steps"]:
            assert step["in_buffers"]  # every .grad a view of it
            assert step["new_gradient_sized"] == 0, step["ops"]  # no cat, no gradient-sized copy
    # rank 0's last backward launched buckets as they finished; rank 1 (a stand-in last) launched them at the end
    assert all(s["launched_in_backward"] > 0 for s in ranks[0]["steps"])
    assert all(s["launched_in_backward"] == 0 for s in ranks[1]["steps"])
