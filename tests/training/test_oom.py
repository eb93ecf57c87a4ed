"""A step that runs out of memory (sekd/training/trainer.py), in process: one RunFault naming the step, the
micro-batch, the device, the peak and the remedy; nothing of the failed step saved; the run resumes from the
last checkpoint to the weights of a run that never failed. A card's OOM cannot happen on a CPU: it is raised
from the step (torch.OutOfMemoryError); the host's is a real failed allocation of torch's CPU allocator."""

from __future__ import annotations

import json

import pytest
import torch

from sekd.app.tracking import Tracker
from sekd.config.schema import TrainConfig
from sekd.core.errors import RunFault
from sekd.kd.objective import Selector
from sekd.selection.criteria import forward_kl
from sekd.selection.policies import POLICIES
from sekd.stores.runs import RunDir
from sekd.training.trace import SelectionTrace
from sekd.training.trainer import Trainer, smaller_micro_batch
from tests.helpers import TINY, compose_cfg
from tests.training.test_trainer import packed, tiny_model

V = 64
CARD_OOM = (
    "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.19 GiB of which 1.06 GiB "
    "is free. Of the allocated memory 75.31 GiB is allocated by PyTorch"
)


def oom_trainer(tmp_path, steps: int = 4) -> Trainer:
    """A real run folder (checkpoint.pt, metrics.jsonl, the selection trace of every step), 2 micro-batches of 2
    a step, a checkpoint every step."""
    t = TrainConfig(flow="chunked", lr=1e-3, steps=steps, micro_batch_size=2, grad_accum=2, log_every=1, ckpt_every=1)
    run = RunDir(compose_cfg([*TINY, f"paths.root={tmp_path}"]))
    run.path.mkdir(parents=True, exist_ok=True)
    sel = Selector(signal=None, policy=POLICIES.build("all"), criterion=forward_kl)
    return Trainer(
        student=tiny_model(0),
        teacher=tiny_model(1).eval(),
        data=packed(8),
        selector=sel,
        train_cfg=t,
        vocab=V,
        seed=0,
        run=run,
        tracker=Tracker("disabled", run.path, name="t", config={}, project="p"),
        device=torch.device("cpu"),
        dtype=torch.float32,
        trace=SelectionTrace(run.trace, steps),
    )


def fail_at(tr: Trainer, monkeypatch, step: int, phase: str, raise_it) -> None:
    """The trainer's micro-step (and its gradient clipping, before the optimizer step) raise `raise_it()` at
    `step` (1-based) in `phase`."""
    real_micro, real_clip = tr.micro_step, tr.clip_gradients

    def failing(real):
        def call(*args, **kw):
            if tr.prog.step + 1 == step and tr.phase == phase:
                raise_it()
            return real(*args, **kw)

        return call

    monkeypatch.setattr(tr, "micro_step", failing(real_micro))
    monkeypatch.setattr(tr, "clip_gradients", failing(real_clip))


def logged(tr: Trainer) -> list[int]:
    return [json.loads(ln)["step"] for ln in tr.run.metrics.read_text().splitlines()]


def traced(tr: Trainer) -> list[str]:
    return tr.run.trace.read_text().splitlines()


def saved_step(tr: Trainer) -> int:
    return int(torch.load(tr.run.checkpoint, weights_only=True)["progress"]["step"])


def card_oom() -> None:
    raise torch.OutOfMemoryError(CARD_OOM)


def test_a_card_out_of_memory_names_the_step_the_micro_batch_and_the_remedy_and_saves_nothing(tmp_path, monkeypatch):
    reference = oom_trainer(tmp_path / "reference")
    reference.fit()
    tr = oom_trainer(tmp_path / "faulted")
    fail_at(tr, monkeypatch, 3, "micro-batch 2 of 2", card_oom)
    with pytest.raises(RunFault) as err:
        tr.fit()
    line = str(err.value)
    assert line.startswith(
        "out of card memory on cuda:0 at step 3, micro-batch 2 of 2 (train.micro_batch_size=2): "
        "tried to allocate 2.00 GiB, peak RSS "
    ), line
    assert line.endswith(
        "; lower train.micro_batch_size to 1 with train.grad_accum=4 (the same 4 sequences a step, in a new run "
        "folder from step 0), see `sekd-train <these overrides> --plan --card <its memory>` for the largest that "
        "fits, or free the card's memory"
    ), line
    assert "\n" not in line and isinstance(err.value.__cause__, torch.OutOfMemoryError)
    assert saved_step(tr) == 2 and logged(tr) == [1, 2]  # nothing of step 3
    assert traced(tr) == [r for r in traced(reference) if json.loads(r)["step"] < 2]  # micro-batch 1's rows gone
    assert [p.name for p in tr.run.path.rglob("*.tmp")] == []
    monkeypatch.undo()
    again = oom_trainer(tmp_path / "faulted")  # the same command, run again: from step 2 to the end
    again.fit()
    assert logged(again) == [1, 2, 3, 4] and traced(again) == traced(reference)
    want = reference.student.state_dict()
    assert all(torch.equal(v, want[k]) for k, v in again.student.state_dict().items())


def test_the_optimizer_step_and_the_host_allocator_are_named_too(tmp_path, monkeypatch):
    """AdamW makes its state on the first optimizer step; torch's CPU allocator refusing a real allocation is
    host memory (a 1 PiB tensor: no machine has it)."""
    tr = oom_trainer(tmp_path / "a")
    fail_at(tr, monkeypatch, 1, "the optimizer step", card_oom)
    with pytest.raises(RunFault, match="^out of card memory on cuda:0 at step 1, the optimizer step "):
        tr.fit()
    assert not tr.run.checkpoint.exists() and not tr.run.metrics.exists()
    tr = oom_trainer(tmp_path / "b")
    fail_at(tr, monkeypatch, 2, "micro-batch 1 of 2", lambda: torch.empty(2**50, dtype=torch.uint8))
    with pytest.raises(RunFault) as err:
        tr.fit()
    assert str(err.value).startswith(
        "out of host memory on cpu at step 2, micro-batch 1 of 2 (train.micro_batch_size=2): "
        "tried to allocate 1048576.00 GiB, peak RSS "
    ), err.value
    assert str(err.value).endswith(
        "(the same 4 sequences a step, in a new run folder from step 0), or free host memory"
    )
    assert saved_step(tr) == 1 and logged(tr) == [1]


def test_other_errors_of_the_step_stay_bugs_with_their_traceback(tmp_path, monkeypatch):
    tr = oom_trainer(tmp_path)

    def bug() -> None:
        raise RuntimeError("shape mismatch")

    fail_at(tr, monkeypatch, 1, "micro-batch 1 of 2", bug)
    with pytest.raises(RuntimeError, match="^shape mismatch$"):
        tr.fit()


@pytest.mark.parametrize(
    "micro,accum,world,says",
    [
        (8, 2, 1, "lower train.micro_batch_size to 4 with train.grad_accum=4 (the same 16 sequences a step,"),
        (6, 1, 2, "lower train.micro_batch_size to 3 with train.grad_accum=2 (the same 12 sequences a step,"),
        (5, 2, 1, "lower train.micro_batch_size to 1 with train.grad_accum=10 (the same 10 sequences a step,"),
        (1, 4, 1, "train.micro_batch_size is 1 already: shorten data.seq_len, see `sekd-train"),
    ],
)
def test_the_smaller_micro_batch_keeps_the_effective_batch(micro, accum, world, says):
    t = TrainConfig(micro_batch_size=micro, grad_accum=accum)
    assert smaller_micro_batch(t, world, "card").startswith(says)
