"""Composition of every preset, and every validation error: one line, naming the key, non-zero exit."""
import json

import pytest
from omegaconf import OmegaConf

from sekd.config import ConfigError, config_hash, validate
from tests.helpers import PRESETS, ROOT, compose_cfg, sekd_train


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_composes_and_validates(preset):
    cfg = compose_cfg([f"experiment={preset}"])
    validate(cfg)
    assert cfg.preset == preset
    assert cfg.label


def test_paper_scale_configs_compose():
    cfg = compose_cfg(["experiment=full_kd", "model=qwen3_8b_to_1.7b", "data=fineweb_edu", "train=paper",
                       "eval=paper"])
    validate(cfg)
    assert cfg.model.teacher == "Qwen/Qwen3-8B" and cfg.model.student == "Qwen/Qwen3-1.7B"
    assert cfg.data.seq_len == 512 and cfg.data.token_budget == 80_000_000
    assert (cfg.train.micro_batch_size, cfg.train.grad_accum, cfg.train.lr) == (2, 8, 1e-5)


def test_demo_sweep_composes():
    """The grid `make demo` runs (the CLI finds conf/ itself; compose() needs the search path)."""
    cfg = compose_cfg([f"hydra.searchpath=[file://{ROOT / 'conf'}]"], config_dir=ROOT / "sweeps", name="demo",
                      hydra_node=True)
    params = cfg.hydra.sweeper.params
    assert set(params["experiment"].split(",")) >= {"full_kd", "random_pos", "se_kd", "student", "teacher"}
    for preset in params["experiment"].split(","):
        validate(compose_cfg([f"experiment={preset}"]))


def test_config_hash_ignores_logging_but_not_training():
    a = compose_cfg(["experiment=full_kd"])
    assert config_hash(a) == config_hash(compose_cfg(["experiment=full_kd", "logging=disabled"]))
    assert config_hash(a) != config_hash(compose_cfg(["experiment=full_kd", "train.lr=0.5"]))
    assert config_hash(a) != config_hash(compose_cfg(["experiment=full_kd", "seed=1"]))


BAD = [
    (["position.signal=entropyy", "position.policy=top_k"], "position.signal"),
    (["position.k=1.5"], "position.k"),
    (["position.k=0"], "position.k"),
    (["train.lr=-0.001"], "train.lr"),
    (["+train.lrr=0.1"], "train.lrr"),
    (["criterion.name=kll"], "criterion.name"),
    (["mode=train"], "mode"),
    (["data=jsonl", "data.train_file=/no/such/file.jsonl"], "data.train_file"),
    (["data=jsonl"], "data.train_file"),
]


@pytest.mark.parametrize("overrides,key", BAD)
def test_validation_errors_name_the_key(overrides, key):
    cfg = compose_cfg(overrides)
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    msg = str(err.value)
    assert key in msg and "\n" not in msg


@pytest.mark.parametrize("overrides,key", [BAD[0], BAD[1], BAD[3], BAD[7]])
def test_cli_fails_with_one_line_before_loading_anything(tmp_path, overrides, key):
    res = sekd_train([*overrides, f"paths.root={tmp_path}", f"paths.cache={tmp_path}/cache"], timeout=120)
    assert res.returncode == 2, res.stderr
    lines = [ln for ln in res.stderr.strip().splitlines() if ln.strip()]
    assert lines[-1].startswith("sekd: config error:") and key in lines[-1]
    assert not (tmp_path / "cache").exists()  # nothing built, nothing loaded
    assert not (tmp_path / "runs").exists()


def test_tokenizer_mismatch_is_refused_before_weights_load(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    for name, text in (("a", "the cat sat on the mat " * 50), ("b", "lorem ipsum dolor sit amet " * 50)):
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel()
        tok.train_from_iterator([text], trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"]))
        PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>").save_pretrained(tmp_path / name)
    res = sekd_train(["model=qwen3_8b_to_1.7b", f"model.teacher={tmp_path / 'a'}", f"model.student={tmp_path / 'b'}",
                      f"paths.root={tmp_path}/out", "logging=disabled"], timeout=120)
    assert res.returncode == 2, res.stderr
    last = res.stderr.strip().splitlines()[-1]
    assert "model.teacher" in last and "tokenizer" in last
    record = tmp_path / "out" / "runs"
    assert not any(record.rglob("record.json")) if record.exists() else True
