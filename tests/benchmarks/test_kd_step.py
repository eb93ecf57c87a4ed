"""benchmarks/kd_step.py: the tiny shape runs every variant end to end; the real shapes are Qwen3's."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from tests.helpers import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import kd_step  # noqa: E402


def test_tiny_runs_every_variant(tmp_path):
    out = tmp_path / "tiny.json"
    res = subprocess.run([sys.executable, "benchmarks/kd_step.py", "--shape", "tiny", "--steps", "2", "--warmup", "1",
                          "--threads", "1", "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    report = json.loads(out.read_text())
    assert [r["variant"] for r in report["results"]] == list(kd_step.VARIANTS)
    assert all(r["tokens_per_s"] > 0 and len(r["step_s"]) == 2 for r in report["results"])
    assert report["machine"]["torch"] == torch.__version__ and report["machine"]["threads"] == 1
    assert "dense_full_kd" in res.stdout  # the table


@pytest.mark.parametrize("role,params", [("teacher", 8.19e9), ("student", 1.72e9)])
def test_qwen3_shapes_have_the_real_sizes(role, params):
    """Qwen3-8B: 8.19B parameters, untied; Qwen3-1.7B: 1.72B, embedding tied to the head (built on meta)."""
    shape = kd_step.SHAPES["qwen3_8b_to_1.7b"]
    body = getattr(shape, role)
    model = kd_step.qwen3(body, shape.vocab, torch.bfloat16, "meta")
    n = sum(p.numel() for p in model.parameters())
    assert n == pytest.approx(params, rel=0.005)
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert tied == body.tied


def test_the_plain_torch_reference_is_the_same_loss_as_full_kd():
    # every position of the synthetic batch is valid: F.kl_div's batchmean is Full KD's per-sequence mean
    bench = kd_step.Bench(kd_step.SHAPES["tiny"], batch=2, seq=16, device="cpu", dtype="float32", optimizer="sgd",
                          chunk_size=8, variants=("plain_torch_full_kd", "dense_full_kd", "chunked_full_kd"))
    plain = bench.loss("plain_torch_full_kd").item()
    assert plain == pytest.approx(bench.loss("dense_full_kd").item(), rel=1e-5)
    assert plain == pytest.approx(bench.loss("chunked_full_kd").item(), rel=1e-5)
