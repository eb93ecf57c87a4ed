"""Local lm-eval generation tasks scored by exact match on the final number (GSM8K-style, docs/method.md §10).

A task is built from problems {"question", "answer"} whose answers end in "#### <number>"
(`sekd.data.qa_format`). The model sees exactly `qa_format.prompt_text(question)`, generates greedily until
a blank line or the next "Question:", and is scored like lm-eval's gsm8k: "strict-match" takes the number
after "#### ", "flexible-extract" the generation's last number, and exact_match compares it with the
problem's final number (`qa_format.final_answer`), ignoring commas, "$" and a trailing ".". The build is
cached under a content hash of (problems, name, max_gen_toks, builder version), atomically, like
`tasks.build_tasks`: the folder holds `problems.jsonl` and `<name>.yaml` with an absolute data path
(rewritten on every call, so a moved cache still works).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import yaml

from sekd.core.artifacts import build_once
from sekd.data.qa_format import PROMPT, final_answer
from sekd.core.files import atomic_write_text

GENERATION_VERSION = 1
DATA_FILE = "problems.jsonl"
UNTIL = ("\n\n", "Question:")
STRICT = ("strict-match", r"#### (\-?[0-9\.\,]+)")  # lm-eval's gsm8k, = qa_format.FINAL_ANSWER
FLEXIBLE = ("flexible-extract", r"(-?[$0-9.,]{2,})|(-?[0-9]+)")  # lm-eval's gsm8k: the last number
# applied to prediction and target alike; qa_format.final_answer already drops commas and trailing dots
REGEXES_TO_IGNORE = (",", "\\$", "\\.$")


def doc_to_text() -> str:
    """The Jinja prompt: qa_format.PROMPT with the question as a template variable."""
    return PROMPT.format(question="{{question}}")


def _rows(problems: list[dict]) -> list[dict]:
    """{question, answer, final}; question and answer stripped as qa_format does."""
    rows = []
    for i, p in enumerate(problems):
        question, answer = str(p["question"]).strip(), str(p["answer"]).strip()
        final = final_answer(answer)
        if final is None:
            raise ValueError(f"problem {i}: answer has no '#### <number>' final answer: {answer!r}")
        rows.append({"question": question, "answer": answer, "final": final})
    return rows


def content_hash(rows: list[dict], name: str, max_gen_toks: int) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"version": GENERATION_VERSION, "name": name, "max_gen_toks": max_gen_toks}).encode())
    for row in rows:
        h.update(hashlib.sha256(json.dumps(row, sort_keys=True, ensure_ascii=False).encode()).digest())
    return h.hexdigest()[:16]


def task_config(folder: Path, name: str, max_gen_toks: int = 48) -> dict:
    """The lm-eval config of the exact-match task whose data lives in `folder`."""
    return {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(Path(folder).resolve() / DATA_FILE)}},
        "test_split": "test",
        "output_type": "generate_until",
        "doc_to_text": doc_to_text(),
        "doc_to_target": "final",
        "num_fewshot": 0,
        "generation_kwargs": {
            "until": list(UNTIL),
            "do_sample": False,
            "temperature": 0.0,
            "max_gen_toks": max_gen_toks,
        },
        "metric_list": [
            {
                "metric": "exact_match",
                "aggregation": "mean",
                "higher_is_better": True,
                "ignore_case": True,
                "ignore_punctuation": False,
                "regexes_to_ignore": list(REGEXES_TO_IGNORE),
            }
        ],
        "filter_list": [
            {
                "name": STRICT[0],
                "filter": [{"function": "regex", "regex_pattern": STRICT[1]}, {"function": "take_first"}],
            },
            {
                "name": FLEXIBLE[0],
                "filter": [
                    {"function": "regex", "group_select": -1, "regex_pattern": FLEXIBLE[1]},
                    {"function": "take_first"},
                ],
            },
        ],
        "metadata": {"version": GENERATION_VERSION},
    }


def _write_config(folder: Path, target: Path, name: str, max_gen_toks: int) -> None:
    text = yaml.safe_dump(task_config(target, name, max_gen_toks), sort_keys=False)
    path = folder / f"{name}.yaml"
    if not path.exists() or path.read_text() != text:
        atomic_write_text(path, text)


def build_exact_match_task(
    problems: list[dict], artifacts_dir: str | os.PathLike, *, name: str, max_gen_toks: int = 48
) -> Path:
    """Build (or reuse) the generation task `name` over `problems`; returns the folder to include."""
    if not problems:
        raise ValueError("build_exact_match_task needs at least one problem")
    rows = _rows(problems)
    root = Path(artifacts_dir).resolve() / "lm_eval_tasks"
    folder = root / f"{name}-{content_hash(rows, name, max_gen_toks)}"

    def fill(tmp: Path) -> None:
        (tmp / DATA_FILE).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        _write_config(tmp, folder, name, max_gen_toks)

    build_once(folder, fill, folder=True, ready=lambda f: (f / DATA_FILE).is_file())  # data removed: again
    _write_config(folder, folder, name, max_gen_toks)  # keep the data path absolute and current
    return folder


def arith_task_name(split: str) -> str:
    return f"sekd_arith_{split}"


def build_arith_task(
    split: str,
    artifacts_dir: str | os.PathLike,
    *,
    problems: list[dict] | None = None,
    max_gen_toks: int = 48,
) -> Path:
    """The embedded arithmetic task sekd_arith_<split>; problems=None takes sekd.data.arith.problems(split)."""
    if problems is None:
        from sekd.data.arith import problems as arith_problems

        problems = arith_problems(split)
    return build_exact_match_task(problems, artifacts_dir, name=arith_task_name(split), max_gen_toks=max_gen_toks)
