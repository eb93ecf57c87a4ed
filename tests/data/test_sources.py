"""sekd/data/sources.py: embedded, jsonl and fineweb_edu (local parquet folders), and check_source."""

import json

import pandas as pd
import pytest

from sekd.data.packing import pack_documents
from sekd.data.sources import SOURCES, DataError, check_source, heldout_split
from sekd.core.registry import RegistryError


def one_line(exc) -> str:
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


def test_registry_names():
    assert {"embedded", "jsonl", "fineweb_edu"} <= set(SOURCES.names())


def test_embedded_splits_are_disjoint():
    splits = {s: list(SOURCES.get("embedded")(s)) for s in ("train", "validation", "test")}
    assert all(splits.values()) and all(isinstance(t, str) for t in splits["train"])
    assert not set(splits["train"]) & set(splits["validation"])
    assert not set(splits["train"]) & set(splits["test"])


def test_unknown_split():
    with pytest.raises(DataError, match="known: train, validation, test"):
        list(SOURCES.get("embedded")("dev"))


# --- jsonl -------------------------------------------------------------------------------------------


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_jsonl_reads_text_field(tmp_path):
    f = write_jsonl(tmp_path / "train.jsonl", [{"text": "a b"}, {"text": "c", "x": 1}, {"body": "d", "text": "e"}])
    (tmp_path / "train.jsonl").write_text(f.read_text() + "\n")  # a blank line is skipped
    assert list(SOURCES.get("jsonl")("train", train_file=str(f))) == ["a b", "c", "e"]
    g = write_jsonl(tmp_path / "val.jsonl", [{"body": "v"}])
    assert list(SOURCES.get("jsonl")("validation", train_file=str(f), validation_file=str(g), text_field="body")) == [
        "v"
    ]


def test_jsonl_missing_file(tmp_path):
    with pytest.raises(DataError) as e:
        list(SOURCES.get("jsonl")("train", train_file=str(tmp_path / "nope.jsonl")))
    assert one_line(e).startswith("data.train_file: no such file") and "nope.jsonl" in str(e.value)
    with pytest.raises(DataError) as e:
        list(SOURCES.get("jsonl")("validation", train_file=str(tmp_path / "nope.jsonl")))
    assert one_line(e).startswith("data.validation_file is not set")


def test_jsonl_missing_field_names_file_and_line(tmp_path):
    f = write_jsonl(tmp_path / "t.jsonl", [{"text": "ok"}, {"txt": "typo"}])
    with pytest.raises(DataError) as e:
        list(SOURCES.get("jsonl")("train", train_file=str(f)))
    assert one_line(e) == f"{f}:2: record has no field 'text' (data.text_field)"
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{not json\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: not valid JSON"):
        list(SOURCES.get("jsonl")("train", train_file=str(tmp_path / "bad.jsonl")))


def test_check_source(tmp_path):
    f = write_jsonl(tmp_path / "t.jsonl", [{"text": "ok"}])
    check_source("jsonl", {"train_file": str(f), "text_field": "text"})
    check_source("embedded", {})
    with pytest.raises(RegistryError) as e:
        check_source("fineweb", {})
    assert "known: embedded, fineweb_edu, jsonl" in one_line(e)
    with pytest.raises(RegistryError, match="data.train_fle"):
        check_source("jsonl", {"train_fle": str(f)})
    with pytest.raises(DataError) as e:
        check_source("jsonl", {"train_file": str(f), "validation_file": str(tmp_path / "v.jsonl")})
    assert one_line(e).startswith("data.validation_file: no such file")
    with pytest.raises(DataError, match="data.train_file is not set"):
        check_source("jsonl", {"train_file": None})
    with pytest.raises(DataError, match="data.heldout_fraction"):
        check_source("fineweb_edu", {"heldout_fraction": 0})
    with pytest.raises(DataError, match="data.path: no such folder"):
        check_source("fineweb_edu", {"path": str(tmp_path / "missing")})
    check_source("fineweb_edu", {})  # a hub name is not checked: no download


# --- fineweb_edu -----------------------------------------------------------------------------------


def all_rows(folder):
    return pd.concat([pd.read_parquet(p) for p in sorted(folder.rglob("*.parquet"))])


def test_fineweb_local_folder_splits_partition_the_stream(fineweb_dir):
    src = SOURCES.get("fineweb_edu")
    opts = dict(path=str(fineweb_dir), heldout_fraction=0.2)
    got = {s: list(src(s, **opts)) for s in ("train", "validation", "test")}
    rows = all_rows(fineweb_dir)
    assert sorted(sum(got.values(), [])) == sorted(rows["text"])  # a partition of the documents
    assert got["validation"] and got["test"] and not set(got["train"]) & set(got["validation"] + got["test"])
    # decided by the document's id, not by its position
    expected = {s: [t for t, i in zip(rows["text"], rows["id"]) if heldout_split(i, 0.2) == s] for s in got}
    assert {s: sorted(v) for s, v in got.items()} == {s: sorted(v) for s, v in expected.items()}
    assert 0.1 < len(got["validation"] + got["test"]) / len(rows) < 0.3
    assert list(src("validation", **opts)) == got["validation"]  # deterministic


def test_fineweb_default_heldout_is_small(fineweb_dir):
    train = list(SOURCES.get("fineweb_edu")("train", path=str(fineweb_dir)))
    assert len(train) >= 395  # of 400 documents, about 0.1% held out


def test_fineweb_local_mirror_uses_subset(fineweb_mirror):
    src = SOURCES.get("fineweb_edu")
    sample = list(src("train", path=str(fineweb_mirror), heldout_fraction=1e-9))
    assert sample and all(t.startswith("Document 1.") for t in sample)  # sample/10BT only
    default = list(src("train", path=str(fineweb_mirror), subset=None, heldout_fraction=1e-9))
    assert default and all(t.startswith("Document 0.") for t in default)
    with pytest.raises(DataError, match="data.subset: 'sample-100BT' is not a config"):
        list(src("train", path=str(fineweb_mirror), subset="sample-100BT"))


def test_fineweb_missing_text_field(fineweb_dir):
    with pytest.raises(DataError, match="data.text_field: .* no column 'content'"):
        list(SOURCES.get("fineweb_edu")("train", path=str(fineweb_dir), text_field="content"))


def test_fineweb_streams_and_packing_stops_early(fineweb_dir, tokenizer):
    pulled = []

    def tokens():
        for text in SOURCES.get("fineweb_edu")("train", path=str(fineweb_dir)):
            pulled.append(text)
            yield tokenizer(text, add_special_tokens=False)["input_ids"]

    d = pack_documents(tokens(), seq_len=32, eos_id=tokenizer.eos_token_id, token_budget=32 * 20)
    assert d.input_ids.shape == (20, 32)
    assert 0 < len(pulled) < 100  # of ~400 documents in the stream
    assert (d.labels == tokenizer.eos_token_id).any() and (d.labels == -100).any()


def test_check_source_reads_every_line_and_sees_a_fixed_file(tmp_path):
    """Validation reads the file through (a bad last line stops the run up front); the reading is
    remembered per size and mtime, so a file the user fixes is read again."""
    lines = [json.dumps({"text": f"doc {i}"}) for i in range(50)]
    f = tmp_path / "t.jsonl"
    f.write_text("\n".join(lines + ["{oops"]) + "\n")
    with pytest.raises(DataError) as e:
        check_source("jsonl", {"train_file": str(f)})
    assert one_line(e) == f"{f}:51: not valid JSON (Expecting property name enclosed in double quotes)"
    with pytest.raises(DataError, match=r"v.jsonl: holds no records"):
        (tmp_path / "v.jsonl").write_text("\n\n")
        check_source("jsonl", {"train_file": str(tmp_path / "v.jsonl")})
    f.write_text("\n".join(lines) + "\n")
    check_source("jsonl", {"train_file": str(f)})
    f.write_bytes(f.read_bytes() + b'{"text": "\xff"}\n')
    with pytest.raises(DataError, match=r"t.jsonl:51: not UTF-8 \(byte 0xff at column 11\)"):
        check_source("jsonl", {"train_file": str(f)})
