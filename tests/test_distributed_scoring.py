"""Scoring after a run over two ranks (torchrun, gloo on CPU): rank 0 scores alone, in a world of one.

torchrun leaves RANK / WORLD_SIZE / LOCAL_RANK / MASTER_* in every rank's environment. lm-eval's
`Accelerator()` reads them: after the ranks have closed their group, it would open a fresh one of
WORLD_SIZE ranks (rank 1 has exited) and wait at its first collective. sekd scores inside
`sekd.distributed.launch.one_process`, so lm-eval sees one process, and the scores are those of the same weights
scored by a plain process.
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from sekd.distributed.launch import LAUNCH_VARIABLES, one_process
from tests.test_distributed import run_of, two_ranks


@pytest.mark.xdist_group("ddp")  # the 2-rank full_kd run of tests/test_distributed.py, built once a session
def test_scoring_after_two_ranks_sees_one_process_and_scores_the_weights_as_one_process(tmp_path_factory, tmp_path):
    try:
        root = two_ranks(tmp_path_factory, "full_kd")  # torchrun, full_kd, eval=embedded, eval.limit=8
    except subprocess.TimeoutExpired:
        pytest.fail("the 2-rank run with scoring on did not finish: lm-eval waited for ranks that had exited")
    run = run_of(root, "full_kd")
    (record_path,) = run.glob("eval-*/record.json")
    record = json.loads(record_path.read_text())
    raw = json.loads((record_path.parent / "lm_eval" / "results.json").read_text())
    assert raw["sekd"]["eval_world_size"] == 1

    from sekd.evaluation.score import score_checkpoint

    again = score_checkpoint(
        run / "model",
        tmp_path / "again",
        suite="embedded",
        split="test",
        artifacts_dir=tmp_path / "cache" / "eval",
        batch_size=16,
        limit=8,
        device="cpu",
        seed=42,
    )
    assert record["metrics"] == again


def test_one_process_hides_the_launch_variables_and_restores_them(monkeypatch):
    from sekd.distributed.launch import from_env

    for key, value in {
        "RANK": "1",
        "WORLD_SIZE": "2",
        "LOCAL_RANK": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "29511",
        "SLURM_NTASKS": "2",
        "SLURM_PROCID": "1",
        "SLURM_STEP_ID": "0",
    }.items():
        monkeypatch.setenv(key, value)
    assert from_env().world_size == 2
    with one_process():
        assert from_env().world_size == 1
        assert not set(LAUNCH_VARIABLES) & set(os.environ)
    assert os.environ["RANK"] == "1" and os.environ["SLURM_STEP_ID"] == "0" and from_env().world_size == 2
