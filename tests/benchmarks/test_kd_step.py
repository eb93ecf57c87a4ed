"""benchmarks/kd_step.py: the tiny shape runs every variant end to end; the real shapes are Qwen3's."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import kd_step  # noqa: E402


def kd_step_cli(tmp_path, *options: str) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "tiny.json"
    argv = [sys.executable, "benchmarks/kd_step.py", "--shape", "tiny", "--threads", "1", "--json", str(out), *options]
    res = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    return res, json.loads(out.read_text())


def test_tiny_runs_every_variant_interleaved(tmp_path):
    res, report = kd_step_cli(tmp_path, "--rounds", "2")
    rows = {r["variant"]: r for r in report["results"]}
    assert list(rows) == list(kd_step.VARIANTS)  # trl is installed with the bench extra
    assert all(r["tokens_per_s"] > 0 and len(r["step_s"]) == 2 and r["min_s"] <= r["median_s"] for r in rows.values())
    assert rows["plain_torch_full_kd"]["time_vs_plain"] == 1.0 and rows["cache_build"]["vs_teacher_forward"] > 0
    assert report["machine"]["torch"] == torch.__version__ and report["machine"]["threads"] == 1
    assert "dense_full_kd" in res.stdout and "x plain time" in res.stdout  # the table


def test_fresh_process_peaks_of_a_step_and_the_cache_build(tmp_path):
    """--fresh-process measures each variant's peak in a process of its own (the same path for every variant:
    two of them here, a fresh process each)."""
    variants = ("plain_torch_full_kd", "cache_build")
    _, report = kd_step_cli(tmp_path, "--rounds", "1", "--fresh-process", "--variants", ",".join(variants))
    rows = {r["variant"]: r for r in report["results"]}
    assert tuple(rows) == variants
    assert all(r["peak_above_gib"] >= 0 and r["baseline_gib"] > 0 for r in rows.values())


def test_cache_se_kd_reads_a_real_cache_folder(tmp_path):
    """The cache variant trains on targets read from a folder sekd.stores.teacher_cache.build wrote: the same targets the
    teacher's rs_kd draws give for those rows, each step."""
    from sekd.stores.teacher_cache.store import TeacherCache

    bench = kd_step.Bench(
        kd_step.SHAPES["tiny"],
        batch=2,
        seq=16,
        device="cpu",
        dtype="float32",
        optimizer="sgd",
        chunk_size=8,
        variants=("cache_se_kd",),
    )
    assert bench.teacher is None and isinstance(bench.cache, TeacherCache)  # the student alone trains
    assert (Path(bench.cache.root) / "manifest.json").exists()
    target = bench.cache.targets(bench.sample_ids, bench.y)
    assert target.ids.shape[0] == int((bench.y != kd_step.IGNORE).sum())
    assert torch.allclose(target.probs.sum(-1), torch.ones(1))
    assert bench.step("cache_se_kd") > 0


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
    bench = kd_step.Bench(
        kd_step.SHAPES["tiny"],
        batch=2,
        seq=16,
        device="cpu",
        dtype="float32",
        optimizer="sgd",
        chunk_size=8,
        variants=("plain_torch_full_kd", "dense_full_kd", "chunked_full_kd"),
    )
    plain = bench.loss("plain_torch_full_kd").item()
    assert plain == pytest.approx(bench.loss("dense_full_kd").item(), rel=1e-5)
    assert plain == pytest.approx(bench.loss("chunked_full_kd").item(), rel=1e-5)
