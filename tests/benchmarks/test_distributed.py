"""benchmarks/distributed.py: every mode runs at the tiny shape on CPU (ddp and fsdp as 2 gloo ranks started by
torchrun, as on a GPU node); what this machine or launch cannot run is refused in one line, exit 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.helpers import ROOT

TINY = ["--shape", "tiny", "--device", "cpu", "--steps", "2", "--warmup", "1", "--threads", "1"]
CPU_ONLY = {"CUDA_VISIBLE_DEVICES": ""}
LAUNCH = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def env(**extra: str) -> dict:
    base = {k: v for k, v in os.environ.items() if k not in LAUNCH}
    return {**base, "OMP_NUM_THREADS": "1", **CPU_ONLY, **extra}


def bench(args: list[str], *, ranks: int = 0, **extra: str) -> subprocess.CompletedProcess:
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks)]
    torchrun = torchrun if ranks else [sys.executable]
    return subprocess.run(
        [*torchrun, "benchmarks/distributed.py", *args],
        cwd=ROOT,
        env=env(**extra),
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.parametrize("mode,ranks,devices", [("none", 0, 1), ("placed", 0, 1), ("ddp", 2, 2), ("fsdp", 2, 2)])
def test_every_mode_runs_and_reports_per_device(tmp_path, mode, ranks, devices):
    out = tmp_path / "out.json"
    extra = ["--teacher-device", "cpu"] if mode == "placed" else []
    res = bench(["--mode", mode, *TINY, *extra, "--json", str(out)], ranks=ranks)
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads(out.read_text())
    s = report["summary"]
    assert (s["mode"], s["world_size"], s["devices"]) == (mode, max(ranks, 1), devices)
    assert s["tokens_per_step"] == 2 * 64 * max(ranks, 1)
    assert s["tokens_per_s_per_device"] == pytest.approx(s["tokens_per_step"] / s["median_step_s"] / devices)
    assert [r["rank"] for r in report["ranks"]] == list(range(max(ranks, 1)))
    assert all(r["peak_gib"] > 0 and len(r["step_s"]) == 2 for r in report["ranks"])
    assert f"mode={mode} shape=tiny" in res.stdout
    if mode == "fsdp":  # sharded as training shards: every student and teacher-decoder weight, after the steps too
        for r in report["ranks"]:
            for part in ("student", "teacher_decoder"):
                held = r["sharding"][part]
                assert held["sharded"] == held["params"] > 0, (part, held)
                assert held["local_fraction"] <= 0.5 + 0.02, (part, held)  # about half on each of 2 ranks


@pytest.mark.parametrize(
    "args,extra,line",
    [
        (
            [],
            {},
            "distributed: --shape qwen3_8b_to_1.7b (a GPU shape) needs CUDA, but this machine has no CUDA device; "
            "run it on a GPU node, or pass --shape tiny --device cpu to run it here",
        ),
        (
            ["--mode", "ddp", *TINY],
            {},
            "distributed: --mode ddp needs the ranks torchrun starts: torchrun "
            "--nproc_per_node N benchmarks/distributed.py --mode ddp ...",
        ),
        (
            ["--mode", "fsdp", *TINY],
            {"RANK": "0", "WORLD_SIZE": "1"},
            "distributed: --mode fsdp shards over ranks: start at least 2 (torchrun --nproc_per_node 2 or more)",
        ),
        (
            ["--mode", "placed", *TINY],
            {},
            "distributed: --teacher-device cuda:1: this machine has 0 CUDA device(s); "
            "--mode placed needs two (or --teacher-device cpu)",
        ),
    ],
)
def test_refuses_in_one_line_what_this_machine_cannot_run(tmp_path, args, extra, line):
    out = tmp_path / "out.json"
    res = bench([*args, "--json", str(out)], **extra)
    assert res.returncode == 2, res.stderr[-3000:]
    assert res.stderr.strip().splitlines() == [line]
    assert not out.exists()


def test_the_gpu_smoke_script_refuses_a_machine_without_cuda(tmp_path):
    res = subprocess.run(
        ["bash", "benchmarks/gpu_smoke.sh", str(tmp_path / "smoke")],
        cwd=ROOT,
        env={**env(), "PYTHON": sys.executable},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 2, res.stderr
    assert res.stderr.strip().splitlines() == [
        "gpu_smoke: needs a CUDA device, and this machine has none (torch.cuda.is_available() is False)"
    ]
    assert not (tmp_path / "smoke").exists()
