"""Shared fixtures: a tiny byte-level BPE tokenizer and local folders shaped like FineWeb-Edu."""

import os

# must precede any Hugging Face import, or it does nothing
for _var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ[_var] = "1"

import pandas as pd
import pytest

EOS = "<|endoftext|>"
FINEWEB_COLUMNS = [
    "text",
    "id",
    "dump",
    "url",
    "file_path",
    "language",
    "language_score",
    "token_count",
    "score",
    "int_score",
]


def make_tokenizer(vocab_size: int = 500):
    """A ByteLevel BPE trained on a slice of the embedded corpus, wrapped as a fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from sekd.data import corpus

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus.load_split("train")[:40], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS)


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="session")
def other_tokenizer():
    """A different vocabulary (400), for cache-key tests."""
    return make_tokenizer(400)


def fineweb_rows(shard: int, n: int) -> pd.DataFrame:
    """n documents with FineWeb-Edu's schema and column types."""
    rows = []
    for i in range(n):
        text = f"Document {shard}.{i}. " + " ".join(f"word{(shard * 7 + i * 3 + j) % 50}" for j in range(20 + i % 30))
        rows.append(
            {
                "text": text,
                "id": f"<urn:uuid:{shard:04d}-{i:06d}>",
                "dump": "CC-MAIN-2024-10",
                "url": f"https://example.org/{shard}/{i}",
                "file_path": f"s3://commoncrawl/crawl-data/CC-MAIN-2024-10/segments/{shard}.warc.gz",
                "language": "en",
                "language_score": 0.95,
                "token_count": len(text.split()),
                "score": 3.2,
                "int_score": 3,
            }
        )
    return pd.DataFrame(rows, columns=FINEWEB_COLUMNS)


@pytest.fixture(scope="session")
def fineweb_dir(tmp_path_factory):
    """A plain folder of parquet shards (only the 'default' config): 4 shards x 100 documents."""
    root = tmp_path_factory.mktemp("fineweb_flat")
    for s in range(4):
        fineweb_rows(s, 100).to_parquet(root / f"{s:03d}_00000.parquet", row_group_size=25)
    return root


@pytest.fixture(scope="session")
def fineweb_mirror(tmp_path_factory):
    """A local mirror of the hub repo's layout, README configs included (default + sample-10BT)."""
    root = tmp_path_factory.mktemp("fineweb_mirror")
    (root / "data" / "CC-MAIN-2024-10").mkdir(parents=True)
    (root / "sample" / "10BT").mkdir(parents=True)
    fineweb_rows(0, 30).to_parquet(root / "data" / "CC-MAIN-2024-10" / "000_00000.parquet")
    fineweb_rows(1, 30).to_parquet(root / "sample" / "10BT" / "000_00000.parquet")
    (root / "README.md").write_text(
        "---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n    path: data/*/*\n"
        "- config_name: sample-10BT\n  data_files:\n  - split: train\n    path: sample/10BT/*\n---\n# mirror\n"
    )
    return root
