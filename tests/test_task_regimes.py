"""docs/method.md §10's task-specific and on-policy regimes end to end: a short run of each on the embedded task
produces a record whose GSM8K column is lm-eval's exact match; the real GSM8K loader trains from a local
file of its schema; the regimes' config errors are one line naming the key."""

from __future__ import annotations

import json

import pytest

from sekd.core.errors import ConfigError

from sekd.app.checks import validate
from sekd.app import execute
from tests.helpers import TINY, compose_cfg

TASK = [
    *TINY,
    "data=arith",
    "data.seq_len=128",
    "eval=task",
    "eval.limit=8",
    "train.grad_accum=1",
    "train.trace_selection_steps=4",
]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def run(tmp_path, cache, *overrides):
    cfg = compose_cfg([*TASK, f"paths.root={tmp_path}", f"paths.cache={cache}", *overrides])
    record = execute(cfg)
    [trace] = tmp_path.glob("runs/*/selection_trace.jsonl")
    return cfg, record, [json.loads(ln) for ln in trace.read_text().splitlines()]


def generations(tmp_path) -> list[dict]:
    [path] = tmp_path.glob("runs/*/eval-*/lm_eval/samples_sekd_arith_test.jsonl")
    return [json.loads(ln) for ln in path.read_text().splitlines()]


def test_task_specific_run_supervises_answers_only_and_reports_exact_match(tmp_path, cache):
    from sekd.data.qa import prompt_lengths
    from sekd.app.checks import typed
    from sekd.models.loading import load_tokenizer, resolve_pair
    from sekd.app.training import training_data

    cfg, record, trace = run(tmp_path, cache, "experiment=full_kd", "train.steps=2")
    assert 0 <= record["metrics"]["gsm8k"] <= 100 and record["on_policy_batches"] == 0
    assert record["metrics"]["gsm8k"] == 100 * record["metrics"]["sekd_arith_test/exact_match,strict-match"]
    assert len({g["doc_id"] for g in generations(tmp_path)}) == 8  # eval.limit problems, generated and scored
    run_cfg = typed(cfg)
    data = training_data(run_cfg, load_tokenizer(resolve_pair(run_cfg)[2]))
    plen = dict(zip(data.sample_ids, prompt_lengths(data).tolist()))
    labels = dict(zip(data.sample_ids, data.labels))
    for row in trace:  # KD on the answer tokens (and the eos ending them), from the prompt's last position
        answer = (labels[row["sample"]] != -100).nonzero().flatten().tolist()
        assert row["valid"] == answer and answer[0] == plen[row["sample"]] - 1


def test_on_policy_run_mixes_its_batches_and_reports_exact_match(tmp_path, cache):
    cfg, record, trace = run(
        tmp_path, cache, "experiment=on_policy_se_kd", "regime.mix=0.5", "train.steps=4", "regime.max_new_tokens=10"
    )
    assert record["config"]["criterion"]["name"] == "reverse_kl" and record["config"]["regime"]["name"] == "on_policy"
    assert record["on_policy_batches"] == 2  # mix 0.5 of 4 steps, one micro-batch each
    assert 0 <= record["metrics"]["gsm8k"] <= 100
    by_step = {}
    for row in trace:
        by_step.setdefault(row["step"], []).append(len(row["valid"]))
    on = [s for s, lens in by_step.items() if max(lens) <= 10]  # sampled answers: at most max_new_tokens
    assert len(on) >= 2 and sorted(by_step) == [0, 1, 2, 3]


def test_gsm8k_trains_from_a_local_file_of_its_schema(tmp_path, cache):
    problems = [
        {
            "question": f"Natalia sold clips to {n} of her friends in April, and then she sold half as many "
            f"clips in May. How many clips did Natalia sell altogether in April and May?",
            "answer": f"Natalia sold {n}/2 = <<{n}/2={n // 2}>>{n // 2} clips in May.\n"
            f"Natalia sold {n}+{n // 2} = <<{n}+{n // 2}={n + n // 2}>>{n + n // 2} clips.\n"
            f"#### {n + n // 2}",
        }
        for n in range(2, 42, 2)
    ]
    path = tmp_path / "gsm8k_train.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in problems))
    cfg = compose_cfg(
        [
            *TINY,
            "experiment=se_kd",
            "data=gsm8k",
            f"data.train_file={path}",
            "data.seq_len=192",
            "train.steps=1",
            "eval=none",
            f"paths.root={tmp_path / 'out'}",
            f"paths.cache={cache}",
        ]
    )
    record = execute(cfg)
    assert record["steps"] == 1 and record["tokens_supervised"] > 0
    assert 0 < record["available_samples"] < 20  # a few problems are held out as the validation split


@pytest.mark.parametrize(
    "overrides,message",
    [
        (
            ["experiment=on_policy_se_kd", "data=embedded"],
            "regime=on_policy samples answers to task prompts: it needs task data",
        ),
        (["experiment=on_policy_full_kd", "classes=rs_kd", "criterion=forward_kl"], "does not apply on-policy"),
        (
            ["experiment=on_policy_full_kd", "data=arith", "regime.mix=1.5"],
            "regime.mix=1.5 must be a fraction in [0, 1]",
        ),
        (["experiment=on_policy_full_kd", "data=arith", "regime.top_p=0"], "regime.top_p=0"),
        (["experiment=on_policy_full_kd", "data=arith", "regime.max_new_tokens=0"], "regime.max_new_tokens=0"),
        (["data=gsm8k", "data.train_file=/no/such/file.jsonl"], "data.train_file"),
    ],
)
def test_regime_config_errors_name_the_key(overrides, message):
    with pytest.raises(ConfigError) as err:
        validate(compose_cfg(overrides))
    assert message in str(err.value) and "\n" not in str(err.value)
