"""sekd/data/arith.py: the embedded arithmetic word problems (disjoint hash splits, correct answers)."""

import re

import pytest

from sekd.data import arith, qa_format


def test_splits_are_disjoint_sized_and_cover_every_problem():
    qs = {s: [p["question"] for p in arith.problems(s)] for s in arith.SPLITS}
    for s, q in qs.items():
        assert len(q) == len(set(q)), f"{s} repeats a question"
    assert not set(qs["train"]) & set(qs["validation"])
    assert not set(qs["train"]) & set(qs["test"])
    assert not set(qs["validation"]) & set(qs["test"])
    assert 2000 <= len(qs["train"]) <= 5000
    assert 200 <= len(qs["validation"]) <= 600 and 200 <= len(qs["test"]) <= 600
    # every (a, op, b, template) with a result >= 0 is in exactly one split
    n_add = len(arith.TEMPLATES["+"]) * (arith.MAX_OPERAND + 1) ** 2
    n_sub = len(arith.TEMPLATES["-"]) * (arith.MAX_OPERAND + 1) * (arith.MAX_OPERAND + 2) // 2
    assert sum(map(len, qs.values())) == n_add + n_sub


def test_deterministic_and_prefixes():
    first = {s: arith.problems(s) for s in arith.SPLITS}
    arith._all.cache_clear()  # regenerate from scratch, not from the memo
    assert {s: arith.problems(s) for s in arith.SPLITS} == first
    assert arith.problems("test", 10) == first["test"][:10]
    assert arith.problems("test", 0) == []
    # callers may edit what they get without touching the memo
    arith.problems("train", 1)[0]["question"] = "changed"
    assert arith.problems("train", 1) == first["train"][:1]


def test_first_problems_mix_templates_and_operations():
    head = arith.problems("train", 60)
    ops = {p["answer"].split()[1] for p in head}
    starts = {p["question"].split()[0] for p in head}
    assert ops == {"+", "-"} and len(starts) >= 4


def test_answers_are_correct_arithmetic():
    for split in arith.SPLITS:
        for p in arith.problems(split):
            m = re.fullmatch(r"(\d+) ([+-]) (\d+) = (\d+)\. #### (\d+)", p["answer"])
            assert m, p["answer"]
            a, op, b, c, final = int(m[1]), m[2], int(m[3]), int(m[4]), m[5]
            assert c == (a + b if op == "+" else a - b) >= 0
            assert 0 <= a <= arith.MAX_OPERAND and 0 <= b <= arith.MAX_OPERAND
            assert qa_format.final_answer(qa_format.target_text(p["answer"])) == final == str(c)
            # the question states the operands, in the order the answer uses them
            assert [int(x) for x in re.findall(r"\d+", p["question"])] == [a, b]


def test_split_is_by_key_hash_not_position(monkeypatch):
    """Adding a template leaves every existing problem in its split."""
    before = {s: {p["question"] for p in arith.problems(s)} for s in arith.SPLITS}
    extra = {**arith.TEMPLATES, "+": (*arith.TEMPLATES["+"], "Ann sees {a} cats and {b} dogs. How many pets?")}
    monkeypatch.setattr(arith, "TEMPLATES", extra)
    arith._all.cache_clear()
    try:
        after = {s: {p["question"] for p in arith.problems(s)} for s in arith.SPLITS}
        for s in arith.SPLITS:
            assert before[s] <= after[s]
    finally:
        monkeypatch.undo()
        arith._all.cache_clear()


def test_signature_tracks_the_generator(monkeypatch):
    sig = arith.signature()
    assert sig == arith.signature() and re.fullmatch(r"[0-9a-f]{16}", sig)
    monkeypatch.setattr(arith, "MAX_OPERAND", 30)
    assert arith.signature() != sig
    monkeypatch.undo()
    monkeypatch.setattr(arith, "VERSION", arith.VERSION + 1)
    assert arith.signature() != sig


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        arith.problems("dev")
    with pytest.raises(ValueError, match="n must be >= 0"):
        arith.problems("train", -1)
