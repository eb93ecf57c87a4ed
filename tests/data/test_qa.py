"""sekd/data/qa.py: task sources (arith, gsm8k), answer-only labels, the cache, prompt lengths."""

import json

import pandas as pd
import pytest
import torch

from sekd.data import arith, qa_format
from sekd.data.packing import IGNORE, PackedData
from sekd.data.qa import QA_SOURCES, build_qa, check_qa_source, gsm8k, prompt_ids, prompt_lengths
from sekd.data.sources import DataError
from tests.data.helpers import Counting, same

L = 96  # every arith problem fits the test tokenizer (500-token BPE) at 96

# GSM8K's schema: reasoning with <<calc>> annotations, then "#### <number>"
GSM8K_ROWS = [
    {
        "question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
        "How many clips did Natalia sell altogether in April and May?",
        "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips "
        "altogether in April and May.\n#### 72",
    },
    {
        "question": "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. "
        "How much did she earn?",
        "answer": "Weng earns 12/60 = $<<12/60=0.2>>0.2 per minute.\nWorking 50 minutes, she earned 0.2 x 50 = "
        "$<<0.2*50=10>>10.\n#### 10",
    },
    {
        "question": "James writes a 3-page letter to 2 different friends twice a week. How many pages does he write "
        "a year?",
        "answer": "He writes each friend 3*2=<<3*2=6>>6 pages a week\nSo he writes 6*2=<<6*2=12>>12 pages every "
        "week\nThat means he writes 12*52=<<12*52=624>>624 pages a year\n#### 624",
    },
]


def encode(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def reference(tok, problems, seq_len: int) -> tuple[list[list[int]], list[list[int]], int]:
    """The slow obvious layout, token by token: (input rows, label rows, dropped count)."""
    eos = tok.eos_token_id
    inputs, labels, dropped = [], [], 0
    for p in problems:
        prompt = encode(tok, qa_format.prompt_text(p["question"]))
        target = encode(tok, qa_format.target_text(p["answer"]))
        stream = prompt + target + [eos]
        if len(stream) > seq_len + 1:
            dropped += 1
            continue
        stream += [eos] * (seq_len + 1 - len(stream))
        row_in, row_lab = [], []
        for t in range(seq_len):
            row_in.append(stream[t])
            nxt = t + 1  # position t predicts stream[t + 1]
            is_answer = len(prompt) <= nxt < len(prompt) + len(target)
            ends_answer = nxt == len(prompt) + len(target)
            row_lab.append(stream[nxt] if is_answer or ends_answer else IGNORE)
        inputs.append(row_in)
        labels.append(row_lab)
    return inputs, labels, dropped


def meta_of(artifacts_dir) -> dict:
    (js,) = [p for p in artifacts_dir.iterdir() if p.suffix == ".json"]
    return json.loads(js.read_text())


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_labels_supervise_exactly_the_answer_tokens(tmp_path, tokenizer):
    problems = arith.problems("validation")
    d = build_qa("arith", "validation", tokenizer, seq_len=L, artifacts_dir=tmp_path)
    ref_in, ref_lab, dropped = reference(tokenizer, problems, L)
    assert dropped == 0 and len(d) == len(problems)
    assert d.input_ids.tolist() == ref_in and d.labels.tolist() == ref_lab
    assert len(set(d.sample_ids)) == len(d)
    for i in (0, 1, len(d) - 1):
        sup = d.labels[i][d.labels[i] != IGNORE]
        # the supervised targets are the answer and the eos that ends it, nothing else
        assert tokenizer.decode(sup[:-1]) == qa_format.target_text(problems[i]["answer"])
        assert sup[-1] == tokenizer.eos_token_id


def test_padding_is_eos_and_ignored(tmp_path, tokenizer):
    d = build_qa("arith", "test", tokenizer, seq_len=L, artifacts_dir=tmp_path, max_samples=20)
    eos = tokenizer.eos_token_id
    for row_in, row_lab in zip(d.input_ids, d.labels):
        last = int((row_lab != IGNORE).nonzero().max())  # the position that predicts the final eos
        assert row_lab[last] == eos
        assert (row_lab[last + 1 :] == IGNORE).all()
        assert (row_in[last + 1 :] == eos).all()  # right padding with eos
        assert row_in[last] != eos  # the real text runs up to the final eos


def test_too_long_problems_are_dropped_and_counted(tmp_path, tokenizer):
    problems = arith.problems("validation")
    lengths = sorted(
        len(r)
        for r in [
            encode(tokenizer, qa_format.prompt_text(p["question"]) + qa_format.target_text(p["answer"]))
            for p in problems
        ]
    )
    seq_len = lengths[len(lengths) // 2]  # about half need more than seq_len + 1 tokens
    d = build_qa("arith", "validation", tokenizer, seq_len=seq_len, artifacts_dir=tmp_path)
    ref_in, ref_lab, dropped = reference(tokenizer, problems, seq_len)
    assert 0 < dropped < len(problems)
    assert d.input_ids.tolist() == ref_in and d.labels.tolist() == ref_lab
    meta = meta_of(tmp_path)
    assert meta["n_dropped"] == dropped and meta["n_samples"] == len(d) == len(problems) - dropped
    assert meta["n_problems"] == len(problems)

    with pytest.raises(DataError, match=r"none of its \d+ problems fits data.seq_len=10"):
        build_qa("arith", "validation", tokenizer, seq_len=10, artifacts_dir=tmp_path / "short")


def test_max_samples_caps_rows(tmp_path, tokenizer):
    full = build_qa("arith", "test", tokenizer, seq_len=L, artifacts_dir=tmp_path)
    head = build_qa("arith", "test", tokenizer, seq_len=L, artifacts_dir=tmp_path, max_samples=7)
    assert len(head) == 7 and same(head, full.subset(range(7)))


def test_cache_hit_and_misses(tmp_path, tokenizer, other_tokenizer):
    d = build_qa("arith", "validation", tokenizer, seq_len=L, artifacts_dir=tmp_path, max_samples=50)
    (pt,) = [p for p in tmp_path.iterdir() if p.suffix == ".pt"]
    assert pt.name.startswith("qa-arith-validation-")
    assert {p.name.rsplit(".", 1)[-1] for p in tmp_path.iterdir()} == {"pt", "json"}  # no lock left once built
    mtime = pt.stat().st_mtime_ns

    again = Counting(tokenizer)
    e = build_qa("arith", "validation", again, seq_len=L, artifacts_dir=tmp_path, max_samples=50)
    assert again.calls == 0 and same(d, e) and pt.stat().st_mtime_ns == mtime

    for change in (
        dict(seq_len=L + 8),
        dict(max_samples=40),
        dict(split="test"),
        dict(tokenizer=other_tokenizer),
    ):
        kw = {"split": "validation", "tokenizer": tokenizer, "seq_len": L, "max_samples": 50, **change}
        counting = Counting(kw.pop("tokenizer"))
        build_qa("arith", kw.pop("split"), counting, artifacts_dir=tmp_path, **kw)
        assert counting.calls > 0, f"{change} hit the cache"
    assert len([p for p in tmp_path.iterdir() if p.suffix == ".pt"]) == 5


def test_prompt_lengths_and_ids_match_the_prompt_tokenization(tmp_path, tokenizer):
    problems = arith.problems("test", 30)
    d = build_qa("arith", "test", tokenizer, seq_len=L, artifacts_dir=tmp_path, max_samples=30)
    lengths = prompt_lengths(d)
    assert lengths.dtype == torch.long and lengths.shape == (len(d),)
    for i, p in enumerate(problems):
        expect = encode(tokenizer, qa_format.prompt_text(p["question"]))
        assert lengths[i] == len(expect)
        assert prompt_ids(d, i).tolist() == expect
        assert tokenizer.decode(prompt_ids(d, i)).endswith("\nAnswer:")
    with pytest.raises(ValueError, match="no supervised label"):
        prompt_lengths(PackedData(d.input_ids[:1], torch.full_like(d.labels[:1], IGNORE), d.sample_ids[:1]))


def test_separator_ends_the_answer(tmp_path, tokenizer):
    d = build_qa(
        "arith", "test", tokenizer, seq_len=L, artifacts_dir=tmp_path, max_samples=3, separator="<|endoftext|>"
    )
    assert (d.labels != IGNORE).any()
    with pytest.raises(DataError, match="data.separator='<nope>'"):
        build_qa("arith", "test", tokenizer, seq_len=L, artifacts_dir=tmp_path, separator="<nope>")


def test_gsm8k_from_local_jsonl(tmp_path, tokenizer):
    train = write_jsonl(tmp_path / "train.jsonl", GSM8K_ROWS)
    test = write_jsonl(tmp_path / "test.jsonl", GSM8K_ROWS[:1])
    assert gsm8k("test", train_file=train, test_file=test) == GSM8K_ROWS[:1]
    # no validation_file: validation is carved off train's end (at most a tenth: none of 3)
    assert gsm8k("train", train_file=train) == GSM8K_ROWS and gsm8k("validation", train_file=train) == []
    val = write_jsonl(tmp_path / "val.jsonl", GSM8K_ROWS[2:])
    assert gsm8k("validation", train_file=train, validation_file=val) == GSM8K_ROWS[2:]

    d = build_qa(
        "gsm8k", "train", tokenizer, seq_len=512, artifacts_dir=tmp_path / "c", train_file=train, test_file=test
    )
    ref_in, ref_lab, _ = reference(tokenizer, GSM8K_ROWS, 512)
    assert d.input_ids.tolist() == ref_in and d.labels.tolist() == ref_lab
    finals = [qa_format.final_answer(tokenizer.decode(row[row != IGNORE][:-1])) for row in d.labels]
    assert finals == ["72", "10", "624"]

    with pytest.raises(DataError, match="data.test_file is not set"):
        build_qa("gsm8k", "test", tokenizer, seq_len=512, artifacts_dir=tmp_path / "c", train_file=train)


def test_gsm8k_file_edit_misses_the_cache(tmp_path, tokenizer):
    train = tmp_path / "train.jsonl"
    write_jsonl(train, GSM8K_ROWS)
    a = build_qa("gsm8k", "train", tokenizer, seq_len=512, artifacts_dir=tmp_path / "c", train_file=str(train))
    write_jsonl(train, GSM8K_ROWS[:2])
    b = build_qa("gsm8k", "train", tokenizer, seq_len=512, artifacts_dir=tmp_path / "c", train_file=str(train))
    assert len(a) == 3 and len(b) == 2


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"question": "How many?"}', "record has no field 'answer'"),
        ('{"answer": "#### 1"}', "record has no field 'question'"),
        ('{"question": "How many?", "answer": 7}', "field 'answer' is int, not a string"),
        ("not json", "not valid JSON"),
        ('["question", "answer"]', "record is list, not an object"),
    ],
)
def test_gsm8k_bad_line_names_file_and_line(tmp_path, tokenizer, line, message):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(GSM8K_ROWS[0]) + "\n\n" + line + "\n")
    with pytest.raises(DataError, match=rf"{bad}:3: {message}"):
        build_qa("gsm8k", "train", tokenizer, seq_len=512, artifacts_dir=tmp_path, train_file=str(bad))


def test_gsm8k_hub_layout_from_a_local_mirror(tmp_path):
    """The hub path ("main" config, train/test) read from a folder shaped like openai/gsm8k."""
    (tmp_path / "main").mkdir()
    rows = [{"question": f"Q{i}?", "answer": f"{i} + 1 = {i + 1}\n#### {i + 1}"} for i in range(40)]
    pd.DataFrame(rows).to_parquet(tmp_path / "main" / "train-00000-of-00001.parquet")
    pd.DataFrame(GSM8K_ROWS).to_parquet(tmp_path / "main" / "test-00000-of-00001.parquet")
    (tmp_path / "README.md").write_text(
        "---\nconfigs:\n- config_name: main\n  data_files:\n  - split: train\n    path: main/train-*\n"
        "  - split: test\n    path: main/test-*\n---\n# mirror\n"
    )
    path = str(tmp_path)
    assert gsm8k("train", path=path) == rows[:36] and gsm8k("validation", path=path) == rows[36:]
    assert gsm8k("test", path=path) == GSM8K_ROWS


def test_check_qa_source(tmp_path):
    assert QA_SOURCES.names() == ["arith", "gsm8k"]
    check_qa_source("arith", {})
    check_qa_source("gsm8k", {})
    train = write_jsonl(tmp_path / "t.jsonl", GSM8K_ROWS)
    check_qa_source("gsm8k", {"train_file": train, "validation_file": None})
    with pytest.raises(DataError, match="unknown task source 'mmlu'"):
        check_qa_source("mmlu", {})
    with pytest.raises(DataError, match=r"data.train_file: task source 'arith' takes no option"):
        check_qa_source("arith", {"train_file": train})
    with pytest.raises(DataError, match=r"data.text_field: task source 'gsm8k' takes no option"):
        check_qa_source("gsm8k", {"text_field": "text"})
    with pytest.raises(DataError, match=r"data.test_file: no such file"):
        check_qa_source("gsm8k", {"train_file": train, "test_file": str(tmp_path / "missing.jsonl")})
    with pytest.raises(DataError, match=r"data.path: no such folder"):
        check_qa_source("gsm8k", {"path": str(tmp_path / "nowhere")})
    with pytest.raises(DataError, match="unknown split 'dev'"):
        build_qa("arith", "dev", None, seq_len=8, artifacts_dir=tmp_path)
