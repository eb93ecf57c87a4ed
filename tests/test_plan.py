"""`sekd-train ... --plan` / `sekd-plan` (sekd/app/plan.py): the memory of a run per device, before anything loads.
The paper's pair is planned offline from the built-in table (its configs are not on disk), its numbers hang
together across micro-batches and distributed modes, and one small real shape's measured CPU peak is
within 20% of the plan's (benchmarks/plan_check.py does the same at more shapes)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from sekd.app import plan as P
from sekd.core.errors import ConfigError
from tests.helpers import ROOT

PAPER = ["experiment=se_kd", "model=qwen3_8b_to_1.7b", "data=fineweb_edu", "train=paper"]
OFFLINE = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "WANDB_MODE": "offline",
    "OMP_NUM_THREADS": "1",
}


def cli(args: list[str], tmp_path, **env) -> subprocess.CompletedProcess:
    """`python -m sekd.train <args>` offline, with an empty Hugging Face home (nothing of the hub on disk)."""
    full = {**os.environ, **OFFLINE, "HF_HOME": str(tmp_path / "hf"), **env}
    return subprocess.run(
        [sys.executable, "-m", "sekd.train", *args], cwd=ROOT, capture_output=True, text=True, env=full, timeout=300
    )


@pytest.fixture(scope="module")
def paper_shapes():
    from transformers import AutoConfig

    return tuple(
        P.Shape.of_config(AutoConfig.for_model(**{**P.KNOWN[n]}), "table") for n in ("Qwen/Qwen3-8B", "Qwen/Qwen3-1.7B")
    )


def test_paper_pair_plans_offline_with_a_table_and_a_largest_micro_batch(tmp_path):
    res = cli(["experiment=se_kd", "model=qwen3_8b_to_1.7b", "train=paper", "--plan", "--card", "80GB"], tmp_path)
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert "built-in table" in out  # the configs are not on this disk, and the hub was not asked
    for row in (
        "teacher weights",
        "student weights (fp32)",
        "gradients (fp32)",
        "optimizer (adam8bit)",
        "LM head (blocks, dW, W copy)",
        "activations",
        "teacher forward",
        "estimated peak",
    ):
        assert row in out, row
    assert "8.191B params" in out and "1.721B params" in out  # counted on the meta device
    best = int(re.search(r"largest train\.micro_batch_size that fits 80GB: (\d+)", out).group(1))
    assert best >= 2
    assert not (tmp_path / "outputs").exists() and not list((ROOT / "outputs" / "hydra").glob("*plan*"))


def test_the_plan_loads_no_weights(monkeypatch, capsys):
    import transformers

    def refuse(*a, **k):
        raise AssertionError("the plan loaded weights")

    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", classmethod(refuse))
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    assert P.main([*PAPER, "train.optimizer=adamw", "train.distributed=fsdp", "--world", "8", "--card", "24GB"]) == 0
    out = capsys.readouterr().out
    assert "each of 8 ranks" in out and "fsdp gathered units" in out and "largest train.micro_batch_size" in out


def embedded_specs() -> list[dict]:
    """The embedded pairs' models as conf/model/ gives them (the default and the tiny one)."""
    import yaml

    out = []
    for name in ("embedded", "tiny"):
        emb = yaml.safe_load((ROOT / "conf" / "model" / f"{name}.yaml").read_text())["embedded"]
        out += [(emb[role], emb["vocab_size"]) for role in ("teacher", "student")]
    return out


def qwen3_cases() -> list[dict]:
    from sekd.embedded.build import qwen3_fields

    cases = [qwen3_fields(spec, vocab, 0) for spec, vocab in embedded_specs()] + [dict(P.KNOWN[n]) for n in P.KNOWN]
    small = dict(vocab_size=300, hidden_size=48, intermediate_size=80, num_hidden_layers=3, num_attention_heads=6)
    cases += [  # biases, an untied head, a head_dim that is not hidden / heads, kv heads = heads (None)
        dict(small, num_key_value_heads=2, head_dim=16, attention_bias=True, tie_word_embeddings=False),
        dict(small, num_key_value_heads=3, head_dim=8, attention_bias=False, tie_word_embeddings=True),
        dict(small, num_key_value_heads=None, head_dim=8, attention_bias=True, tie_word_embeddings=True),
    ]
    return [{k: v for k, v in c.items() if k != "model_type"} for c in cases]


@pytest.mark.parametrize("fields", qwen3_cases())
def test_a_qwen3_is_counted_from_its_config_as_on_the_meta_device(fields):
    """The plan (and preflight's estimate) count a Qwen3's parameters without transformers' modeling: the
    same numbers as the model built on the meta device, the whole Shape alike."""
    from transformers import Qwen3Config

    cfg = Qwen3Config(**fields)
    shape = P.Shape.of_config(cfg, "x")
    assert (shape.params, shape.layer_params) == P.meta_params(cfg)
    as_read = {key: getattr(cfg, key) for key in P.FIELDS if hasattr(cfg, key)}
    assert P.Shape.of_fields({**as_read, "model_type": "other"}, "x", lambda: P.meta_params(cfg)) == shape


@pytest.mark.parametrize("spec, vocab", embedded_specs())
def test_the_embedded_pair_is_read_from_its_fields_as_from_its_config(spec, vocab):
    from sekd.embedded.build import qwen3_config, qwen3_fields

    fields = {"model_type": "qwen3", **qwen3_fields(spec, vocab, 0)}
    assert P.Shape.of_fields(fields, "x") == P.Shape.of_config(qwen3_config(spec, vocab, 0), "x")


def test_the_embedded_pair_is_planned_without_transformers_modeling(tmp_path):
    """pair_shapes (the plan's, and every run's preflight) imports no model code: seconds a process."""
    code = (
        "import sys; from sekd.app.checks import typed; from sekd.app.plan import pair_shapes; "
        "from tests.helpers import TINY, compose_cfg; "
        f"t, s = pair_shapes(typed(compose_cfg([*TINY, 'paths.root={tmp_path}']))); "
        "print(t.params, s.params, sorted(m for m in sys.modules if m.startswith('transformers.models')))"
    )
    res = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, env={**os.environ, **OFFLINE}
    )
    assert res.returncode == 0, res.stderr[-2000:]
    teacher, student, models = res.stdout.split(maxsplit=2)
    assert int(teacher) > int(student) > 0 and models.strip() == "[]", models


def test_sekd_plan_script_is_declared():
    text = (ROOT / "pyproject.toml").read_text()
    assert 'sekd-plan = "sekd.app.plan:main_exit"' in text


@pytest.mark.parametrize(
    "args, says",
    [
        (["experiment=se_kd", "train.bogus=1"], "unknown key 'train.bogus'"),
        (["experiment=se_kd", "--card", "24XB"], "--card '24XB'"),
        (["experiment=se_kd", "--world", "4"], "train.distributed=none"),
        (["experiment=se_kd", "train.distributed=fsdp"], "--world N"),
        (["experiment=se_kd", "train=paper", "train.distributed=fsdp", "--world", "8"], "adam8bit"),
        (["-m", "experiment=se_kd,full_kd"], "plans one run"),
    ],
)
def test_bad_input_is_one_line(args, says, capsys):
    assert P.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert says in err and len(err.splitlines()) == 1 and err.startswith("sekd: config error:")


def test_card_sizes():
    assert P.parse_size("24GB") == 24e9 and P.parse_size("80GiB") == 80 * 2**30
    assert P.parse_size("512MB") == 512e6 and P.parse_size("48") == 48e9 and P.parse_size("1.5TB") == 1.5e12
    for bad in ("", "GB", "-3GB", "24 XB", "0GB"):
        with pytest.raises(ConfigError):
            P.parse_size(bad)


def test_numbers_hang_together(paper_shapes):
    t, s = paper_shapes
    kw = dict(seq_len=512, device_type="cuda", dtype="bf16", optimizer="adamw", selected=0.2, score_blocks=3)
    one = P.estimate(t, s, micro_batch=2, **kw).devices[0]
    fsdp = P.estimate(t, s, micro_batch=2, mode="fsdp", world=8, **kw).devices[0]
    ddp = P.estimate(t, s, micro_batch=2, mode="ddp", world=8, **kw).devices[0]
    placed = P.estimate(t, s, micro_batch=2, placed=True, **kw).devices
    # fsdp: 1/N of the weights, gradients and optimizer state per rank
    for row in ("teacher weights", "student weights (fp32)", "gradients (fp32)", "optimizer (adamw)"):
        assert fsdp.rows[row] < one.rows[row], row
    assert fsdp.rows["student weights (fp32)"] == pytest.approx(one.rows["student weights (fp32)"] / 8)
    assert fsdp.peak < one.peak and fsdp.count == 8
    # ddp: a rank holds what one process holds, its gradients kept all step in the all-reduce buffer
    assert ddp.rows == one.rows and ddp.peak >= one.peak
    # the placed teacher: its weights on its own card, a copy of its head on the student's
    student_card, teacher_card = placed
    assert "teacher weights" not in student_card.rows and student_card.rows["teacher head copy"] > 0
    assert teacher_card.rows["teacher weights"] == one.rows["teacher weights"] and student_card.peak < one.peak
    # the exact parameter counts of the paper's pair, and Qwen3-8B in bf16
    assert (t.params, s.params) == (8_190_735_360, 1_720_574_976)
    assert one.rows["teacher weights"] == 2 * t.params
    # more micro-batch, more activations (linear in the tokens), the same weights
    acts = [P.estimate(t, s, micro_batch=mb, **kw).devices[0] for mb in (1, 2, 4)]
    a = [d.rows["activations"] for d in acts]
    assert a[0] < a[1] < a[2] and a[2] - a[1] == pytest.approx(2 * (a[1] - a[0]))
    assert all(d.rows["teacher weights"] == acts[0].rows["teacher weights"] for d in acts)


@pytest.mark.parametrize(
    "mode, world, card", [("none", 1, 80e9), ("none", 1, 24e9), ("fsdp", 8, 24e9), ("ddp", 4, 80e9)]
)
def test_largest_micro_batch_fits_and_one_more_does_not(paper_shapes, mode, world, card):
    t, s = paper_shapes

    def fit(mb):
        return P.estimate(
            t, s, micro_batch=mb, seq_len=512, mode=mode, world=world, optimizer="adamw", selected=0.2, score_blocks=3
        )

    best = P.max_micro_batch(fit, card)
    if best == 0:
        assert fit(1).worst > card
        return
    assert fit(best).worst <= card < fit(best + 1).worst


def test_nothing_fits_a_tiny_card(paper_shapes):
    t, s = paper_shapes
    assert P.max_micro_batch(lambda mb: P.estimate(t, s, micro_batch=mb, seq_len=512), 8e9) == 0


def test_embedded_pair_plans_from_its_own_config(capsys):
    assert P.main(["experiment=se_kd", "train.device=cpu", "--card", "4GB"]) == 0
    out = capsys.readouterr().out
    assert "embedded pair's config" in out and "compute fp32" in out and "device cpu" in out


@pytest.mark.slow  # a measured training step in a fresh process
def test_a_small_real_step_is_within_20_percent_of_the_plan():
    """One fresh process runs 3 real steps of the chunked flow (fp32, CPU, AdamW) at the embedded pair's shape,
    micro-batch 8 x 128; its peak above the loaded baseline against the plan's."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import plan_check

    row = plan_check.check("embedded", plan_check.CASES["embedded"])
    assert 0.8 <= row["ratio"] <= 1.2, row
