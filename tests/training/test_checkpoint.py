"""checkpoint.pt (sekd/training/checkpoint.py): it holds the keys earlier versions wrote, so their checkpoints
still resume, and a step resumed from it ends with the weights of the step never interrupted."""

from __future__ import annotations

import types
from dataclasses import fields

import torch

from sekd.training.batches import micro_batches
from sekd.training.checkpoint import Progress, resume, save_checkpoint
from tests.training.test_trainer import trainer


def run_folder(path):
    return types.SimpleNamespace(path=path, checkpoint=path / "checkpoint.pt", truncate_after=lambda step: None)


def test_a_checkpoint_holds_the_keys_earlier_versions_wrote(tmp_path):
    tr = trainer(2, 1, "gls", "student_entropy")
    tr.run = run_folder(tmp_path)
    tr.step(micro_batches(tr.data, 2, tr.seed, tr.prog))
    save_checkpoint(tr)
    ck = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert list(ck) == ["student", "optimizer", "schedule", "progress", "rng", "selector"]
    assert list(ck["progress"]) == [
        "step",
        "epoch",
        "offset",
        "tokens_seen",
        "tokens_supervised",
        "teacher_tokens",
        "on_policy_batches",
    ]
    assert [f.name for f in fields(Progress)] == list(ck["progress"])
    assert set(ck["rng"]) == {"torch", "python", "numpy", "selection", "cuda"}
    assert "policy" in ck["selector"]  # GLS's queue


def test_a_resumed_step_ends_with_the_weights_of_an_uninterrupted_one(tmp_path):
    through = trainer(2, 2, "gls", "student_entropy")
    stream = micro_batches(through.data, 2, through.seed, through.prog)
    for _ in range(3):
        through.step(stream)

    first = trainer(2, 2, "gls", "student_entropy")
    first.run = run_folder(tmp_path)
    stream = micro_batches(first.data, 2, first.seed, first.prog)
    for _ in range(2):
        first.step(stream)
    save_checkpoint(first)

    again = trainer(2, 2, "gls", "student_entropy")
    again.run = run_folder(tmp_path)
    assert resume(again) and again.prog == first.prog
    again.step(micro_batches(again.data, 2, again.seed, again.prog))
    assert again.prog == through.prog
    for (name, a), b in zip(again.student.state_dict().items(), through.student.state_dict().values()):
        assert torch.equal(a, b), name
