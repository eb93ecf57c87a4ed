import json
import math

import pytest
import yaml

from sekd.data.qa_format import FINAL_ANSWER, final_answer, prompt_text
from sekd.data.corpus import load_split
from sekd.evaluation.generation import (
    DATA_FILE,
    arith_task_name,
    build_arith_task,
    build_exact_match_task,
)
from sekd.evaluation.score import score_checkpoint
from sekd.evaluation.suites import get_suite

PROBLEMS = [
    {"question": "  What is 3 + 4?\n", "answer": "3 + 4 = 7. #### 7"},
    {"question": "What is 1000 + 234?", "answer": "1000 + 234 = 1,234. #### 1,234"},
    {"question": "What is 2 - 5?", "answer": "2 - 5 = -3. #### -3"},
    {"question": "What is 6 * 7? Say {{ it }}.", "answer": "6 * 7 = 42. #### 42"},
    {"question": "What is 9 + 9?", "answer": "#### 18"},
]


def _load_task(folder, name):
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=[str(folder)], include_defaults=False)
    return tm.load_task_or_group([name])[name]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return build_exact_match_task(PROBLEMS, tmp_path_factory.mktemp("cache"), name="sekd_arith_x")


@pytest.fixture(scope="module")
def task(built):
    return _load_task(built, "sekd_arith_x")


def test_build_writes_data_and_yaml(built, tmp_path):
    rows = [json.loads(line) for line in (built / DATA_FILE).read_text().splitlines()]
    assert [r["question"] for r in rows] == [p["question"].strip() for p in PROBLEMS]
    assert [r["final"] for r in rows] == ["7", "1234", "-3", "42", "18"]
    cfg = yaml.safe_load((built / "sekd_arith_x.yaml").read_text())
    assert cfg["output_type"] == "generate_until"
    assert cfg["dataset_kwargs"]["data_files"]["test"] == str(built / DATA_FILE)
    assert cfg["generation_kwargs"] == {
        "until": ["\n\n", "Question:"], "do_sample": False, "temperature": 0.0, "max_gen_toks": 48
    }  # fmt: skip
    assert [f["name"] for f in cfg["filter_list"]] == ["strict-match", "flexible-extract"]
    # cached by content: same folder again, another for other settings, no temp folders left
    assert build_exact_match_task(PROBLEMS, built.parent.parent, name="sekd_arith_x") == built
    other = build_exact_match_task(PROBLEMS, built.parent.parent, name="sekd_arith_x", max_gen_toks=8)
    assert (
        other != built
        and yaml.safe_load((other / "sekd_arith_x.yaml").read_text())["generation_kwargs"]["max_gen_toks"] == 8
    )
    elsewhere = build_exact_match_task(PROBLEMS, tmp_path, name="sekd_arith_x")
    assert elsewhere.name == built.name and (elsewhere / DATA_FILE).read_bytes() == (built / DATA_FILE).read_bytes()
    assert not [p for p in built.parent.iterdir() if p.name.startswith(".")]


def test_build_rejects_answers_without_final_number(tmp_path):
    with pytest.raises(ValueError, match="problem 1"):
        build_exact_match_task(PROBLEMS[:1] + [{"question": "q", "answer": "no number"}], tmp_path, name="t")
    with pytest.raises(ValueError, match="at least one"):
        build_exact_match_task([], tmp_path, name="t")


def test_prompt_is_qa_format(task):
    """(a) lm-eval's Jinja renders exactly qa_format.prompt_text, and the request sends it as is."""
    docs = list(task.eval_docs)
    assert [task.doc_to_text(d) for d in docs] == [prompt_text(p["question"]) for p in PROBLEMS]
    assert [task.doc_to_target(d) for d in docs] == [final_answer(p["answer"]) for p in PROBLEMS]
    task.build_all_requests()
    assert [i.args[0] for i in task.instances] == [prompt_text(p["question"]) for p in PROBLEMS]
    assert task.instances[0].args[1]["until"] == ["\n\n", "Question:"]


def test_exact_match_on_canned_generations(task):
    """(c) lm-eval's own filters and metric on known generations."""
    canned = [
        " 3 + 4 = 7. #### 7",  # correct
        " 1000 + 234 = 1,234. #### 1,234\nQuestion",  # correct once commas are ignored
        " #### 8",  # wrong
        " 42",  # no marker: strict wrong, flexible right
        " 9 + 9 = 18. #### 17",  # wrong final, right number earlier: both wrong
    ]
    task.build_all_requests()
    for inst, text in zip(task.instances, canned, strict=True):
        inst.resps = [text]
    task.apply_filters()
    docs = list(task.eval_docs)
    got = {
        flt: [task.process_results(d, [i.filtered_resps[flt]])["exact_match"] for i, d in zip(task.instances, docs)]
        for flt in ("strict-match", "flexible-extract")
    }
    assert got["strict-match"] == [1, 1, 0, 0, 0]
    assert got["flexible-extract"] == [1, 1, 0, 1, 0]
    assert [i.filtered_resps["strict-match"] for i in task.instances] == ["7", "1,234", "8", "[invalid]", "17"]
    assert task.instances[3].filtered_resps["flexible-extract"] == "42"


CANNED = {  # prompt -> what the "model" generates
    prompt_text(PROBLEMS[0]["question"]): " 3 + 4 = 7. #### 7",
    prompt_text(PROBLEMS[1]["question"]): " #### 1234",
    prompt_text(PROBLEMS[2]["question"]): " -3",
    prompt_text(PROBLEMS[3]["question"]): " 6 * 7 = 41. #### 41",
    prompt_text(PROBLEMS[4]["question"]): " 9 + 9 = 18. #### 18.",
}


def test_simple_evaluate_with_canned_model(built, tmp_path):
    """lm-eval end to end with a model whose generations are known: aggregate and per-sample output."""
    import lm_eval
    from lm_eval.api.model import LM
    from lm_eval.tasks import TaskManager

    from sekd.evaluation.score import write_raw

    class Canned(LM):
        def loglikelihood(self, requests):
            raise NotImplementedError

        def loglikelihood_rolling(self, requests):
            raise NotImplementedError

        def generate_until(self, requests):
            assert all(r.args[1]["until"] == ["\n\n", "Question:"] for r in requests)
            return [CANNED[r.args[0]] for r in requests]

    tm = TaskManager(include_path=[str(built)], include_defaults=False)
    res = lm_eval.simple_evaluate(model=Canned(), tasks=["sekd_arith_x"], task_manager=tm, log_samples=True,
                                  bootstrap_iters=0)  # fmt: skip
    assert res["results"]["sekd_arith_x"]["exact_match,strict-match"] == pytest.approx(3 / 5)
    assert res["results"]["sekd_arith_x"]["exact_match,flexible-extract"] == pytest.approx(4 / 5)
    write_raw(res, tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "samples_sekd_arith_x.jsonl").read_text().splitlines()]
    strict = {r["doc_id"]: r for r in rows if r["filter"] == "strict-match"}
    assert [strict[i]["resps"][0][0] for i in range(5)] == [CANNED[prompt_text(p["question"])] for p in PROBLEMS]
    assert [strict[i]["filtered_resps"][0] for i in range(5)] == ["7", "1234", "[invalid]", "41", "18."]
    assert [strict[i]["exact_match"] for i in range(5)] == [1, 1, 0, 0, 1]


def test_arith_task_builder(tmp_path):
    folder = build_arith_task("validation", tmp_path, problems=PROBLEMS[:2], max_gen_toks=16)
    assert (folder / f"{arith_task_name('validation')}.yaml").exists()
    assert arith_task_name("test") == get_suite("task").arith == "sekd_arith_test"


def test_task_suite_columns():
    s = get_suite("task", "validation")
    assert s.tasks == ("sekd_choice_validation", "sekd_lastword_validation", "sekd_arith_validation")
    assert s.acc[-1] == s.gsm8k == ("sekd_arith_validation", "exact_match,strict-match")
    assert s.embedded and s.arith == "sekd_arith_validation" and get_suite("embedded").arith is None


def test_problems_only_for_arith_suite(tmp_path):
    with pytest.raises(ValueError, match="arithmetic"):
        score_checkpoint(tmp_path, tmp_path, suite="embedded", problems=PROBLEMS, artifacts_dir=tmp_path)


LIMIT = 4


@pytest.fixture(scope="module")
def scored(tiny_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    m = score_checkpoint(
        tiny_checkpoint, out, suite="task", docs=load_split("test")[:8], problems=PROBLEMS,
        artifacts_dir=tmp_path_factory.mktemp("cache"), limit=LIMIT, batch_size=4, bootstrap_iters=0,
    )  # fmt: skip
    return out, m


def test_prompt_fits_tiny_model(tiny_checkpoint):
    """lm-eval left-truncates prompts longer than max_length - max_gen_toks: ours must fit."""
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(tiny_checkpoint)
    cfg = transformers.AutoConfig.from_pretrained(tiny_checkpoint)
    longest = max(len(tok(prompt_text(p["question"]))["input_ids"]) for p in PROBLEMS)
    assert longest + 48 <= cfg.max_position_embeddings


def test_real_run_generates_and_keeps_samples(scored):
    """(b) a real lm-eval run: exact_match in [0, 1], generations and filtered answers in the raw output."""
    out, m = scored
    for flt in ("strict-match", "flexible-extract"):
        assert 0 <= m[f"sekd_arith_test/exact_match,{flt}"] <= 1
    rows = [json.loads(line) for line in (out / "lm_eval" / "samples_sekd_arith_test.jsonl").read_text().splitlines()]
    assert sorted(r["filter"] for r in rows) == ["flexible-extract"] * LIMIT + ["strict-match"] * LIMIT
    for r in rows:
        generated = r["resps"][0][0]
        assert isinstance(generated, str) and r["arguments"][0][0] == prompt_text(r["doc"]["question"])
        assert r["target"] == r["doc"]["final"]
        if r["filter"] == "strict-match":
            found = FINAL_ANSWER.findall(generated)
            assert r["filtered_resps"][0] == (found[0].strip() if found else "[invalid]")
        assert r["exact_match"] in (0, 1)


def test_task_suite_flatten(scored):
    """(d) the task suite's columns from a real run."""
    _, m = scored
    assert {"acc", "ppl", "ece", "gsm8k"} <= set(m)
    assert all(isinstance(v, float) and math.isfinite(v) for v in m.values())
    assert m["gsm8k"] == pytest.approx(100 * m["sekd_arith_test/exact_match,strict-match"])
    accs = (m["sekd_choice_test/acc"], m["sekd_lastword_test/acc"], m["sekd_arith_test/exact_match,strict-match"])
    assert m["acc"] == pytest.approx(100 * sum(accs) / 3)
    assert m["ppl"] == m["sekd_lastword_test/perplexity"] > 1
    assert 0 <= m["ece"] <= 100 and "ifeval" not in m
