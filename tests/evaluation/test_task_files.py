"""Which of our local tasks' files is broken (sekd/evaluation/task_files.py), and data removed from a built
task folder built again (sekd/evaluation/tasks.py, generation.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from sekd.data.corpus import load_split
from sekd.evaluation.generation import DATA_FILE, build_arith_task
from sekd.evaluation.task_files import broken_task, data_files
from sekd.evaluation.tasks import build_tasks


@pytest.fixture
def tasks(tmp_path):
    return build_tasks(load_split("test"), tmp_path, split="test").include_path


def test_whole_tasks_are_not_broken(tasks, tmp_path):
    assert broken_task([tasks, build_arith_task("test", tmp_path)]) is None


@pytest.mark.parametrize(
    "damage, problem",
    [
        (lambda p: p.write_bytes(p.read_bytes()[:3000]), "line 6 is not whole JSON (cut short or corrupted)"),
        (lambda p: p.unlink(), "is missing"),
        (lambda p: p.write_text("\n"), "holds no items"),
        (lambda p: p.write_text('{"a": 1}\n[1]\n'), "line 2 is not a JSON object"),
        (lambda p: p.write_bytes(b"\xff\xfe"), "cannot be read (UnicodeDecodeError)"),
    ],
)
def test_a_broken_data_file_names_its_task_and_the_problem(tasks, damage, problem):
    damage(tasks / "choice.jsonl")
    err = broken_task([tasks])
    assert err is not None and (err.task, err.path, err.problem, err.folder) == (
        "sekd_choice_test",
        tasks / "choice.jsonl",
        problem,
        tasks,
    )
    assert str(err) == f"task sekd_choice_test: {tasks / 'choice.jsonl'} {problem}"


def test_a_config_that_does_not_parse_is_named(tasks):
    (tasks / "sekd_lastword_test.yaml").write_text("task: [unclosed\n")
    err = broken_task([tasks])
    assert err is not None and err.task == "sekd_lastword_test" and err.problem == "does not parse (ParserError)"


def test_data_files_takes_every_form():
    assert data_files({"dataset_kwargs": {"data_files": "a.jsonl"}}) == [Path("a.jsonl")]
    assert data_files({"dataset_kwargs": {"data_files": {"test": ["a", "b"], "x": "c"}}}) == [
        Path("a"),
        Path("b"),
        Path("c"),
    ]
    assert data_files({"dataset_path": "gsm8k"}) == [] and data_files(None) == []


def test_task_data_removed_from_the_cache_is_built_again(tasks, tmp_path):
    """A cleaned cache (the data files gone, their folder left) is no fault: the tasks are built again."""
    want = (tasks / "lastword.jsonl").read_text()
    (tasks / "lastword.jsonl").unlink()
    assert build_tasks(load_split("test"), tmp_path, split="test").include_path == tasks
    assert (tasks / "lastword.jsonl").read_text() == want
    arith = build_arith_task("test", tmp_path)
    (arith / DATA_FILE).unlink()
    assert build_arith_task("test", tmp_path) == arith and (arith / DATA_FILE).is_file()


def test_score_checkpoint_names_the_broken_task_and_keeps_other_failures_whole(tiny_checkpoint, tmp_path):
    """Real lm-eval: a task whose data is cut short is a TaskDataError naming it, from lm-eval's own error;
    a failure no task file explains (no model at the path) stays lm-eval's error, and leaves no results.json."""
    from sekd.evaluation.score import score_checkpoint
    from sekd.evaluation.task_files import TaskDataError

    docs = load_split("test")[:8]
    tasks = build_tasks(docs, tmp_path / "cache", split="test").include_path
    out = tmp_path / "run"
    (out / "lm_eval").mkdir(parents=True)
    (out / "lm_eval" / "results.json").write_text("{}")  # an older scoring's: not to be read beside new samples
    with pytest.raises(OSError) as other:
        score_checkpoint(tmp_path / "no-model", out, docs=docs, artifacts_dir=tmp_path / "cache", limit=2)
    assert not isinstance(other.value, TaskDataError) and not (out / "lm_eval" / "results.json").exists()
    (tasks / "lastword.jsonl").write_text('{"context": "a"\n')
    with pytest.raises(TaskDataError) as broken:
        score_checkpoint(tiny_checkpoint, out, docs=docs, artifacts_dir=tmp_path / "cache", limit=2)
    assert broken.value.task == "sekd_lastword_test" and broken.value.problem.startswith("line 1 is not whole JSON")
    assert broken.value.__cause__ is not None  # lm-eval's own error, kept for SEKD_TRACEBACK=1
