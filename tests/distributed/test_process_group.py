"""sekd.distributed.process_group's Dist.main_writes between two real gloo processes: rank 0 writes, every rank
learns how it went (and likewise for the sample scores rank 0 stores); one process runs the write as it is."""

from __future__ import annotations

import errno
import json
import socket
from pathlib import Path

import pytest

from sekd.core.errors import EchoedFault, RunFault
from sekd.distributed.process_group import Dist


def _outcomes(rank: int, port: int, out: str) -> None:
    import torch

    from sekd.distributed.launch import Launch
    from sekd.distributed.process_group import init

    torch.set_num_threads(1)
    dist = init(Launch(rank=rank, world_size=2, master_addr="127.0.0.1", master_port=port), "cpu")
    got: list = [dist.main_writes(lambda: "written")]

    def full() -> None:
        raise OSError(errno.ENOSPC, "No space left on device", f"{out}/checkpoint.pt")

    from sekd.stores.sample_importance import main_saves

    for call, write in ((dist.main_writes, full), (dist.main_writes, lambda: int("not a number")), (main_saves, full)):
        try:
            call(dist, write) if call is main_saves else call(write)
            got.append(None)
        except BaseException as err:
            got.append([type(err).__name__, str(err), getattr(err, "quiet", False)])
    dist.close()
    Path(out, f"rank{rank}.json").write_text(json.dumps(got))


def test_every_rank_learns_how_rank_0s_write_went(tmp_path):
    """A write that went through: its value on rank 0, None on the others. A storage fault: rank 0 raises its
    own error, rank 1 a quiet run fault with its text (both exit 3; rank 0 alone prints). A bug: rank 1 a
    RuntimeError. Neither rank waits at a later collective for the other."""
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_outcomes, args=(port, str(tmp_path)), nprocs=2, join=True)
    zero, one = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    full = f"[Errno 28] No space left on device: '{tmp_path}/checkpoint.pt'"
    assert zero == ["written", ["OSError", full, False], ["ValueError", zero[2][1], False], ["OSError", full, False]]
    assert one == [
        None,
        ["EchoedFault", f"rank 0 stopped: OSError: {full}", True],
        ["RuntimeError", f"rank 0 stopped: ValueError: {zero[2][1]}", False],
        ["EchoedFault", f"rank 0 stopped: {full}", True],  # the sample scores' store (stores/sample_importance.py)
    ]


def test_one_process_runs_the_write_as_it_is():
    dist = Dist.single()
    assert dist.main_writes(lambda: 7) == 7
    with pytest.raises(OSError):
        dist.main_writes(lambda: open("/nonexistent/folder/file", "w"))
    assert issubclass(EchoedFault, RunFault) and EchoedFault.quiet
