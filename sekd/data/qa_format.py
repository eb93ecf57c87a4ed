"""The one prompt/answer layout of task-specific data (docs/method.md §10), shared by training and scoring.

A problem is {"question": str, "answer": str}; GSM8K's answers end in "#### <number>", and the
embedded arithmetic task writes its answers the same way, so one exact-match rule scores both.

    prompt = "Question: <question>\\nAnswer:"        (no teacher supervision)
    target = " <answer>" + eos                       (KD on these tokens only)
"""

from __future__ import annotations

import re

PROMPT = "Question: {question}\nAnswer:"
TARGET = " {answer}"
FINAL_ANSWER = re.compile(r"#### (\-?[0-9\.\,]+)")  # the same rule as lm-eval's gsm8k "strict-match"


def prompt_text(question: str) -> str:
    return PROMPT.format(question=question.strip())


def target_text(answer: str) -> str:
    return TARGET.format(answer=answer.strip())


def final_answer(text: str) -> str | None:
    """The number after '#### ' (commas dropped), or None when the text has none."""
    m = FINAL_ANSWER.search(text)
    return m.group(1).replace(",", "").rstrip(".") if m else None
