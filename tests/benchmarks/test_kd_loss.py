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


def kd_loss_cli(tmp_path, *options: str) -> list[dict]:
    out = tmp_path / "tiny.json"
    argv = [sys.executable, "benchmarks/kd_loss.py", "--shape", "tiny", "--threads", "1", "--json", str(out), *options]
    res = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    return json.loads(out.read_text())["results"]


def test_tiny_times_every_variant(tmp_path):
    rows = kd_loss_cli(tmp_path, "--rounds", "2", "--chunk-sizes", "16,40", "--no-peaks")
    assert [(r["chunk_size"], r["variant"]) for r in rows] == [(c, v) for c in (16, 40) for v in kd_loss.VARIANTS]
    assert all(len(r["times_s"]) == 2 and 0 < r["min_s"] <= r["median_s"] for r in rows)
    assert all(r["time_vs_plain"] == 1.0 for r in rows if r["variant"] == kd_loss.REFERENCE)


def test_tiny_measures_fresh_peaks(tmp_path):
    """Each variant's peak in a process of its own (the same path for every variant: two of them here)."""
    variants = (kd_loss.REFERENCE, "sekd_chunked_full_kd")
    rows = kd_loss_cli(tmp_path, "--rounds", "1", "--chunk-sizes", "16", "--variants", ",".join(variants))
    assert tuple(r["variant"] for r in rows) == variants
    assert all(r["peak_above_inputs_gib"] is not None and r["peak_above_inputs_gib"] >= 0 for r in rows)


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


@pytest.mark.parametrize("name", list(kd_loss.SPARSE))
def test_sparse_rows_give_the_dense_flows_gradient(name):
    """Each sparse target's row (chunked, the selective head) against the dense flow on [B,L,V] logits."""
    from sekd.kd.objective import LossInputs, Selector, selective_kd_loss
    from sekd.selection.classes import CLASSES

    inp = kd_loss.Inputs.make(2, 12, 97, 8, 16, device="cpu", dtype=torch.float32, chunk_size=5)
    kd_loss.VARIANTS[f"sekd_sparse_{name}"](inp)
    got = inp.h_s.grad.clone()
    assert torch.isfinite(got).all() and got.abs().max() > 0
    if CLASSES.get(name).random:  # keyless draws follow the chunking; the kit checks keyed draws chunk-free
        return
    inp.clear()
    sel = Selector.of(
        None, kd_loss.POLICIES.build("all"), kd_loss.forward_kl, classes=CLASSES.build(name, **kd_loss.SPARSE[name])
    )
    z_s, z_t = inp.logits()
    out = selective_kd_loss(z_s, z_t, inp.y, LossInputs(sel, lam=1.0, temperature=1.0))
    (out.loss_sum / out.weight).backward()
    torch.testing.assert_close(got, inp.h_s.grad, rtol=1e-4, atol=1e-7)
