"""Out of memory while a run works (docs/bad-inputs.md, "Faults while running"), through the real CLI: a
card's OOM, which a CPU cannot make, is raised where a card raises it by the test-only tests/inject/sitecustomize.py
(in the step's second micro-batch; at lm-eval's call). Each ends in one line and exit status 3, names the step,
the micro-batch, the peak and the remedy, leaves nothing of the failed step, and the same command resumes to
the weights of an uninterrupted run (or only scores)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.helpers import checkpoint_step, injected, logged_steps, sekd_train
from tests.test_faults import RUN, STEPS, fault_line, run_folder, uninterrupted_fault_run, weights

# RUN is on the CPU even where there is a card: a card's OOM is simulated, and CUDA's address space would swamp
# RLIMIT_AS; its uninterrupted run is tests/test_faults.py's, built once a session for both modules


def args(root: Path, cache: Path, hydra: Path, *more: str) -> list[str]:
    return [*RUN, f"paths.root={root}", f"paths.cache={cache}", f"hydra.run.dir={hydra}/hydra", *more]


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """The tiny pair (a copy of the reference's cache), an uninterrupted run's folder (read-only: copy it) and
    weights, and its peak address space (vm_peak, for the host's limit)."""
    built = uninterrupted_fault_run(tmp_path_factory)
    cache = shutil.copytree(built / "cache", tmp_path_factory.mktemp("oom") / "cache")
    return cache, built / "reference", weights(built / "reference"), int((built / "vm_peak").read_text())


def test_a_card_out_of_memory_in_a_step_stops_in_one_line_and_the_rerun_resumes(shared, tmp_path):
    cache, _, want, _ = shared
    root = tmp_path / "root"
    run_args = args(root, cache, tmp_path)
    line = fault_line(sekd_train(run_args, env=injected(SEKD_TEST_OOM="step:3")))
    assert line.startswith(
        "sekd: run fault: out of card memory on cuda:0 at step 3, micro-batch 2 of 2 (train.micro_batch_size=4): "
        "tried to allocate 2.00 GiB, peak RSS "
    ), line
    assert (
        "iB of host memory; lower train.micro_batch_size to 2 with train.grad_accum=4 (the same 8 sequences a "
        "step, in a new run folder from step 0), see `sekd-train <these overrides> --plan --card <its memory>` for "
        "the largest that fits, or free the card's memory; re-run the same command: it resumes from step 2 "
        "(checkpoint.pt)"
    ) in line, line
    assert checkpoint_step(root) == 2 and logged_steps(root) == [1, 2]  # nothing of step 3
    assert [p.name for p in root.rglob("*.tmp")] == []
    assert not (run_folder(root) / "model").exists()
    again = sekd_train(run_args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from step 2" in again.stdout + again.stderr
    assert logged_steps(root) == list(range(1, STEPS + 1))
    got = weights(root)
    assert got.keys() == want.keys() and all((got[k] == want[k]).all() for k in want)


def test_a_card_out_of_memory_while_scoring_names_eval_batch_size_and_the_rerun_only_scores(shared, tmp_path):
    cache, reference, _, _ = shared
    root = tmp_path / "root"
    shutil.copytree(reference, root)  # a trained student: the run goes straight to scoring
    run_args = args(root, cache, tmp_path, "eval=embedded", "eval.limit=2", "eval.batch_size=4")
    line = fault_line(sekd_train(run_args, env=injected(SEKD_TEST_OOM="scoring")))
    assert line.startswith(
        "sekd: run fault: out of card memory on cuda:0 while scoring (tried to allocate 2.00 GiB, peak RSS "
    )
    assert line.endswith(
        "; lower eval.batch_size (now 4) or free the card's memory; re-run the same command: the student is "
        "trained and saved; it only scores"
    ), line
    assert list(root.rglob("eval-embedded-*/record.json")) == [] and [p.name for p in root.rglob("*.tmp")] == []
    assert weights(root).keys() == shared[2].keys()  # the trained student, whole, for the re-run to score


def test_a_host_that_runs_out_of_memory_in_a_step_stops_in_one_line(shared, tmp_path):
    """A real limit (RLIMIT_AS) 512 MiB above the reference run's peak address space, and a step that needs
    about 2 GiB more (dense [64, 2048, 512] logits): torch's CPU allocator refuses, and the trainer names it."""
    cache, _, _, vm_peak = shared
    limit = vm_peak + 512 * 2**20
    big = ["data.seq_len=2048", "train.micro_batch_size=64", "train.grad_accum=1", "train.flow=dense"]
    root = tmp_path / "root"
    line = fault_line(sekd_train(args(root, cache, tmp_path, *big), address_space=limit))
    assert line.startswith(
        "sekd: run fault: out of host memory on cpu at step 1, micro-batch 1 of 1 (train.micro_batch_size=64): "
        "tried to allocate "
    ), line
    assert "iB, peak RSS " in line and line.endswith(
        "iB of host memory; lower train.micro_batch_size to 32 with train.grad_accum=2 (the same 64 sequences a "
        "step, in a new run folder from step 0), or free host memory; re-run the same command: it trains from step 0"
    ), line
    assert checkpoint_step(root) is None and logged_steps(root) == []
    assert [p.name for p in root.rglob("*.tmp")] == []
