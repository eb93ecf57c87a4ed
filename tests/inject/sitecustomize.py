"""Test-only (tests/test_oom_faults.py): with this folder on PYTHONPATH and SEKD_TEST_OOM set, the CLI runs
as it always does until a card's out of memory, which a CPU cannot make, is raised where a card would raise it:
SEKD_TEST_OOM=step:<n> in the second micro-batch of optimizer step n (1-based), SEKD_TEST_OOM=scoring at
lm-eval's call. SEKD_TEST_HOLD=<folder>:<module>:<function>: before each call of that function the CLI
writes <folder>/held and waits for <folder>/go, so a test acts on the world (fills a disk) at that very
point rather than racing a fast run. SEKD_TEST_VMPEAK=<file>: the process's peak address space (VmPeak, bytes) is written there at
exit, to set a host's memory limit (RLIMIT_AS) above it. Python imports this module at start-up (`site`)."""

from __future__ import annotations

import os

CARD_OOM = (
    "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.19 GiB of which 1.06 GiB "
    "is free. Of the allocated memory 75.31 GiB is allocated by PyTorch, and 1.20 GiB is reserved by PyTorch"
)


def inject(where: str) -> None:
    import torch

    def card_oom(*args, **kwargs):
        raise torch.OutOfMemoryError(CARD_OOM)

    if where == "scoring":
        import sekd.evaluation.score

        sekd.evaluation.score.score_checkpoint = card_oom  # type: ignore[assignment]
        return
    from sekd.training.trainer import Trainer

    step = int(where.removeprefix("step:"))
    real = Trainer.micro_step

    def micro_step(self, idx, answers, counts, *, last):
        if self.prog.step + 1 == step and self.phase == "micro-batch 2 of 2":
            card_oom()
        return real(self, idx, answers, counts, last=last)

    Trainer.micro_step = micro_step  # type: ignore[method-assign]


def write_vm_peak(path: str) -> None:
    with open("/proc/self/status") as status:
        (kib,) = [ln.split()[1] for ln in status if ln.startswith("VmPeak:")]
    with open(path, "w") as out:
        out.write(str(int(kib) * 1024))


def hold(spec: str) -> None:
    import functools
    import importlib
    import time
    from pathlib import Path

    folder, module, name = spec.split(":")
    owner = importlib.import_module(module)
    real = getattr(owner, name)

    @functools.wraps(real)
    def held(*args, **kwargs):
        Path(folder, "held").touch()
        deadline = time.time() + 300
        while not Path(folder, "go").exists():
            assert time.time() < deadline, "the test never said go"
            time.sleep(0.01)
        return real(*args, **kwargs)

    setattr(owner, name, held)


if os.environ.get("SEKD_TEST_VMPEAK"):
    import atexit

    atexit.register(write_vm_peak, os.environ["SEKD_TEST_VMPEAK"])
if os.environ.get("SEKD_TEST_OOM"):
    inject(os.environ["SEKD_TEST_OOM"])
if os.environ.get("SEKD_TEST_HOLD"):
    hold(os.environ["SEKD_TEST_HOLD"])
