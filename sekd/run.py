"""The run folder: the one place that writes a run's config, metrics, checkpoints, model and record.

    <paths.root>/runs/<preset>-s<seed>-<train hash>/          (everything but `eval` is hashed)
        metrics.jsonl  checkpoint.pt  selection_trace.jsonl  train_stats.json  .train.lock
        model/  (Hugging Face checkpoint)   wandb/
        eval-<suite>-<split>-<eval hash>/   config.yaml  overrides.yaml  record.json  lm_eval/ (raw output)

One trained student is scored by as many eval configs as ask for it (Table 2 on test, V1 on
validation) without training it again; each scoring writes its own record.
"""
from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from sekd.config import config_hash, resolved, run_dir, scores_dir
from sekd.io import atomic_write_json, atomic_write_text, sweep_tmp


class RunDir:
    def __init__(self, cfg: DictConfig):
        self.path = run_dir(cfg)
        self.scores = scores_dir(cfg)
        self.hash = config_hash(cfg)
        # nothing is created yet: write_config makes the folders once the run's checks have passed

    record = property(lambda self: self.scores / "record.json")
    checkpoint = property(lambda self: self.path / "checkpoint.pt")
    metrics = property(lambda self: self.path / "metrics.jsonl")
    model = property(lambda self: self.path / "model")
    lm_eval = property(lambda self: self.scores / "lm_eval")
    train_stats = property(lambda self: self.path / "train_stats.json")
    trace = property(lambda self: self.path / "selection_trace.jsonl")

    def done(self) -> bool:
        return self.record.exists()

    def trained(self) -> bool:
        """The distilled student is saved (training finished), whether or not it was scored yet."""
        return (self.model / "config.json").exists() and self.train_stats.exists()

    def write_config(self, cfg: DictConfig, overrides: list[str]) -> None:
        """The full config (eval included) beside the record it produces; creates the run's folders."""
        self.scores.mkdir(parents=True, exist_ok=True)
        recorded = resolved(cfg, keep_env=True)  # ${oc.env:...} values stay text: no token lands in a file
        atomic_write_text(self.scores / "config.yaml", OmegaConf.to_yaml(OmegaConf.create(recorded)))
        atomic_write_text(self.scores / "overrides.yaml", OmegaConf.to_yaml(OmegaConf.create(list(overrides))))

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

    def start_over(self) -> None:
        """force=true: train from scratch; the checkpoint, metrics and trace of an earlier attempt go."""
        self.checkpoint.unlink(missing_ok=True)
        self.truncate_after(0)

    def sweep(self) -> None:
        """Delete the temporary files a killed writer left in the run and scores folders (held under the
        run's training lock, so no live writer of the run folder is interrupted)."""
        for folder in (self.path, self.scores):
            if folder.is_dir():
                sweep_tmp(folder)

    def write_record(self, record: dict[str, Any]) -> None:
        self.scores.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.record, record)


def is_finished(cfg: DictConfig) -> bool:
    """Whether this cell has nothing left to do for its stage (a sweep skips it before submitting).
    Reads only the file system: creates nothing."""
    if cfg.force:
        return False
    if cfg.stage == "train":
        path = run_dir(cfg)
        return cfg.mode != "distill" or ((path / "model" / "config.json").exists()
                                          and (path / "train_stats.json").exists())
    return (scores_dir(cfg) / "record.json").exists()


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None
