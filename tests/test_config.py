"""Composition of every preset, and every validation error: one line, naming the key, non-zero exit."""

import pytest
from omegaconf import OmegaConf

from sekd.core.errors import ConfigError

from sekd.stores.runs import config_hash

from sekd.app.checks import validate
from sekd.config.schema import DataConfig, OnPolicyRegime, PositionConfig, RegimeConfig, RunConfig, TrainConfig, rule
from tests.helpers import CONF, PRESETS, ROOT, compose_cfg, sekd_train


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_composes_and_validates(preset):
    cfg = compose_cfg([f"experiment={preset}"])
    assert OmegaConf.get_type(cfg) is RunConfig  # composed against the schema
    run = validate(cfg)
    assert isinstance(run, RunConfig) and isinstance(run.train, TrainConfig) and isinstance(run.data, DataConfig)
    assert run.preset == cfg.preset == preset
    assert run.label
    assert isinstance(run.regime, OnPolicyRegime) == preset.startswith("on_policy")


@pytest.mark.parametrize(
    "group", ["model", "data", "position", "classes", "samples", "criterion", "regime", "train", "eval", "logging"]
)
def test_every_group_option_composes_to_its_own_keys(group):
    """Every option of every group composes against its class (data: a mapping, each source has its own
    keys), and every key its YAML writes is one the class types. tests/test_config_hashes.py checks that
    the schema added no key to what they compose to."""
    for option in sorted(p.stem for p in (CONF / group).glob("*.yaml")):
        cfg = compose_cfg([f"{group}={option}", *(["data=arith"] if group == "regime" else [])])
        written = set(OmegaConf.load(CONF / group / f"{option}.yaml").keys()) - {"defaults"}
        assert written <= set(cfg[group].keys()), (group, option)
        if group != "data":
            assert OmegaConf.get_type(cfg[group]).__module__ == "sekd.config.schema", (group, option)
            assert all(rule(f"{group}.{k}") for k in written), (group, option)


@pytest.mark.parametrize(
    "overrides,key,text",
    [
        (["train.lr=abc"], "train.lr", "could not be converted to Float"),
        (["seed=true"], "seed", "could not be converted to Integer"),
        (["position.options=5"], "position.options", "Dict"),
        (["regime.mix=0.5"], "regime.mix", "Could not override"),  # off-policy has no mix
        (["train.lrr=1"], "train.lrr", "Could not override"),
    ],
)
def test_hydra_itself_refuses_wrong_types_and_unknown_keys(overrides, key, text):
    """Hydra refuses these while composing, against the schema; check_command_line turns each into one
    line (tests/test_bad_inputs.py)."""
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException) as err:
        compose_cfg(overrides)
    assert text in str(err.value) + str(err.value.__cause__)


def test_a_key_appended_past_hydra_is_refused_when_converted():
    cfg = compose_cfg(["+train.lrr=1"])  # Hydra lets `+` add a key to a typed node
    with pytest.raises(ConfigError, match=r"^unknown key 'train.lrr'; allowed in train: betas, chunk_size"):
        validate(cfg)


@pytest.mark.parametrize(
    "build,message",
    [
        (lambda: TrainConfig(lr=-1.0), "train.lr=-1.0 must be a number > 0"),
        (lambda: TrainConfig(betas=[0.9]), "train.betas=[0.9] must be two numbers [beta1, beta2], each in [0, 1)"),
        (lambda: TrainConfig(chunk_size="big"), "train.chunk_size='big' must be an integer > 0"),
        (lambda: TrainConfig(optimizer="sgd"), "train.optimizer='sgd' is not allowed; choose one of: adamw, adam8bit"),
        (lambda: PositionConfig(k=0.0), "position.k=0.0 must be a fraction in (0, 1]"),
        (lambda: PositionConfig(policy="top_k"), "position.signal is required for position.policy=top_k"),
        (lambda: OnPolicyRegime(top_p=0.0), "regime.top_p=0.0 must be a fraction in (0, 1]"),
        (lambda: RegimeConfig(name="on_policy"), "regime.name=on_policy needs the on-policy keys"),
        (lambda: DataConfig(seq_len=128, token_budget=100), "data.token_budget=100 is less than one sequence"),
        (lambda: RunConfig(mode="train"), "mode='train' is not allowed; choose one of: distill"),
    ],
)
def test_each_dataclass_checks_its_own_values(build, message):
    with pytest.raises(ConfigError) as err:
        build()
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_data_keys_split_into_shared_fields_and_the_sources_own():
    run = validate(compose_cfg(["data=gsm8k", "data.max_samples=7"]))
    assert (run.data.name, run.data.seq_len, run.data.max_samples, run.data.answer_tokens) == ("gsm8k", 512, 7, 256)
    assert run.data.options == {
        "path": "openai/gsm8k",
        "train_file": None,
        "validation_file": None,
        "test_file": None,
        "validation_size": 500,
    }
    assert TrainConfig() == validate(compose_cfg([])).train  # the classes' defaults are the embedded profile's


def test_paper_scale_configs_compose():
    cfg = compose_cfg(["experiment=full_kd", "model=qwen3_8b_to_1.7b", "data=fineweb_edu", "train=paper", "eval=paper"])
    validate(cfg)
    assert cfg.model.teacher == "Qwen/Qwen3-8B" and cfg.model.student == "Qwen/Qwen3-1.7B"
    assert cfg.data.seq_len == 512 and cfg.data.token_budget == 80_000_000
    assert (cfg.train.micro_batch_size, cfg.train.grad_accum, cfg.train.lr) == (2, 8, 1e-5)


@pytest.mark.parametrize("name, profile, steps", [("demo", [], 300), ("miniature", ["+profile=miniature"], 1000)])
def test_demo_sweep_composes(name, profile, steps):
    """The grid `make demo` runs, and the same grid under profile=miniature (the CLI finds conf/ itself;
    compose() needs the search path): local subprocesses, three seeds, every method the same steps."""
    cfg = compose_cfg(
        [f"hydra.searchpath=[file://{ROOT / 'conf'}]"], config_dir=ROOT / "sweeps", name=name, hydra_node=True
    )
    params = cfg.hydra.sweeper.params
    assert set(params["experiment"].split(",")) >= {"full_kd", "random_pos", "se_kd", "se_kd3x", "student", "teacher"}
    assert str(params["seed"]).split(",") == ["1337", "1338", "1339"]
    assert cfg.hydra.launcher._target_.endswith("LocalLauncher")
    assert cfg.train.steps == steps
    for preset in params["experiment"].split(","):
        run = validate(compose_cfg([*profile, f"experiment={preset}"]))
        assert run.train.steps == steps
    if profile:
        assert run.model.embedded["teacher"]["keep"] == "best_validation"


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
    res = sekd_train(
        [
            "model=qwen3_8b_to_1.7b",
            f"model.teacher={tmp_path / 'a'}",
            f"model.student={tmp_path / 'b'}",
            f"paths.root={tmp_path}/out",
            "logging=disabled",
        ],
        timeout=120,
    )
    assert res.returncode == 2, res.stderr
    last = res.stderr.strip().splitlines()[-1]
    assert "model.teacher" in last and "tokenizer" in last
    record = tmp_path / "out" / "runs"
    assert not any(record.rglob("record.json")) if record.exists() else True


@pytest.mark.parametrize("preset", ["on_policy_se_kd", "se_kd3x"])
def test_a_saved_config_converts_again(preset):
    """A run's config.yaml (plain, composed long ago) goes through the same schema and checks."""
    from sekd.stores.runs import resolved

    saved = OmegaConf.create(resolved(compose_cfg([f"experiment={preset}"])))
    run = validate(saved)
    assert isinstance(run.regime, OnPolicyRegime) == preset.startswith("on_policy")
    with pytest.raises(ConfigError, match=r"^unknown key 'train.lrr'; allowed in train: "):
        validate(OmegaConf.merge(saved, {"train": {"lrr": 1}}))
