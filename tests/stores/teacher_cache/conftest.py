"""Tiny teacher (a 1-layer Qwen3, hidden 32) with a tiny BPE tokenizer, tiny packed data, and a built cache."""

import os

for _var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ[_var] = "1"

import shutil
from pathlib import Path

import pytest
import torch

from sekd.data.packing import PackedData, pack_documents
from tests.stores.teacher_cache.helpers import BUILD, PAD_ROWS, SPEC

torch.set_num_threads(1)


def tiny_tokenizer(vocab_size: int = 300):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from sekd.data import corpus

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus.load_split("train")[:20], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory) -> Path:
    """An HF folder: tiny Qwen3 teacher (random weights, sharpened head) + its tokenizer."""
    from transformers import Qwen3ForCausalLM

    from sekd.embedded.build import qwen3_config

    out = tmp_path_factory.mktemp("teacher")
    tok = tiny_tokenizer()
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(qwen3_config(SPEC, len(tok) + PAD_ROWS, tok.eos_token_id))
    with torch.no_grad():  # a peakier p than random init gives, so draws repeat (counts > 1)
        model.get_output_embeddings().weight.mul_(40.0)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def teacher(teacher_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def vocab(teacher) -> int:
    return teacher.get_output_embeddings().weight.shape[0] - PAD_ROWS


@pytest.fixture(scope="session")
def data(vocab) -> PackedData:
    """~14 samples of length 24 with document boundaries (some labels -100), plus one duplicate row."""
    g = torch.Generator().manual_seed(1)
    docs = [torch.randint(1, vocab, (int(n),), generator=g).tolist() for n in torch.randint(2, 30, (25,), generator=g)]
    d = pack_documents(docs, 24, eos_id=0)
    return d.subset(list(range(len(d))) + [0])  # identical windows share one id and one cache entry


@pytest.fixture(scope="session")
def data_file(data, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "data.pt"
    data.save(path)
    return path


@pytest.fixture(scope="session")
def built(teacher, data, vocab, tmp_path_factory) -> Path:
    """A complete cache of `data`, built in one uninterrupted run (read-only for tests: copy to modify)."""
    from sekd.stores.teacher_cache.build import build_cache

    out = tmp_path_factory.mktemp("cache") / "c"
    build_cache(teacher, data, out, vocab_size=vocab, **BUILD)
    return out


@pytest.fixture
def cache_copy(built, tmp_path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(built, dst)
    return dst


@pytest.fixture(scope="session")
def every_kind(teacher, data, vocab, tmp_path_factory) -> dict[Path, object]:
    """One cache per cacheable kind, all built in one teacher pass (folder -> kind; read-only for tests)."""
    from sekd.stores.teacher_cache.build import build_caches
    from tests.stores.teacher_cache.helpers import cacheable_kinds

    root = tmp_path_factory.mktemp("kinds")
    outs = {root / k.label(): k for k in cacheable_kinds()}
    opts = {k: v for k, v in BUILD.items() if k != "n_draws"}
    build_caches(teacher, data, outs, vocab_size=vocab, **{**opts, "num_shards": 2})
    return outs
