"""The run folder: the one place that writes a run's config, metrics, checkpoints, model and record.

    <paths.root>/runs/<preset>-s<seed>-<config hash>/
        config.yaml  overrides.yaml  metrics.jsonl  checkpoint.pt  selection_trace.jsonl
        model/  (Hugging Face checkpoint)   lm_eval/  (raw lm-eval output)   wandb/   record.json
"""
from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from sekd.config import config_hash, resolved, run_dir
from sekd.io import atomic_write_json, atomic_write_text


class RunDir:
    def __init__(self, cfg: DictConfig):
        self.path = run_dir(cfg)
        self.hash = config_hash(cfg)
        self.path.mkdir(parents=True, exist_ok=True)

    record = property(lambda self: self.path / "record.json")
    checkpoint = property(lambda self: self.path / "checkpoint.pt")
    metrics = property(lambda self: self.path / "metrics.jsonl")
    model = property(lambda self: self.path / "model")
    lm_eval = property(lambda self: self.path / "lm_eval")
    trace = property(lambda self: self.path / "selection_trace.jsonl")

    def done(self) -> bool:
        return self.record.exists()

    def write_config(self, cfg: DictConfig, overrides: list[str]) -> None:
        atomic_write_text(self.path / "config.yaml", OmegaConf.to_yaml(OmegaConf.create(resolved(cfg))))
        atomic_write_text(self.path / "overrides.yaml", OmegaConf.to_yaml(OmegaConf.create(list(overrides))))

    def log_metrics(self, row: dict[str, Any]) -> None:
        with self.metrics.open("a") as f:
            f.write(json.dumps(row) + "\n")

    def truncate_after(self, step: int) -> None:
        """On resume: forget the metrics logged after the checkpoint we went back to, and the trace
        rows of the steps that will be redone (the trace counts steps from 0, metrics from 1)."""
        for path, keep in ((self.metrics, lambda s: s <= step), (self.trace, lambda s: s < step)):
            if path.exists():
                rows = [ln for ln in path.read_text().splitlines() if ln and keep(json.loads(ln)["step"])]
                atomic_write_text(path, "".join(r + "\n" for r in rows))

    def write_record(self, record: dict[str, Any]) -> None:
        atomic_write_json(self.record, record)


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None
