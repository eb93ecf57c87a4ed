"""Shared test helpers: compose the real Hydra config, run the real CLI in a subprocess."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
PRESETS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))

# The smallest real run: tiny pretrained pair, short sequences, a few steps, no wandb.
TINY = ["model=tiny", "data.seq_len=64", "train.micro_batch_size=4", "train.grad_accum=2", "train.threads=1",
        "train.log_every=1", "logging=disabled"]


def compose_cfg(overrides: list[str], config_dir: Path = CONF, name: str = "config", hydra_node: bool = False):
    with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
        return compose(config_name=name, overrides=overrides, return_hydra_config=hydra_node)


def sekd_train(args: list[str], env: dict[str, str] | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "sekd.train", *args], cwd=ROOT, env=full_env,
                          capture_output=True, text=True, timeout=timeout)
