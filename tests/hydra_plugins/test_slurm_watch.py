"""hydra_plugins/sekd_sweeper/slurm_watch.py and the sweeper's cell states, without a cluster: Slurm's
errors in a few words, a failed submission that names a silent controller, the watch waking a sweep's main
thread out of its wait, submitit's job folders, and a failed cell's cause in one line."""

from __future__ import annotations

import errno
import time

import pytest
from submitit.core.utils import FailedJobError

from hydra_plugins.sekd_sweeper.sekd_sweeper import job_folders, why_failed
from hydra_plugins.sekd_sweeper import slurm_watch
from hydra_plugins.sekd_sweeper.slurm_watch import few_words, setting, submission_silence
from sekd.core.errors import ConfigError, RunFault


def test_slurm_errors_come_out_in_a_few_words():
    said = "sbatch: error: Batch job submission failed: Unable to contact slurm controller (connect failure)\n"
    assert few_words(said) == "Batch job submission failed: Unable to contact slurm controller (connect failure)"
    assert few_words("slurm_load_jobs error: Socket timed out on send/recv operation") == (
        "Socket timed out on send/recv operation"
    )
    assert few_words("") == "no answer"


def test_a_submission_fails_for_the_controller_only_when_sbatch_says_so():
    silent = FailedJobError("sbatch: error: Batch job submission failed: Unable to contact slurm controller")
    assert str(submission_silence(silent, 9.4)) == (
        "sbatch after 9s: Batch job submission failed: Unable to contact slurm controller"
    )
    assert submission_silence(FailedJobError("sbatch: error: invalid partition specified: gpu"), 1) is None
    assert submission_silence(RuntimeError("Unable to contact slurm controller"), 1) is None  # not sbatch's


def test_the_bounds_come_from_the_environment_with_sane_defaults(monkeypatch):
    monkeypatch.setenv("SEKD_SLURM_TIMEOUT_S", "30")
    assert setting("SEKD_SLURM_TIMEOUT_S", 120) == 30
    for bad in ("soon", "0", "-5"):
        monkeypatch.setenv("SEKD_SLURM_TIMEOUT_S", bad)
        assert setting("SEKD_SLURM_TIMEOUT_S", 120) == 120


def test_the_watch_wakes_a_waiting_sweep_when_no_controller_answers(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no Slurm client at all: nothing answers
    tic = time.monotonic()
    # both through the module, now: Hydra's plugin scan, run by any test before, executes it again
    with pytest.raises(slurm_watch.ControllerSilent, match=r"squeue after \ds: squeue: No such file"):
        with slurm_watch.ControllerWatch(timeout_s=1, poll_s=0.2):
            time.sleep(30)  # submitit's wait for results
    assert time.monotonic() - tic < 10


def test_job_folders_map_array_tasks_to_their_cells(tmp_path):
    for name in ("121", "121_0", "121_1", "130", "9f2c.pkl"):
        (tmp_path / name).mkdir()
    assert job_folders(tmp_path) == {"121_0": 0, "121_1": 1, "130": 0}  # 121 is the array's own folder
    assert job_folders(tmp_path / "none") == {} and job_folders(None) == {}


def test_a_failed_cell_is_one_line_naming_its_cause():
    assert why_failed(ConfigError("train.lr=-1: must be > 0")) == "config error: train.lr=-1: must be > 0"
    assert why_failed(RunFault("the teacher cache is gone")) == "run fault: the teacher cache is gone"
    full = OSError(errno.ENOSPC, "No space left on device", "/scratch/run/checkpoint.pt.tmp")
    assert why_failed(full) == "run fault: /scratch/run/checkpoint.pt.tmp: no space left on device"
    assert why_failed(RuntimeError("boom\nTraceback (most recent call last):\n...")) == "RuntimeError: boom"
