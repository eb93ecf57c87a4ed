"""Faults of the scoring and record stages, met for real (docs/bad-inputs.md, "Faults while running"):
lm-eval failing on one of our tasks (its prepared data broken under paths.cache/eval), and the wandb service
killed under a running job. A task fault is one line and exit status 3 with the trained student kept, no
record and no lm-eval output taken for whole; the same command then only scores. A dead wandb is one line,
once, and the run finishes as if nothing happened (metrics.jsonl every step, the record written)."""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import pytest

from tests.disks import fill, mount_tmpfs
from tests.helpers import (
    TINY,
    checkpoint_step,
    descendants,
    injected,
    logged_steps,
    sekd_train,
    sekd_train_paused,
    tiny_cache,
)
from tests.test_faults import STEPS as FAULTS_STEPS
from tests.test_faults import args as faults_args
from tests.test_faults import uninterrupted_fault_run

STEPS = 4
RUN = [*TINY, f"train.steps={STEPS}", "train.ckpt_every=1", "eval.limit=8"]


@pytest.fixture
def cache(tmp_path_factory, tmp_path) -> Path:
    """This test's paths.cache, the tiny pair built in it (a copy: a test may break its task data); no
    module-scoped fixture, so that `make test`'s two workers may share these tests out."""
    return tiny_cache(tmp_path_factory, tmp_path / "cache")


def args(root: Path, cache: Path, *extra: str) -> list[str]:
    return [*RUN, f"paths.root={root}", f"paths.cache={cache}", f"hydra.run.dir={root}/hydra", *extra]


def run_folder(root: Path) -> Path:
    (run,) = Path(root).glob("runs/*")
    return run


def fault_line(res) -> str:
    assert res.returncode == 3, res.stdout[-2000:] + res.stderr[-3000:]
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    (line,) = [ln for ln in res.stderr.splitlines() if ln.startswith("sekd: ")]
    assert line.startswith("sekd: run fault: ")
    return line


def test_a_broken_task_file_stops_scoring_in_one_line_and_the_rerun_only_scores(cache, tmp_path):
    from sekd.data.corpus import load_split
    from sekd.evaluation.tasks import build_tasks

    tasks = build_tasks(load_split("test"), cache / "eval", split="test").include_path
    data = tasks / "choice.jsonl"
    data.write_bytes(data.read_bytes()[:3000])  # cut short mid-line, as an interrupted copy leaves it
    run_args = args(tmp_path / "root", cache)
    line = fault_line(sekd_train(run_args))
    run = run_folder(tmp_path / "root")
    assert line == (
        f"sekd: run fault: lm-eval failed on task sekd_choice_test (eval.suite=embedded): {data} line 6 is not whole "
        f"JSON (cut short or corrupted); the trained student is kept ({run}/model); remove {tasks} (paths.cache/eval: "
        "it is built again from the corpus); re-run the same command: the student is trained and saved; it only scores"
    )
    (eval_dir,) = run.glob("eval-*")
    assert not (eval_dir / "record.json").exists() and not (eval_dir / "lm_eval").exists()
    trained = (run / "model" / "model.safetensors").stat().st_mtime_ns
    shutil.rmtree(tasks)  # as the line says
    again = sekd_train(run_args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "distill" not in again.stderr and (run / "model" / "model.safetensors").stat().st_mtime_ns == trained
    assert logged_steps(tmp_path / "root") == list(range(1, STEPS + 1))
    record = json.loads((eval_dir / "record.json").read_text())
    assert record["steps"] == STEPS and record["metrics"]["acc"] >= 0
    assert (eval_dir / "lm_eval" / "results.json").is_file()


def wandb_services() -> list[int]:
    """This test's own wandb-core processes (under pytest's process: the CLI's children)."""
    out = []
    for pid in descendants(os.getpid()):
        try:
            if b"wandb-core" in Path(f"/proc/{pid}/cmdline").read_bytes():
                out.append(pid)
        except OSError:  # ended meanwhile
            pass
    return out


def test_a_killed_wandb_service_is_one_line_and_the_run_finishes(cache, tmp_path):
    root = tmp_path / "root"
    run_args = args(root, cache, "logging=offline", "eval=none")

    def kill_wandb() -> bool:
        pids = wandb_services()
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        return bool(pids)

    res = sekd_train_paused(run_args, ready=lambda: (checkpoint_step(root) or 0) >= 2, action=kill_wandb)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    said = [ln for ln in res.stderr.splitlines() if "wandb" in ln]
    assert len(said) == 1 and said[0].startswith("sekd: wandb stopped logging ("), res.stderr[-3000:]
    assert said[0].endswith("); the run goes on without it, metrics.jsonl keeps every step")
    assert logged_steps(root) == list(range(1, STEPS + 1))
    (record,) = run_folder(root).glob("eval-*/record.json")
    assert json.loads(record.read_text())["steps"] == STEPS


def eval_outputs(eval_dir: Path) -> list[Path]:
    return [eval_dir / "lm_eval.log", *sorted((eval_dir / "lm_eval").glob("*")), eval_dir / "record.json"]


def pages(files: list[Path]) -> int:
    """What the files take on a tmpfs: whole pages."""
    return sum(-(-f.stat().st_size // 4096) * 4096 for f in files)


def test_a_disk_that_fills_while_scoring_or_recording_stops_in_one_line_and_the_rerun_only_scores(cache, tmp_path):
    """Full while lm-eval's output is written (the student saved, its checkpoint gone), then, scoring again,
    with room for lm-eval's output but not for record.json: each one line naming the file, no record, no
    results.json beside samples, and the same command then scores and records without training again."""
    with mount_tmpfs(tmp_path / "disk", "16m") as disk:
        run_args = args(disk, cache)
        res = sekd_train_paused(
            run_args,
            ready=lambda: any(disk.glob("runs/*/train_stats.json")),
            action=lambda: bool(fill(disk, leave=8192)),  # room for lm_eval.log, not for the samples
        )
        run = run_folder(disk)
        (eval_dir,) = run.glob("eval-*")
        trained = (run / "model" / "model.safetensors").stat().st_mtime_ns
        line = fault_line(res)
        assert line.startswith(f"sekd: run fault: {eval_dir}/lm_eval/samples_sekd_") and (
            f".jsonl: no space left on device (paths.root={disk}, " in line
        ), line
        assert line.endswith(
            "free space on that disk and re-run the same command: the student is trained and saved; it only scores"
        ), line
        assert [p.name for p in disk.rglob("*.tmp")] == [] and not (eval_dir / "record.json").exists()
        assert not (eval_dir / "lm_eval" / "results.json").exists()
        (disk / "filler.bin").unlink()
        again = sekd_train(run_args)
        assert again.returncode == 0, again.stderr[-3000:]
        written = pages(eval_outputs(eval_dir))
        record = json.loads((eval_dir / "record.json").read_text())
        for f in eval_outputs(eval_dir):
            f.unlink()
        fill(disk, leave=written - 4096)
        line = fault_line(sekd_train(run_args))
        assert line.startswith(f"sekd: run fault: {eval_dir}/record.json: no space left on device"), line
        assert [p.name for p in disk.rglob("*.tmp")] == [] and not (eval_dir / "record.json").exists()
        (disk / "filler.bin").unlink()
        again = sekd_train(run_args)
        assert again.returncode == 0, again.stderr[-3000:]
        assert json.loads((eval_dir / "record.json").read_text())["metrics"] == record["metrics"]
        assert (run / "model" / "model.safetensors").stat().st_mtime_ns == trained
        assert logged_steps(disk) == list(range(1, STEPS + 1))


def test_a_cache_disk_that_fills_while_the_sample_scores_are_stored_stops_in_one_line(cache, tmp_path):
    """samples=top_student_entropy stores its pre-pass scores under paths.cache/sample_scores: filled once the
    run has started (past the preflight), the store is one line naming its file, none is left half-written,
    and the re-run scores, stores and trains to the weights of a run that met no fault."""
    from safetensors.torch import load_file

    selective = ["samples=top_student_entropy", "samples.l=0.5", "eval=none"]
    reference = sekd_train(args(tmp_path / "reference", cache, *selective))
    assert reference.returncode == 0, reference.stderr[-3000:]
    with mount_tmpfs(tmp_path / "disk", "16m") as disk:
        shutil.copytree(cache, disk / "cache", ignore=shutil.ignore_patterns("sample_scores"))
        root = tmp_path / "root"
        run_args = args(root, disk / "cache", *selective)
        res = sekd_train_paused(
            run_args, ready=lambda: any(root.glob("runs/*/eval-*/config.yaml")), action=lambda: bool(fill(disk))
        )
        line = fault_line(res)
        assert line.startswith(f"sekd: run fault: {disk}/cache/sample_scores/top_student_entropy-"), line
        assert f".json: no space left on device (paths.cache={disk}/cache, " in line, line
        assert line.endswith("and re-run the same command: it trains from step 0"), line
        assert [p.name for p in disk.rglob("*.tmp")] == [] and list((disk / "cache").glob("sample_scores/*")) == []
        (disk / "filler.bin").unlink()
        again = sekd_train(run_args)
        assert again.returncode == 0, again.stderr[-3000:]
        assert len(list((disk / "cache").glob("sample_scores/*.json"))) == 1
        got = load_file(run_folder(root) / "model" / "model.safetensors")
        want = load_file(run_folder(tmp_path / "reference") / "model" / "model.safetensors")
        assert got.keys() == want.keys() and all((got[k] == want[k]).all() for k in want)


def test_a_disk_that_fills_while_the_model_is_saved_stops_in_one_line_and_the_rerun_resumes(
    cache, tmp_path_factory, tmp_path
):
    """Full after the last checkpoint (step 5 of 6; no metrics line after it, train.log_every=5): the model's
    save is one line naming run/model, no half model or model.tmp is left, and the re-run resumes from step 5
    to the weights of a run that met no fault: tests/test_faults.py's, of the same run (train.log_every, which
    is no part of a run's identity, aside), built once a session."""
    from safetensors.torch import load_file

    reference = uninterrupted_fault_run(tmp_path_factory) / "reference"
    with mount_tmpfs(tmp_path / "disk", "16m") as disk:
        run_args = [*faults_args(disk, cache, tmp_path), "train.log_every=5"]
        hold = tmp_path / "hold"  # the run waits there just before the model's save: no race with a fast run
        hold.mkdir()

        def fill_then_go() -> bool:
            fill(disk)
            (hold / "go").touch()
            return True

        res = sekd_train_paused(
            run_args,
            ready=lambda: (hold / "held").exists(),
            action=fill_then_go,
            env=injected(SEKD_TEST_HOLD=f"{hold}:sekd.app.training:save_student"),
        )
        assert checkpoint_step(disk) == FAULTS_STEPS - 1
        line = fault_line(res)
        run = run_folder(disk)
        assert line.startswith(f"sekd: run fault: {run}/model: no space left on device (paths.root={disk}, "), line
        assert line.endswith(f"re-run the same command: it resumes from step {FAULTS_STEPS - 1} (checkpoint.pt)"), line
        assert not (run / "model").exists() and not (run / "model.tmp").exists()
        assert [p.name for p in disk.rglob("*.tmp")] == []
        (disk / "filler.bin").unlink()
        again = sekd_train(run_args)
        assert again.returncode == 0, again.stderr[-3000:]
        assert f"resumed from step {FAULTS_STEPS - 1}" in again.stdout + again.stderr
        assert run_folder(reference).name == run.name  # the same run (sekd.stores.runs.train_hash)
        got = load_file(run / "model" / "model.safetensors")
        want = load_file(run_folder(reference) / "model" / "model.safetensors")
        assert got.keys() == want.keys() and all((got[k] == want[k]).all() for k in want)
