"""Faults of the Slurm path, on the real one-node cluster: the controller (slurmctld) stopped for real before
a sweep submits and while it waits for its jobs, and a sweep with one failing cell. Each ends in one line
per fault (the controller's: exit 3, which cells are done, submitted with their job ids, not submitted), the
controller is started again whatever happens, and re-running the same command finishes every cell."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import ROOT, sekd_train, tiny_cache
from tests.test_slurm import CONTROLLER_PID, OFFLINE, SMOKE, submitted_jobs

# the controller may be silent 15 s (its clients give up after about 10 s), asked every second, before the sweep gives up (default 120 s, 10 s)
QUICK = {**OFFLINE, "SEKD_SLURM_TIMEOUT_S": "15", "SEKD_SLURM_POLL_S": "1"}


@pytest.fixture(scope="module")
def cluster(slurm_cluster):
    """The session's one cluster (tests/conftest.slurm_cluster, shared with tests/test_slurm.py: named `cluster`,
    so tests/conftest.py runs these tests in the slurm unit); the jobs submitted here are cancelled at the end."""
    first = len(slurm_cluster.roots)
    yield slurm_cluster
    slurm_cluster.cancel(slurm_cluster.roots[first:])


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tiny_cache(tmp_path_factory, tmp_path_factory.mktemp("slurm-faults") / "cache")


def args(root: Path, cache: Path, *overrides: str) -> list[str]:
    return [*SMOKE, f"paths.root={root}", f"paths.cache={cache}", *overrides]


def records(root: Path) -> dict[Path, dict]:
    return {p: json.loads(p.read_text()) for p in sorted(root.glob("runs/*/eval-*/record.json"))}


def fault_line(stderr: str) -> str:
    """The sweep's one line; nothing else it printed is a traceback."""
    assert "Traceback" not in stderr, stderr[-3000:]
    [line] = [ln for ln in stderr.replace("\r", "\n").splitlines() if ln.startswith("sekd: run fault: ")]
    return line


def test_a_controller_stopped_before_submission_is_one_line_and_submits_nothing(cluster, cache, tmp_path):
    cluster.roots.append(tmp_path)
    with cluster.controller_stopped():
        tic = time.monotonic()
        res = sekd_train(args(tmp_path, cache), env=QUICK, timeout=120)
        took = time.monotonic() - tic
    assert res.returncode == 3, res.stderr[-3000:]
    line = fault_line(res.stderr)
    assert re.search(
        r"the Slurm controller does not answer \(sbatch after \d+s: .*Unable to contact slurm controller", line
    )
    assert "0 cells done, 0 submitted (no job ids) still in Slurm's hands, 2 not submitted" in line
    assert "start the controller (or wait for it) and re-run the same sweep" in line
    assert took < 60, took  # sbatch's own retries (about 10 s here), then the line
    assert not records(tmp_path) and not submitted_jobs(tmp_path)
    # nothing was submitted: the re-run is a first run (the re-run after a fault mid-sweep is tested below)


def test_a_hung_controller_at_submission_is_cut_off_at_the_bound_in_one_line(cluster, cache, tmp_path):
    cluster.roots.append(tmp_path)
    pid = int(CONTROLLER_PID.read_text())
    os.kill(pid, signal.SIGSTOP)  # it takes connections and never answers: sbatch waits on it
    try:
        tic = time.monotonic()
        res = sekd_train(args(tmp_path, cache), env={**QUICK, "SEKD_SLURM_TIMEOUT_S": "4"}, timeout=120)
        took = time.monotonic() - tic
    finally:
        os.kill(pid, signal.SIGCONT)
    assert res.returncode == 3, res.stderr[-3000:]
    line = fault_line(res.stderr)
    assert re.search(r"the Slurm controller does not answer \(squeue after [4-9]s: no answer within \ds\)", line), line
    assert "0 cells done, 0 submitted (no job ids) still in Slurm's hands, 2 not submitted" in line
    assert took < 30, took  # the bound, 4 s, cut the hung sbatch off (Slurm's own give-up is later)
    assert not [p for p in Path("/proc").glob("[0-9]*/comm") if read(p) == "sbatch"]  # killed, not left behind
    # the controller may still take the request it read before it stopped: that job is no test's to keep
    time.sleep(2)
    queued = subprocess.run(["squeue", "-h", "-o", "%F|%o"], capture_output=True, text=True, timeout=30).stdout
    ghosts = {ln.split("|")[0] for ln in queued.splitlines() if str(tmp_path) in ln}
    if ghosts:
        subprocess.run(["scancel", *ghosts], capture_output=True, timeout=30)


def read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def test_a_controller_stopped_while_the_sweep_waits_names_each_cells_state_and_the_rerun_finishes(
    cluster, cache, tmp_path
):
    cluster.roots.append(tmp_path)
    # one cell at a time: the second waits in the queue, where only the controller can start it
    command = [sys.executable, "-m", "sekd.train", *args(tmp_path, cache, "resources.array_parallelism=1")]
    with open(tmp_path / "sweep.err", "w+") as err:
        sweep = subprocess.Popen(command, cwd=ROOT, env={**os.environ, **QUICK}, stdout=subprocess.DEVNULL, stderr=err)
        try:
            deadline = time.monotonic() + 120
            while not submitted_jobs(tmp_path):
                assert sweep.poll() is None and time.monotonic() < deadline, "the sweep submitted nothing"
                time.sleep(0.1)
            with cluster.controller_stopped():
                tic = time.monotonic()
                code = sweep.wait(timeout=90)
                took = time.monotonic() - tic
        finally:
            if sweep.poll() is None:
                sweep.kill()
        err.seek(0)
        stderr = err.read()
    assert code == 3, stderr[-3000:]
    line = fault_line(stderr)
    [job] = submitted_jobs(tmp_path)
    assert re.search(
        r"the Slurm controller does not answer \(squeue after \d+s: .*Unable to contact slurm controller", line
    )
    states = re.search(
        r"(\d) cells done, (\d) submitted \(job ids ([\d_ ]+)\) still in Slurm's hands, 0 not submitted", line
    )
    assert states, line
    done, held, ids = int(states[1]), int(states[2]), states[3].split()
    assert done + held == 2 and held >= 1 and all(i.startswith(f"{job}_") for i in ids) and len(ids) == held, (
        line,
        job,
    )
    assert len(records(tmp_path)) == done
    assert took < 60, took  # 15 s of silence, then the line

    again = sekd_train(args(tmp_path, cache, "resources.array_parallelism=1"), env=QUICK, timeout=240)
    assert again.returncode == 0, again.stderr[-3000:]
    assert re.search(r"2 cells: \d already finished, \d to run", again.stdout)  # a cell may have ended meanwhile
    assert sorted(r["preset"] for r in records(tmp_path).values()) == ["full_kd", "se_kd"]
    cluster.settle(tmp_path)


def test_a_failing_cell_on_slurm_lets_the_other_finish_and_says_why_in_one_line(cluster, cache, tmp_path):
    cluster.roots.append(tmp_path)
    good, bad = tmp_path / "good.jsonl", tmp_path / "bad.jsonl"
    lines = [
        json.dumps({"text": f"Sentence number {i} says that the cat sat on mat {i % 7} today."}) for i in range(120)
    ]
    good.write_text("\n".join(lines) + "\n")
    bad.write_text(lines[0] + "\n")  # well-formed, but shorter than one sequence: the job fails while packing
    sweep = args(tmp_path / "out", cache, "experiment=full_kd", "data=jsonl", f"data.train_file={bad},{good}")
    res = sekd_train(sweep, env=QUICK, timeout=240)
    assert res.returncode == 1, res.stderr[-3000:]
    assert "Traceback" not in res.stderr
    failed = [ln for ln in res.stderr.splitlines() if ln.startswith("sekd: cell failed ")]
    assert len(failed) == 1 and f"data.train_file={bad}]: " in failed[0], res.stderr[-3000:]
    assert "data source 'jsonl' split 'train' holds fewer than 65 tokens" in failed[0]
    assert "1 of 2 cells failed; the others' records are written" in res.stderr
    [rec] = records(tmp_path / "out").values()
    assert rec["config"]["data"]["train_file"] == str(good) and rec["slurm_job_id"]
