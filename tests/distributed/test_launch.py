"""sekd.distributed.launch reads a process's place in a run from the environment its launcher gives it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from sekd.core.errors import ConfigError
from sekd.distributed.launch import PORT_BASE, PORT_SPAN, Launch, card_index, first_host, from_env, job_port


def test_torchrun_environment():
    env = {
        "RANK": "3",
        "WORLD_SIZE": "4",
        "LOCAL_RANK": "1",
        "MASTER_ADDR": "node7",
        "MASTER_PORT": "29500",
        "SLURM_NTASKS": "8",
        "SLURM_PROCID": "5",
    }  # torchrun inside a Slurm allocation: torchrun's wins
    assert from_env(env) == Launch(rank=3, world_size=4, local_rank=1, master_addr="node7", master_port=29500)


def slurm_env(procid: int, **extra) -> dict:
    """What srun gives task `procid` of a 2-task, one-node job 4242 (submitit's jobs are srun steps)."""
    return {
        "SLURM_JOB_ID": "4242",
        "SLURM_NTASKS": "2",
        "SLURM_PROCID": str(procid),
        "SLURM_STEP_ID": "0",
        "SLURM_LOCALID": str(procid),
        "SLURM_JOB_NODELIST": "gpu[07-08]",
        "SLURM_JOB_NUM_NODES": "2",
        "PATH": "",
        **extra,
    }  # no scontrol on PATH: the list is read directly


@pytest.mark.parametrize("procid", [0, 1])
def test_slurm_two_tasks_agree_on_the_master(procid):
    got = from_env(slurm_env(procid))
    assert (got.rank, got.world_size, got.local_rank) == (procid, 2, procid)
    assert got.master_addr == "gpu07" and got.master_port == job_port("4242") == PORT_BASE + 4242 % PORT_SPAN
    given = from_env(slurm_env(procid, MASTER_ADDR="login1", MASTER_PORT="29400"))  # set by hand: they win
    assert (given.master_addr, given.master_port) == ("login1", 29400)


def test_single_process_when_no_launcher_or_one_slurm_task():
    assert from_env({}) == Launch() and not Launch().distributed
    one_task = {"SLURM_JOB_ID": "9", "SLURM_NTASKS": "1", "SLURM_PROCID": "0", "SLURM_JOB_NODELIST": "cpu1"}
    assert from_env(one_task) == Launch()  # every one-GPU job of before
    assert from_env({"SLURM_NTASKS": "2"}) == Launch()  # an allocation's shell (salloc), not one of its tasks
    batch_script = {k: v for k, v in slurm_env(0).items() if k != "SLURM_STEP_ID"}  # sbatch -n 2, no srun
    assert from_env(batch_script) == Launch()


def test_job_ports_are_in_a_safe_range_and_differ_for_neighbouring_jobs():
    ports = [job_port(str(j)) for j in range(1000, 1000 + PORT_SPAN)]
    assert len(set(ports)) == PORT_SPAN and PORT_BASE >= 1024 and PORT_BASE + PORT_SPAN <= 32768
    assert job_port("123_4") == job_port("1234")  # an array task's display id still gives a number


@pytest.mark.parametrize(
    "nodelist,host",
    [("gpu[03-04,07],cpu1", "gpu03"), ("node1,node2", "node1"), ("a-[9-10]", "a-9"), ("solo", "solo"), ("", None)],
)
def test_first_host_of_a_node_list_without_slurm(nodelist, host, monkeypatch):
    monkeypatch.setenv("PATH", "")
    assert first_host(nodelist) == host


@pytest.mark.skipif(not shutil.which("scontrol"), reason="Slurm's scontrol is not installed")
def test_first_host_agrees_with_scontrol():
    assert first_host("gpu[03-04,07],cpu1") == "gpu03"


@pytest.mark.parametrize(
    "env,key",
    [
        ({"RANK": "x", "WORLD_SIZE": "2"}, "RANK"),
        ({"RANK": "0"} | {"WORLD_SIZE": ""}, "WORLD_SIZE"),
        (slurm_env(0, SLURM_PROCID="zero"), "SLURM_PROCID"),
    ],
)
def test_a_bad_launcher_variable_is_one_line_naming_it(env, key):
    with pytest.raises(ConfigError, match=f"environment variable {key}") as e:
        from_env(env)
    assert "\n" not in str(e.value)


def test_from_env_reads_the_process_environment_by_default():
    code = "from sekd.distributed.launch import from_env; l = from_env(); print(l.rank, l.world_size, l.local_rank)"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE", "LOCAL_RANK"))}
    env.update(RANK="1", WORLD_SIZE="2", LOCAL_RANK="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="29511")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.split() == ["1", "2", "1"]


@pytest.mark.parametrize(
    "env,visible,card",
    [
        ({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "3"}, 8, 3),  # torchrun: every card of the node visible
        (slurm_env(1), 2, 1),  # srun --gpus-per-node=2: both cards visible to both tasks
        (slurm_env(1), 1, 0),  # srun --gpus-per-task=1 / --gpu-bind: task 1 sees only its own card, as cuda:0
        (slurm_env(0), 1, 0),
    ],
)
def test_each_rank_takes_a_card_it_can_see(env, visible, card):
    assert card_index(from_env(env).local_rank, visible) == card


def test_a_rank_that_sees_no_card_is_one_line():
    with pytest.raises(ConfigError, match="sees none") as e:
        card_index(0, 0)
    assert "\n" not in str(e.value)


def test_a_run_fault_reaches_torchruns_summary_through_the_error_file(tmp_path):
    """torchrun's own reader of a rank's error file (what its ChildFailedError block prints) finds the line as
    the failure's traceback; without the file's variable, nothing is written."""
    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

    from sekd.distributed.launch import tell_launcher

    line = "sekd: run fault: /runs/x/checkpoint.pt: no space left on device; free space on that disk"
    tell_launcher(line, {"TORCHELASTIC_ERROR_FILE": str(tmp_path / "error.json")})
    failure = ProcessFailure(local_rank=0, pid=1, exitcode=3, error_file=str(tmp_path / "error.json"))
    assert line in str(failure.message) and failure.timestamp > 0
    tell_launcher(line, {})
    tell_launcher(line, {"TORCHELASTIC_ERROR_FILE": str(tmp_path / "gone" / "error.json")})  # unwritable: left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["error.json"]
