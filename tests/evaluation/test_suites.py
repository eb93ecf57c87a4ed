import json
from pathlib import Path

import pytest

from sekd.evaluation.suites import GSM8K_HELD_OUT, IFEVAL_MAX_GEN_TOKS, SUITES, get_suite, lm_eval_tasks
from sekd.evaluation.tasks import task_configs


@pytest.fixture(scope="module")
def task_manager():
    from lm_eval.tasks import TaskManager

    return TaskManager()  # indexes lm-eval's built-in tasks (about 8 s)


def test_unknown_suite_lists_known():
    with pytest.raises(ValueError, match="embedded.*paper.*validation"):
        get_suite("nope")


def test_splits():
    assert get_suite("embedded").split == "test"
    assert get_suite("embedded", "validation").tasks == ("sekd_choice_validation", "sekd_lastword_validation")
    assert get_suite("validation").split == "validation"
    with pytest.raises(ValueError, match="split"):
        get_suite("paper", "validation")
    with pytest.raises(ValueError, match="split"):
        get_suite("embedded", "train")


@pytest.mark.parametrize("name", SUITES.names())
def test_columns_name_suite_tasks(name):
    s = get_suite(name)
    used = [t for t, _ in s.acc] + [m[0] for m in (s.ppl, s.ifeval, s.gsm8k) if m] + list(s.multiple_choice)
    assert set(used) <= set(s.tasks)
    assert set(s.derived) <= set(s.tasks)


def _metric_keys(cfg):
    """'metric,filter' keys a task config reports (filter 'none' when it has no filter list)."""
    filters = [f["name"] for f in cfg.get("filter_list") or []] or ["none"]
    return {f"{m['metric']},{f}" for m in cfg["metric_list"] for f in filters}


def test_paper_suite_matches_spec():
    s = get_suite("paper")
    assert s.acc == (
        ("arc_easy", "acc,none"),
        ("hellaswag", "acc,none"),
        ("piqa", "acc,none"),
        ("lambada_openai", "acc,none"),
        ("gsm8k", "exact_match,strict-match"),
    )
    assert s.ppl == ("lambada_openai", "perplexity,none")
    assert s.ifeval == ("ifeval", "prompt_level_strict_acc,none")
    assert set(s.multiple_choice) == {"arc_easy", "hellaswag", "piqa"}


@pytest.mark.slow  # indexes lm-eval's built-in tasks
@pytest.mark.parametrize("name", ["paper", "validation"])
def test_real_lm_eval_tasks_and_metrics(name, task_manager):
    from lm_eval.tasks._yaml_loader import load_yaml

    s = get_suite(name)
    base = {s.derived[t][0] if t in s.derived else t for t in s.tasks}  # the built-in task behind each
    assert base <= set(task_manager.all_subtasks)
    specs = lm_eval_tasks(s, task_manager)
    cfgs = {}
    for spec in specs:
        if isinstance(spec, dict):
            assert "tag" not in spec
            cfgs[spec["task"]] = spec
        else:
            # unresolved: ifeval's functions import packages of lm-eval[ifeval], not installed
            cfgs[spec] = load_yaml(task_manager.task_index[spec].yaml_path, resolve_func=False)
    for task, key in list(s.acc) + [m for m in (s.ppl, s.ifeval, s.gsm8k) if m]:
        assert key in _metric_keys(cfgs[task]), (task, key)
    for task in s.multiple_choice:
        assert cfgs[task]["output_type"] == "multiple_choice"


def test_paper_suite_caps_ifeval_at_512_new_tokens(task_manager):
    """The paper's runs generated at most 512 tokens for IFEval (lm-eval's config says 1280); the task keeps
    its name and the rest of lm-eval's config, gsm8k stays as lm-eval has it."""
    from lm_eval.tasks._yaml_loader import load_yaml

    specs = lm_eval_tasks(get_suite("paper"), task_manager)
    (ifeval,) = [s for s in specs if isinstance(s, dict)]
    base = load_yaml(task_manager.task_index["ifeval"].yaml_path, resolve_func=False)
    assert ifeval["task"] == "ifeval" and IFEVAL_MAX_GEN_TOKS == 512
    assert ifeval["generation_kwargs"] == {**base["generation_kwargs"], "max_gen_toks": 512}
    assert base["generation_kwargs"]["max_gen_toks"] == 1280
    assert set(ifeval) == set(base)
    for key in ("dataset_path", "output_type", "test_split", "doc_to_text", "num_fewshot"):
        assert ifeval[key] == base[key], key
    assert "gsm8k" in specs


def test_embedded_metrics_exist():
    s = get_suite("embedded")
    cfgs = {c["task"]: c for c in task_configs(Path("/data"), s.split).values()}
    for task, key in list(s.acc) + [s.ppl]:
        assert key in _metric_keys(cfgs[task])
    assert cfgs[s.multiple_choice[0]]["output_type"] == "multiple_choice"


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def gsm8k_validation_task(task_manager, tmp_path, n_rows, **suite_opts):
    """The derived sekd_gsm8k_validation task over n_rows stand-in training problems (the hub is out of reach)."""
    from lm_eval.api.task import ConfigurableTask

    specs = {
        s["task"]: s for s in lm_eval_tasks(get_suite("validation", **suite_opts), task_manager) if isinstance(s, dict)
    }
    gsm_rows = [{"question": f"q{i}", "answer": f"#### {i}"} for i in range(n_rows)]
    return ConfigurableTask(
        config={
            **specs["sekd_gsm8k_validation"],
            "dataset_path": "json",
            "dataset_name": None,
            "dataset_kwargs": {"data_files": {"train": _jsonl(tmp_path / "train.jsonl", gsm_rows)}},
        }
    )


def test_gsm8k_validation_follows_the_data_validation_size(task_manager, tmp_path):
    """A run trained on GSM8K with data.validation_size=30 is validated on those 30 problems."""
    gsm = gsm8k_validation_task(task_manager, tmp_path, 100, gsm8k_validation_size=30)
    assert [d["question"] for d in gsm.eval_docs] == [f"q{i}" for i in range(70, 100)]
    assert [d["question"] for d in gsm.fewshot_docs()] == [f"q{i}" for i in range(70)]


def test_derived_validation_tasks_on_local_data(task_manager, tmp_path):
    """Run the derived configs' split logic on stand-in local data (the hub is out of reach)."""
    from lm_eval.api.task import ConfigurableTask

    specs = {s["task"]: s for s in lm_eval_tasks(get_suite("validation"), task_manager) if isinstance(s, dict)}
    gsm_rows = [{"question": f"q{i}", "answer": f"#### {i}"} for i in range(GSM8K_HELD_OUT + 40)]
    gsm = ConfigurableTask(
        config={
            **specs["sekd_gsm8k_validation"],
            "dataset_path": "json",
            "dataset_name": None,
            "dataset_kwargs": {"data_files": {"train": _jsonl(tmp_path / "train.jsonl", gsm_rows)}},
        }
    )
    held = [d["question"] for d in gsm.eval_docs]
    pool = [d["question"] for d in gsm.fewshot_docs()]
    assert held == [f"q{i}" for i in range(40, GSM8K_HELD_OUT + 40)]
    assert pool == [f"q{i}" for i in range(40)]

    arc_row = {"id": "1", "question": "q", "choices": {"text": ["a", "b"], "label": ["A", "B"]}, "answerKey": "B"}
    files = {
        split: _jsonl(tmp_path / f"{split}.jsonl", [{**arc_row, "question": split}])
        for split in ("train", "validation", "test")
    }
    arc = ConfigurableTask(
        config={
            **specs["sekd_arc_easy_validation"],
            "dataset_path": "json",
            "dataset_name": None,
            "dataset_kwargs": {"data_files": files},
        }
    )
    assert [d["question"] for d in arc.eval_docs] == ["validation"]
