"""An out of memory outside the training step (sekd/app/faults.py): any stage's is one line naming the memory,
the stage, the peak and that stage's remedy; the trainer's own line (tests/training/test_oom.py) passes as is."""

from __future__ import annotations

import pytest
import torch

from sekd.app.checks import validate
from sekd.app.faults import OutOfMemory, as_fault, fault_line
from sekd.core.errors import RunFault
from sekd.stores.runs import RunDir
from tests.helpers import TINY, compose_cfg

CARD = "CUDA out of memory. Tried to allocate 20.00 MiB. GPU 1 has a total capacity of 79.19 GiB"


def composed(tmp_path):
    tree = compose_cfg([*TINY, f"paths.root={tmp_path / 'root'}", f"paths.cache={tmp_path / 'c'}", "eval.batch_size=8"])
    return validate(tree), RunDir(tree)


def host_error() -> RuntimeError:
    try:
        torch.empty(2**50, dtype=torch.uint8)  # torch's CPU allocator refuses: a real host out of memory
    except RuntimeError as err:
        return err
    raise AssertionError("1 PiB was allocated")


@pytest.mark.parametrize(
    "err,stage,says",
    [
        (
            torch.OutOfMemoryError(CARD),
            "scoring",
            "out of card memory on cuda:1 while scoring (tried to allocate 20.00 MiB, peak RSS ",
        ),
        (
            torch.OutOfMemoryError(CARD),
            "training",
            "out of card memory on cuda:1 while training (tried to allocate 20.00 MiB, peak RSS ",
        ),
        (MemoryError(), "composing the run", "out of host memory while composing the run (peak RSS "),
    ],
)
def test_any_stages_out_of_memory_is_one_line_with_its_peak(tmp_path, err, stage, says):
    cfg, run = composed(tmp_path)
    fault = as_fault(err)
    assert isinstance(fault, OutOfMemory) and fault.err is err
    line = fault_line(fault, cfg, run, stage)
    assert line.startswith(says) and "\n" not in line, line
    assert line.endswith("; re-run the same command: it trains from step 0"), line


def test_each_stage_says_its_remedy(tmp_path):
    cfg, run = composed(tmp_path)
    card, host = as_fault(torch.OutOfMemoryError(CARD)), as_fault(host_error())
    assert isinstance(card, OutOfMemory) and isinstance(host, OutOfMemory) and host.kind == "host"
    assert "; lower eval.batch_size (now 8) or free the card's memory; " in fault_line(card, cfg, run, "scoring")
    assert "; lower eval.batch_size (now 8) or free host memory; " in fault_line(host, cfg, run, "scoring")
    assert "(tried to allocate 1048576.00 GiB, peak RSS " in fault_line(host, cfg, run, "scoring")
    assert (
        "; see `sekd-train <these overrides> --plan --card <its memory>` for what fits, or free the card's memory; "
        in fault_line(card, cfg, run, "training")
    )
    assert "; free host memory or give the job more (resources.mem_gb under Slurm); " in fault_line(
        host, cfg, run, "training"
    )


def test_the_trainers_own_line_passes_as_it_is(tmp_path):
    cfg, run = composed(tmp_path)
    named = RunFault("out of card memory on cuda:0 at step 3, micro-batch 2 of 2 (...): ...; lower ...")
    assert as_fault(named) is named
    assert fault_line(named, cfg, run, "training") == f"{named}; re-run the same command: it trains from step 0"
