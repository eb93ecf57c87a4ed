"""The embedded pair's pretraining (sekd/embedded/build.py): with keep=best_validation a model ends at its
best held-out step, measured on the validation split, not at its last."""

import json

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from sekd.data.dataset import build_packed
from sekd.embedded.build import mean_ce, pretrained_model, tokenizer

TINY_STUDENT = {"hidden_size": 32, "layers": 1, "heads": 2, "kv_heads": 1, "intermediate_size": 64, "batch_size": 8}


def test_best_validation_keeps_the_step_with_the_lowest_held_out_loss(tmp_path):
    torch.set_num_threads(1)
    tok_dir = tokenizer(tmp_path, 512)
    # a learning rate high enough that the held-out loss does not fall monotonically over 60 steps
    spec = {**TINY_STUDENT, "steps": 60, "lr": 3e-2, "keep": "best_validation", "eval_every": 10}
    folder = pretrained_model(tmp_path, "student", tok_dir, spec, seq_len=64, seed=0)
    curve = json.loads((folder / "pretrain_curve.json").read_text())
    assert [c["step"] for c in curve] == [10, 20, 30, 40, 50, 60]
    best = min(curve, key=lambda c: c["val_loss"])
    assert f"kept_step={best['step']} " in (folder / "pretrain.txt").read_text()

    val = build_packed(
        "embedded",
        "validation",
        AutoTokenizer.from_pretrained(folder),
        seq_len=64,
        token_budget=None,
        artifacts_dir=tmp_path / "data",
    )
    kept = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    assert abs(mean_ce(kept, val) - best["val_loss"]) < 1e-3  # the saved weights are the best step's

    # the same run keeping its last step ends elsewhere (unless the last step was the best)
    last = pretrained_model(tmp_path, "student", tok_dir, {**spec, "keep": "last"}, seq_len=64, seed=0)
    assert not (last / "pretrain_curve.json").exists()
    last_ce = mean_ce(AutoModelForCausalLM.from_pretrained(last, dtype=torch.float32), val)
    assert abs(last_ce - curve[-1]["val_loss"]) < 1e-3
    if best["step"] != 60:
        assert last_ce > best["val_loss"] + 1e-3
