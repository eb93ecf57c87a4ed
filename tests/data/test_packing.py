"""sekd/data/packing.py: boundary masks (docs/method.md §1 valid(t)), token budget, content ids, save/load."""

import hashlib
import random

import pytest
import torch

from sekd.data.packing import IGNORE, PackedData, pack_documents, sample_id

EOS = 0


def reference_pack(docs, L, eos, token_budget=None):
    """The obvious slow version: one python list, one window at a time."""
    stream, starts = [], set()
    for d in docs:
        if not d:
            continue  # empty documents are skipped
        starts.add(len(stream))
        stream += list(d) + [eos]
    inputs, labels = [], []
    k = 0
    while k * L + L + 1 <= len(stream) and (token_budget is None or (k + 1) * L <= token_budget):
        inputs.append(stream[k * L : k * L + L])
        labels.append([IGNORE if k * L + t + 1 in starts else stream[k * L + t + 1] for t in range(L)])
        k += 1
    return inputs, labels


def random_docs(rng, n, max_len=40, vocab=(1, 99)):
    # lengths include 0 (a lone eos) and documents longer than a window
    return [
        [rng.randint(*vocab) for _ in range(rng.choice([0, 1, 2, 5, max_len, rng.randint(0, max_len)]))]
        for _ in range(n)
    ]


def test_hand_example():
    # stream 1 2 <eos> 3 <eos>; windows [1 2 0] and [0 3 0]
    d = pack_documents([[1, 2], [3]], seq_len=2, eos_id=EOS)
    assert d.input_ids.tolist() == [[1, 2], [0, 3]]
    assert d.labels.tolist() == [[2, 0], [IGNORE, 0]]  # predicting 3 crosses a boundary; eos is valid


@pytest.mark.parametrize("L", [1, 2, 7, 16])
@pytest.mark.parametrize("budget", [None, 50, 160])
def test_matches_reference(L, budget):
    rng = random.Random(L * 1000 + (budget or 0))
    docs = random_docs(rng, 60)
    d = pack_documents(iter(docs), seq_len=L, eos_id=EOS, token_budget=budget)
    inputs, labels = reference_pack(docs, L, EOS, budget)
    assert d.input_ids.dtype == d.labels.dtype == torch.long
    assert d.input_ids.tolist() == inputs
    assert d.labels.tolist() == labels
    assert d.input_ids.shape == (len(inputs), L)


def test_masks_exactly_at_document_starts_and_eos_targets_valid():
    rng = random.Random(0)
    docs = random_docs(rng, 80, max_len=30)
    L = 8
    d = pack_documents(docs, seq_len=L, eos_id=EOS)
    stream, first = [], []
    for doc in filter(None, docs):
        first.append(len(stream))
        stream += doc + [EOS]
    n_targets = len(d) * L  # targets are stream[1 .. n_targets]
    masked = (d.labels == IGNORE).reshape(-1).nonzero().flatten() + 1  # stream position of each masked target
    assert masked.tolist() == [p for p in first if 1 <= p <= n_targets]
    ends = sum(1 for p, t in enumerate(stream[1 : n_targets + 1], 1) if t == EOS)
    assert int((d.labels == EOS).sum()) == ends  # every eos target kept


def test_every_stream_token_after_the_first_is_a_target_once():
    docs = [list(range(1 + 10 * i, 1 + 10 * i + 5)) for i in range(30)]  # distinct tokens
    L = 6
    d = pack_documents(docs, seq_len=L, eos_id=EOS)
    stream = [t for doc in docs for t in doc + [EOS]]
    n = len(d) * L
    assert len(d) == (len(stream) - 1) // L  # only the trailing partial window is dropped
    assert d.input_ids.reshape(-1).tolist() == stream[:n]
    assert d.labels.reshape(-1).tolist() == [IGNORE if p % 6 == 0 else stream[p] for p in range(1, n + 1)]


def test_token_budget_caps_and_stops_reading():
    pulled = []

    def docs():
        for i in range(1000):
            pulled.append(i)
            yield [1 + i % 50] * 9  # 10 tokens with eos

    d = pack_documents(docs(), seq_len=16, eos_id=EOS, token_budget=100)
    assert len(d) == 100 // 16 and len(d) * 16 <= 100
    # 6 windows need 6*16+1 = 97 stream tokens = 10 documents, and no more were read
    assert len(pulled) == 10
    assert len(pack_documents(docs(), seq_len=16, eos_id=EOS, token_budget=15)) == 0


def test_short_input_gives_empty_data():
    d = pack_documents([[1, 2]], seq_len=8, eos_id=EOS)
    assert len(d) == 0 and d.input_ids.shape == (0, 8)


def test_sample_ids_are_content_hashes():
    doc = [1, 2, 3, 4, 5, 6, 7]  # 8 tokens with eos = exactly one window step
    d = pack_documents([[9] * 7] + [doc] * 6, seq_len=8, eos_id=EOS)
    assert len(set(d.sample_ids[1:])) == 1  # identical windows share an id
    assert d.sample_ids[0] != d.sample_ids[1]  # different ones do not
    row = d.input_ids[2], d.labels[2]
    expected = hashlib.sha256(row[0].numpy().astype("<i8").tobytes() + row[1].numpy().astype("<i8").tobytes())
    assert d.sample_ids[2] == expected.hexdigest()[:16] == sample_id(*row)
    # independent of what precedes it in the dataset
    e = pack_documents([doc] * 6, seq_len=8, eos_id=EOS)
    assert e.sample_ids[0] == d.sample_ids[1]
    assert pack_documents([[9] * 7] + [doc] * 6, seq_len=8, eos_id=EOS).sample_ids == d.sample_ids
    # a mask change alone changes the id
    masked = d.labels[2].clone()
    masked[3] = IGNORE
    assert sample_id(d.input_ids[2], masked) != d.sample_ids[2]


def test_subset_keeps_rows_and_ids():
    d = pack_documents(random_docs(random.Random(1), 50), seq_len=5, eos_id=EOS)
    s = d.subset([4, 0, 2])
    assert torch.equal(s.input_ids, d.input_ids[[4, 0, 2]])
    assert torch.equal(s.labels, d.labels[[4, 0, 2]])
    assert s.sample_ids == [d.sample_ids[i] for i in (4, 0, 2)]
    assert len(d.subset(torch.tensor([], dtype=torch.long))) == 0


def test_save_load_round_trip(tmp_path):
    d = pack_documents(random_docs(random.Random(2), 50, vocab=(1, 151_935)), seq_len=7, eos_id=151_643)
    path = tmp_path / "sub" / "packed.pt"
    d.save(path)
    assert sorted(p.name for p in path.parent.iterdir()) == ["packed.pt"]  # no temp file left behind
    e = PackedData.load(path)
    assert e.input_ids.dtype == e.labels.dtype == torch.long
    assert torch.equal(e.input_ids, d.input_ids) and torch.equal(e.labels, d.labels)
    assert e.sample_ids == d.sample_ids
    assert [sample_id(a, b) for a, b in zip(e.input_ids, e.labels)] == e.sample_ids


def test_load_refuses_another_format(tmp_path):
    torch.save(
        {"format": 999, "input_ids": torch.zeros(1, 2), "labels": torch.zeros(1, 2), "sample_ids": ["x"]},
        tmp_path / "x.pt",
    )
    with pytest.raises(ValueError, match="format"):
        PackedData.load(tmp_path / "x.pt")
