"""benchmarks/kd_loss.py: every Full KD variant computes the same loss gradient; the tiny shape runs end to end."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from tests.helpers import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import kd_loss  # noqa: E402

FULL_KD = [v for v in kd_loss.VARIANTS if v.endswith("full_kd")]


@pytest.mark.parametrize("variant", FULL_KD)
def test_full_kd_variants_give_plain_torchs_gradients(variant):
    """Same inputs, same quantity (forward KL averaged over the positions with a target): same dL/dh, dL/dW."""
    inp = kd_loss.Inputs.make(2, 12, 97, 8, 16, device="cpu", dtype=torch.float32, chunk_size=5)
    kd_loss.plain_torch_full_kd(inp)
    ref = inp.h_s.grad.clone(), inp.W_s.grad.clone()
    inp.clear()
    kd_loss.VARIANTS[variant](inp)
    torch.testing.assert_close(inp.h_s.grad, ref[0], rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(inp.W_s.grad, ref[1], rtol=1e-4, atol=1e-7)
    assert inp.h_s.grad[:, -1].abs().max() == 0  # the last position has no target


def test_tiny_times_every_variant_and_measures_fresh_peaks(tmp_path):
    out = tmp_path / "tiny.json"
    res = subprocess.run(
        [
            sys.executable,
            "benchmarks/kd_loss.py",
            "--shape",
            "tiny",
            "--rounds",
            "2",
            "--threads",
            "1",
            "--chunk-sizes",
            "16,40",
            "--json",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr
    rows = json.loads(out.read_text())["results"]
    assert [(r["chunk_size"], r["variant"]) for r in rows] == [(c, v) for c in (16, 40) for v in kd_loss.VARIANTS]
    assert all(len(r["times_s"]) == 2 and 0 < r["min_s"] <= r["median_s"] for r in rows)
    assert all(r["peak_above_inputs_gib"] is not None and r["peak_above_inputs_gib"] >= 0 for r in rows)
    assert all(r["time_vs_plain"] == 1.0 for r in rows if r["variant"] == kd_loss.REFERENCE)
    assert "x plain time" in res.stdout  # the table


def test_unknown_variant_is_refused_in_one_line():
    res = subprocess.run(
        [sys.executable, "benchmarks/kd_loss.py", "--variants", "plain_torch_full_kd,fast_kd"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode != 0 and "unknown variants ['fast_kd']" in res.stderr.strip().splitlines()[-1]


def test_the_gpu_script_refuses_a_machine_without_cuda(tmp_path):
    import os

    res = subprocess.run(
        ["bash", "benchmarks/gpu_kd.sh", str(tmp_path / "out")],
        cwd=ROOT,
        env={**os.environ, "PYTHON": sys.executable},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 2, res.stderr
    assert res.stderr.strip().splitlines() == [
        "gpu_kd: needs a CUDA device, and this machine has none (torch.cuda.is_available() is False)"
    ]
    assert not (tmp_path / "out").exists()


def test_a_gpu_shape_without_cuda_is_refused_in_one_line():
    res = subprocess.run(
        [sys.executable, "benchmarks/kd_loss.py", "--shape", "qwen3_8b_to_1.7b", "--device", "cuda"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1 and "needs CUDA" in res.stderr
