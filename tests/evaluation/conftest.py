"""Shared fixtures: offline Hugging Face settings (before any HF import) and one tiny Qwen3 checkpoint."""

import os

for _k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ[_k] = "1"  # only effective before the first Hugging Face import

import pytest  # noqa: E402


def build_tiny_checkpoint(folder) -> None:
    """A 1000-token byte-level BPE on the corpus' train split and a 2-layer Qwen3, saved together."""
    import torch
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from sekd.data.corpus import load_split

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1000, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(load_split("train"), trainer)
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )
    cfg = transformers.Qwen3Config(
        vocab_size=len(fast),
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        intermediate_size=128,
        tie_word_embeddings=True,
        max_position_embeddings=512,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
    )
    torch.manual_seed(0)
    transformers.Qwen3ForCausalLM(cfg).save_pretrained(folder)
    fast.save_pretrained(folder)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """Built once a session, whichever pytest-xdist worker asks first (read-only for the tests)."""
    from tests.helpers import built_once

    return built_once(tmp_path_factory, "tiny_qwen3", build_tiny_checkpoint)
