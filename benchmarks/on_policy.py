"""Seconds per optimizer step of an on-policy run against the same run off-policy, on the embedded task.

    python benchmarks/on_policy.py                                # experiment=on_policy_se_kd, 60 steps, 3 rounds
    python benchmarks/on_policy.py --steps 100 --rounds 5 --json on_policy.json
    python benchmarks/on_policy.py -- train.micro_batch_size=16   # Hydra overrides for both runs after --

Each round runs `sekd-train experiment=<preset> regime=off_policy` and then `regime=on_policy` (eval=none,
one torch thread), each in a fresh process with its own output folder, and reads the training loop's own
time (`train_time_s` of train_stats.json: the distillation steps, not loading, pretraining or evaluation).
The on-policy run samples every step's answers from the student (a batched KV-cache loop over all of the
step's micro-batches, docs/method.md §10) and trains on them; the off-policy run trains on the data's own
answers. The first run builds the embedded teacher and student into the cache (minutes, once); the table
gives min and median seconds per step over the rounds, and on / off.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from typing import Any
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from kd_step import machine  # noqa: E402

REGIMES = ("off_policy", "on_policy")


def run_once(regime: str, args, root: Path) -> dict:
    """One sekd-train run in a fresh process; its train_stats.json."""
    cmd = [
        sys.executable,
        "-m",
        "sekd.train",
        f"experiment={args.experiment}",
        f"regime={regime}",
        "eval=none",
        f"train.steps={args.steps}",
        "train.threads=1",
        "logging=disabled",
        f"paths.root={root}",
        *args.overrides,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    res = subprocess.run(cmd, cwd=HERE.parent, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"on_policy: the {regime} run failed:\n{res.stderr[-3000:]}")
    [stats] = root.glob("runs/*/train_stats.json")
    return json.loads(stats.read_text())


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--experiment", default="on_policy_se_kd", help="an on-policy preset (conf/experiment)")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", type=Path, help="write machine, options and results here")
    p.add_argument("overrides", nargs="*", help="Hydra overrides for both runs (after --)")
    return p.parse_args(argv)


def main(argv=None) -> list[dict]:
    from tabulate import tabulate
    from tqdm import tqdm

    args = parse(argv)
    info = machine("cpu")
    per_step: dict[str, list[float]] = {r: [] for r in REGIMES}
    batches: dict[str, list[int]] = {r: [] for r in REGIMES}
    with tempfile.TemporaryDirectory() as tmp:
        for k in tqdm(range(args.rounds), desc="rounds", file=sys.stderr):
            for regime in REGIMES:
                stats = run_once(regime, args, Path(tmp) / f"{regime}-{k}")
                per_step[regime].append(stats["train_time_s"] / stats["steps"])
                batches[regime].append(stats["on_policy_batches"])
    rows: list[dict[str, Any]] = [
        {
            "regime": r,
            "min_s_per_step": min(per_step[r]),
            "median_s_per_step": statistics.median(per_step[r]),
            "s_per_step": per_step[r],
            "on_policy_batches": batches[r],
        }
        for r in REGIMES
    ]
    off = rows[0]["median_s_per_step"]
    for r in rows:
        r["vs_off_policy"] = r["median_s_per_step"] / off
    print(f"experiment={args.experiment} steps={args.steps} rounds={args.rounds} overrides={args.overrides}")
    print(
        tabulate(
            [
                [
                    r["regime"],
                    f"{r['min_s_per_step']:.4f}",
                    f"{r['median_s_per_step']:.4f}",
                    f"{r['vs_off_policy']:.2f}",
                ]
                for r in rows
            ],
            headers=["regime", "min s/step", "median s/step", "x off-policy"],
        )
    )
    if args.json:
        args.json.write_text(
            json.dumps({"machine": info, "options": {**vars(args), "json": str(args.json)}, "results": rows}, indent=2)
        )
    return rows


if __name__ == "__main__":
    main()
