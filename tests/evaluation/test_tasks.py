import json
import shutil
from pathlib import Path

import pytest
import yaml

from sekd.data.corpus import load_split
from sekd.evaluation.tasks import EmbeddedTasks, TaskParams, build_tasks, content_hash, prose_runs


def load_items(tasks: EmbeddedTasks) -> tuple[list[dict], list[dict]]:
    """The built items (choice, lastword), read back from the task folder."""

    def read(name: str) -> list[dict]:
        return [json.loads(line) for line in (tasks.include_path / name).read_text().splitlines()]

    return read("choice.jsonl"), read("lastword.jsonl")


def fold(text: str) -> str:
    return " ".join(text.split())


@pytest.fixture(scope="module")
def test_docs():
    return load_split("test")


@pytest.fixture(scope="module")
def built(test_docs, tmp_path_factory):
    return build_tasks(test_docs, tmp_path_factory.mktemp("cache"), split="test")


def test_names_and_counts(built):
    assert built.names == ["sekd_choice_test", "sekd_lastword_test"]
    choice, lastword = load_items(built)
    assert 150 <= len(choice) <= 300
    assert 150 <= len(lastword) <= 300


def test_deterministic_and_cached(test_docs, built, tmp_path):
    again = build_tasks(test_docs, built.include_path.parent.parent, split="test")
    assert again == built  # reused, same folder
    elsewhere = build_tasks(test_docs, tmp_path, split="test")
    assert elsewhere.include_path.name == built.include_path.name
    for name in ("choice.jsonl", "lastword.jsonl"):
        assert (elsewhere.include_path / name).read_bytes() == (built.include_path / name).read_bytes()
    assert not [p for p in (tmp_path / "lm_eval_tasks").iterdir() if p.name.startswith(".")]  # no temp left


def test_key_changes_with_docs_params_split(test_docs):
    h = content_hash(test_docs, "test", TaskParams())
    assert content_hash(test_docs[:-1], "test", TaskParams()) != h
    assert content_hash(test_docs, "test", TaskParams(seed=1)) != h
    assert content_hash(test_docs, "validation", TaskParams()) != h


def test_choice_items(built, test_docs):
    choice, _ = load_items(built)
    for it in choice:
        assert len(it["choices"]) == 4
        assert 0 <= it["label"] < 4 and isinstance(it["label"], int)
        assert len(set(it["choices"])) == 4
        n = {len(c.split()) for c in it["choices"]}
        assert len(n) == 1 and 8 <= n.pop() <= 12  # equal word counts
        assert 20 <= len(it["context"].split()) <= 40
        true = it["context"] + " " + it["choices"][it["label"]]
        assert true in fold(test_docs[it["doc"]])
    golds = [it["label"] for it in choice]
    assert len(set(golds)) == 4  # shuffled, not always one slot


def test_lastword_items(built, test_docs):
    _, lastword = load_items(built)
    for it in lastword:
        word = it["target"][1:]
        assert it["target"].startswith(" ") and word.isalpha() and len(word) >= 4
        assert 30 <= len(it["context"].split()) <= 60
        assert it["context"] + it["target"] in fold(test_docs[it["doc"]])


def test_prose_runs_drop_code():
    doc = "Intro line one\nline two\n\nmore prose\n   code = 1\n   more code\nAfter code."
    assert prose_runs(doc) == [["Intro", "line", "one", "line", "two", "more", "prose"], ["After", "code."]]


def test_configs_absolute_and_follow_a_moved_cache(built, tmp_path):
    cache = tmp_path / "moved"
    (cache / "lm_eval_tasks").mkdir(parents=True)
    shutil.copytree(built.include_path, cache / "lm_eval_tasks" / built.include_path.name)
    reused = build_tasks(load_split("test"), cache, split="test")
    for name in built.names:
        cfg = yaml.safe_load((reused.include_path / f"{name}.yaml").read_text())
        path = Path(cfg["dataset_kwargs"]["data_files"]["test"])
        assert path.is_absolute() and path.exists() and path.parent == reused.include_path.resolve()


def test_lm_eval_sees_the_tasks(built):
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=str(built.include_path), include_defaults=False)
    assert set(built.names) <= set(tm.all_subtasks)


def test_validation_split_names(tmp_path):
    v = build_tasks(load_split("validation"), tmp_path, split="validation")
    assert v.names == ["sekd_choice_validation", "sekd_lastword_validation"]
    choice, lastword = load_items(v)
    assert len(choice) >= 100 and len(lastword) >= 100


def test_empty_docs_raise(tmp_path):
    with pytest.raises(ValueError):
        build_tasks([], tmp_path, split="test")
    with pytest.raises(ValueError):
        build_tasks(["too short"], tmp_path, split="test")
    assert not [p for p in (tmp_path / "lm_eval_tasks").iterdir()]
