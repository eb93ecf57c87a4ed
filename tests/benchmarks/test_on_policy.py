"""benchmarks/on_policy.py: both regimes run end to end (tiny pair), and only the on-policy one samples."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.helpers import ROOT, TINY


def test_times_both_regimes_on_the_tiny_pair(tmp_path):
    out = tmp_path / "on_policy.json"
    overrides = [o for o in TINY if not o.startswith(("train.threads", "logging"))]
    res = subprocess.run(
        [
            sys.executable,
            "benchmarks/on_policy.py",
            "--steps",
            "2",
            "--rounds",
            "1",
            "--json",
            str(out),
            "--",
            *overrides,
            "data.seq_len=128",
            f"paths.cache={tmp_path / 'cache'}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    off, on = json.loads(out.read_text())["results"]
    assert (off["regime"], on["regime"]) == ("off_policy", "on_policy")
    assert off["on_policy_batches"] == [0] and on["on_policy_batches"] == [4]  # 2 steps x 2 micro-batches
    assert off["vs_off_policy"] == 1.0 and on["median_s_per_step"] > 0
    assert "x off-policy" in res.stdout
