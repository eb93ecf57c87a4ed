"""sekd/data/dataset.py: cached build_packed (keys, hits, concurrency) and the deterministic batch order."""

import json
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from sekd.data.dataset import batches, build_packed, epoch_order, tokenizer_signature
from sekd.data.packing import IGNORE, pack_documents
from sekd.data.sources import SOURCES, DataError
from tests.data.helpers import Counting, same


def test_build_matches_pack_and_caches(tmp_path, tokenizer):
    tok = Counting(tokenizer)
    d = build_packed("embedded", "validation", tok, seq_len=64, token_budget=None, artifacts_dir=tmp_path)
    assert tok.calls > 0
    docs = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in SOURCES.get("embedded")("validation")]
    assert same(d, pack_documents(docs, 64, tokenizer.eos_token_id))
    files = sorted(p.name for p in tmp_path.iterdir())
    pt = [f for f in files if f.endswith(".pt")]
    assert len(pt) == 1 and pt[0].startswith("embedded-validation-")
    assert {f.rsplit(".", 1)[-1] for f in files} == {"pt", "json"}  # the build's lock is gone once released
    path = tmp_path / pt[0]
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["seq_len"] == 64 and meta["n_samples"] == len(d) and meta["tokenizer"] == tokenizer_signature(tokenizer)
    mtime = path.stat().st_mtime_ns

    again = Counting(tokenizer)
    e = build_packed("embedded", "validation", again, seq_len=64, token_budget=None, artifacts_dir=tmp_path)
    assert again.calls == 0 and same(d, e) and path.stat().st_mtime_ns == mtime


def test_cache_key_covers_inputs(tmp_path, tokenizer, other_tokenizer):
    kw = dict(token_budget=640, artifacts_dir=tmp_path)
    build_packed("embedded", "train", tokenizer, seq_len=32, **kw)
    for change in (
        lambda: build_packed("embedded", "train", tokenizer, seq_len=64, **kw),
        lambda: build_packed("embedded", "train", tokenizer, seq_len=32, token_budget=320, artifacts_dir=tmp_path),
        lambda: build_packed("embedded", "test", tokenizer, seq_len=32, **kw),
        lambda: build_packed("embedded", "train", other_tokenizer, seq_len=32, **kw),
    ):
        before = len(list(tmp_path.glob("*.pt")))
        change()
        assert len(list(tmp_path.glob("*.pt"))) == before + 1


def test_jsonl_cache_misses_when_the_file_changes(tmp_path, tokenizer):
    f = tmp_path / "t.jsonl"
    f.write_text("".join(json.dumps({"text": f"line {i} of the corpus"}) + "\n" for i in range(50)))
    a = build_packed(
        "jsonl", "train", tokenizer, seq_len=16, token_budget=None, artifacts_dir=tmp_path / "c", train_file=str(f)
    )
    f.write_text("".join(json.dumps({"text": f"other {i} words here"}) + "\n" for i in range(60)))
    os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 10**9))
    tok = Counting(tokenizer)
    b = build_packed(
        "jsonl", "train", tok, seq_len=16, token_budget=None, artifacts_dir=tmp_path / "c", train_file=str(f)
    )
    assert tok.calls > 0 and not same(a, b)


def test_errors_before_tokenizing(tmp_path, tokenizer):
    with pytest.raises(DataError, match="data.train_file: no such file"):
        build_packed(
            "jsonl", "train", tokenizer, seq_len=16, token_budget=None, artifacts_dir=tmp_path, train_file="nope.jsonl"
        )
    f = tmp_path / "t.jsonl"
    f.write_text('{"text": "hi"}\n')
    with pytest.raises(DataError, match="fewer than 17 tokens"):
        build_packed(
            "jsonl", "train", tokenizer, seq_len=16, token_budget=None, artifacts_dir=tmp_path, train_file=str(f)
        )
    assert not list(tmp_path.glob("*.pt"))


def test_concurrent_builders_share_one_build(tmp_path, tokenizer):
    toks = [Counting(tokenizer) for _ in range(4)]
    barrier = threading.Barrier(4)

    def build(tok):
        barrier.wait()
        return build_packed("embedded", "test", tok, seq_len=32, token_budget=None, artifacts_dir=tmp_path)

    with ThreadPoolExecutor(4) as pool:
        out = list(pool.map(build, toks))
    assert sum(t.calls > 0 for t in toks) == 1  # one built, three loaded
    assert all(same(out[0], o) for o in out[1:])
    assert len(list(tmp_path.glob("*.pt"))) == 1 and not list(tmp_path.glob("*.tmp"))


def test_fineweb_build_with_budget(fineweb_dir, tmp_path, tokenizer):
    opts = dict(path=str(fineweb_dir), heldout_fraction=0.2)
    d = build_packed(
        "fineweb_edu", "train", tokenizer, seq_len=32, token_budget=32 * 30, artifacts_dir=tmp_path, **opts
    )
    assert d.input_ids.shape == (30, 32)
    v = build_packed(
        "fineweb_edu", "validation", tokenizer, seq_len=32, token_budget=32 * 5, artifacts_dir=tmp_path, **opts
    )
    assert len(v) == 5 and not set(v.sample_ids) & set(d.sample_ids)
    assert ((d.labels == IGNORE).sum(1) > 0).any()


# --- batches ----------------------------------------------------------------------------------------


def test_batches_cover_each_sample_once_per_epoch():
    got = list(batches(10, micro_batch_size=3, seed=1))
    assert [len(b) for b in got] == [3, 3, 3, 1]
    assert sorted(sum(got, [])) == list(range(10))
    assert [len(b) for b in batches(10, micro_batch_size=3, seed=1, drop_last=True)] == [3, 3, 3]


def test_batches_deterministic_and_seeded():
    a = list(batches(100, micro_batch_size=4, seed=1337))
    torch.manual_seed(0)  # the global RNG plays no part
    assert list(batches(100, micro_batch_size=4, seed=1337)) == a
    assert list(batches(100, micro_batch_size=4, seed=1338)) != a
    assert list(batches(100, micro_batch_size=4, seed=1337, epoch=1)) != a
    assert epoch_order(100, seed=1337).tolist() == sum(a, [])


def test_batches_accept_packed_data():
    d = pack_documents([[1, 2, 3]] * 20, seq_len=4, eos_id=0)
    assert list(batches(d, micro_batch_size=2, seed=0)) == list(batches(len(d), micro_batch_size=2, seed=0))


@pytest.mark.parametrize("epoch", [0, 3])
def test_resume_from_offset_sees_the_same_remaining_batches(epoch):
    full = list(batches(53, micro_batch_size=4, seed=7, epoch=epoch))
    for k in range(len(full)):
        assert list(batches(53, micro_batch_size=4, seed=7, epoch=epoch, start=4 * k)) == full[k:]
    assert list(batches(53, micro_batch_size=4, seed=7, epoch=epoch, start=53)) == []  # epoch finished
    with pytest.raises(ValueError, match="multiple of micro_batch_size"):
        next(batches(53, micro_batch_size=4, seed=7, start=6))


def test_separator_token_ends_documents(tmp_path, tokenizer):
    """data.separator picks the token that ends each document (Qwen3: <|endoftext|>, not its eos)."""
    sep = tokenizer.convert_ids_to_tokens(7)
    d = build_packed(
        "embedded", "validation", tokenizer, seq_len=64, token_budget=None, artifacts_dir=tmp_path, separator=sep
    )
    docs = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in SOURCES.get("embedded")("validation")]
    assert same(d, pack_documents(docs, 64, 7))
    default = build_packed("embedded", "validation", tokenizer, seq_len=64, token_budget=None, artifacts_dir=tmp_path)
    assert not same(d, default)  # a different separator is a different cache entry
    with pytest.raises(DataError, match="data.separator"):
        build_packed(
            "embedded",
            "validation",
            tokenizer,
            seq_len=64,
            token_budget=None,
            artifacts_dir=tmp_path,
            separator="<no such token>",
        )
