"""hydra/sweeper=sekd on the in-process launcher: every cell is validated before any runs, finished
cells are skipped (a finished sweep does nothing and says so), one failing cell keeps the others'
records, and a trained student is re-scored by another eval config without training again."""

from __future__ import annotations

import json
import time
from pathlib import Path

from tests.helpers import TINY, descendants, sekd_train, sekd_train_killed

OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
FAST = [*TINY, "train.steps=2", "eval.limit=16"]


def multirun(root: Path, *overrides: str):
    return sekd_train(["-m", *FAST, f"paths.root={root}", *overrides], env=OFFLINE, timeout=300)


def records(root: Path) -> dict[Path, dict]:
    return {p: json.loads(p.read_text()) for p in sorted(root.glob("runs/*/eval-*/record.json"))}


def test_one_invalid_cell_stops_the_sweep_before_anything_runs(tmp_path):
    res = multirun(tmp_path, "experiment=full_kd,se_kd", "position.k=0.2,1.5")
    assert res.returncode == 2
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("sekd: config error:")]
    assert len(errors) == 2 and all("position.k=1.5" in ln for ln in errors), res.stderr[-2000:]
    assert "2 of 4 cells are invalid; nothing was submitted" in res.stderr
    assert not (tmp_path / "runs").exists() and not (tmp_path / "hydra").exists()


def test_a_failing_cell_keeps_the_other_records_and_a_rerun_retries_only_it(tmp_path):
    good, bad = tmp_path / "good.jsonl", tmp_path / "bad.jsonl"
    lines = [
        json.dumps({"text": f"Sentence number {i} says that the cat sat on mat {i % 7} today."}) for i in range(120)
    ]
    good.write_text("\n".join(lines) + "\n")
    # well-formed (validation reads every line of a data file) but shorter than one sequence: fails while packing
    bad.write_text(lines[0] + "\n")
    root = tmp_path / "out"
    first = multirun(root, "experiment=full_kd", "data=jsonl", f"data.train_file={bad},{good}")
    assert first.returncode == 1
    assert "1 of 2 cells failed; the others' records are written" in first.stderr
    assert "data source 'jsonl' split 'train' holds fewer than 65 tokens" in first.stderr
    [(path, rec)] = records(root).items()
    kept = path.read_bytes()
    assert rec["config"]["data"]["train_file"] == str(good) and rec["steps"] == 2

    bad.write_text("\n".join(lines) + "\n")  # the user fixes the file
    second = multirun(root, "experiment=full_kd", "data=jsonl", f"data.train_file={bad},{good}")
    assert second.returncode == 0, second.stderr[-2000:]
    assert "2 cells: 1 already finished, 1 to run" in second.stdout
    assert len(records(root)) == 2 and path.read_bytes() == kept  # the finished cell was not redone


def test_a_finished_sweep_does_nothing_and_another_eval_rescores_without_training(tmp_path):
    first = multirun(tmp_path, "experiment=full_kd,se_kd")
    assert first.returncode == 0, first.stderr[-2000:]
    done = records(tmp_path)
    assert len(done) == 2
    sweeps = sorted((tmp_path / "hydra").iterdir())
    models = {p: p.read_bytes() for p in tmp_path.glob("runs/*/model/*.safetensors")}
    stats = {p: p.read_bytes() for p in tmp_path.glob("runs/*/train_stats.json")}
    assert len(models) == 2 and len(stats) == 2

    again = multirun(tmp_path, "experiment=full_kd,se_kd")
    assert again.returncode == 0 and "nothing to do" in again.stdout
    assert "2 cells: 2 already finished, 0 to run" in again.stdout
    assert sorted((tmp_path / "hydra").iterdir()) == sweeps  # no new sweep folder, no job
    assert records(tmp_path) == done

    valid = multirun(tmp_path, "experiment=full_kd,se_kd", "eval.split=validation")
    assert valid.returncode == 0, valid.stderr[-2000:]
    assert "distill" not in valid.stderr  # no training progress bar: the students were reused
    both = records(tmp_path)
    assert len(both) == 4 and len(list(tmp_path.glob("runs/*"))) == 2  # one folder per trained student
    assert {p: p.read_bytes() for p in tmp_path.glob("runs/*/model/*.safetensors")} == models
    assert {p: p.read_bytes() for p in tmp_path.glob("runs/*/train_stats.json")} == stats
    by_split = {}
    for r in both.values():
        by_split.setdefault(r["config"]["eval"]["split"], []).append(r)
    assert sorted(by_split) == ["test", "validation"]
    assert {r["run_dir"] for r in by_split["test"]} == {r["run_dir"] for r in by_split["validation"]}
    assert {r["config_hash"] for r in by_split["test"]}.isdisjoint(r["config_hash"] for r in by_split["validation"])


def test_stage_score_before_training_is_refused_and_train_then_score_gives_the_record(tmp_path):
    early = multirun(tmp_path, "experiment=se_kd", "stage=score")
    assert early.returncode == 2 and "holds no trained student yet" in early.stderr
    assert "nothing was submitted" in early.stderr
    trained = multirun(tmp_path, "experiment=se_kd", "stage=train")
    assert trained.returncode == 0, trained.stderr[-2000:]
    assert list(tmp_path.glob("runs/*/model/config.json")) and not records(tmp_path)
    scored = multirun(tmp_path, "experiment=se_kd", "stage=score")
    assert scored.returncode == 0, scored.stderr[-2000:]
    [rec] = records(tmp_path).values()
    assert rec["stage"] == "score" and rec["steps"] == 2 and rec["metrics"]["acc"] >= 0


def job_processes(sweep_pid: int) -> list[int]:
    """The submitit job processes (each runs one cell) below the sweep's process."""

    def cmdline(pid: int) -> bytes:
        try:
            return Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return b""

    return [p for p in descendants(sweep_pid) if b"submitit.core._submit" in cmdline(p)]


def test_a_job_killed_outright_is_reported_and_its_checkpoint_kept_for_the_rerun(tmp_path):
    """On the submitit launcher a job that dies without a result (here SIGKILLed once its step-2 checkpoint
    is written) makes submitit raise; the sweep says so in one line, and a re-run resumes the cell from
    its checkpoint."""
    args = [
        "-m",
        *FAST,
        "train.steps=4",
        "train.ckpt_every=2",
        "experiment=se_kd",
        "hydra/launcher=local",
        f"paths.root={tmp_path}",
    ]
    killed = sekd_train_killed(
        args, ready=lambda: any(tmp_path.glob("runs/*/checkpoint.pt")), env=OFFLINE, timeout=300, victims=job_processes
    )
    assert killed.returncode == 1, killed.stderr[-2000:]
    assert "died without a result" in killed.stderr and "Re-run the sweep" in killed.stderr
    assert list(tmp_path.glob("runs/*/checkpoint.pt")) and not records(tmp_path)
    rerun = sekd_train(args, env=OFFLINE, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    [rec] = records(tmp_path).values()
    assert rec["steps"] == 4
    logs = "".join(p.read_text() for p in tmp_path.glob("hydra/*/.submitit/*/*_log.*"))
    assert "resumed from step 2" in logs


def test_cells_that_are_one_run_run_once(tmp_path):
    """The undistilled student and the teacher train nothing: their identity holds no seed, so a sweep over
    seeds scores each once, and says so before it submits."""
    res = multirun(tmp_path, "experiment=student,teacher", "seed=1,2")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "4 cells: 0 already finished, 2 the same run as another cell, 2 to run" in res.stdout
    done = records(tmp_path)
    assert sorted(r["preset"] for r in done.values()) == ["student", "teacher"]
    assert {r["seed"] for r in done.values()} == {1}  # the first cell of each ran


def test_cells_running_elsewhere_show_one_bar_of_finished_cells(tmp_path, capsys):
    # local subprocesses and Slurm jobs print nothing here while the launcher waits: the bar counts their records
    from hydra_plugins.sekd_sweeper.sekd_sweeper import CellProgress

    records = [tmp_path / f"cell{i}" / "record.json" for i in range(3)]
    with CellProgress([r.exists for r in records] + [None], show=True, every=0.05) as progress:
        for r in records[:2]:
            r.parent.mkdir()
            r.write_text("{}")
        deadline = time.time() + 10
        while "2/3" not in capsys.readouterr().err and time.time() < deadline:
            time.sleep(0.05)
        assert progress.thread.is_alive()  # one cell is still running
    assert not progress.thread.is_alive()  # the launcher returned: the bar stops where the cells are
    assert "3/3" not in capsys.readouterr().err
    with CellProgress([r.exists for r in records], show=False) as quiet:  # the basic launcher: no bar
        assert not quiet.show
    assert "sekd: cells finished" not in capsys.readouterr().err
