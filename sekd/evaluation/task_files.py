"""Our local lm-eval tasks' files on disk (paths.cache/eval/lm_eval_tasks): when lm-eval fails, which task's
config or data is at fault (missing, not whole JSON, empty), so that the run can name it in one line.
A failure no task's files explain stays the library's own error: a bug to show whole."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml


@dataclass
class TaskDataError(Exception):
    """Task `task`'s file `path` is broken (`problem`); `folder` is its built folder, made again once removed."""

    task: str
    path: Path
    problem: str
    folder: Path

    def __str__(self) -> str:
        return f"task {self.task}: {self.path} {self.problem}"


def broken_task(folders: list[Path]) -> TaskDataError | None:
    """The first task under `folders` whose YAML config or data files are broken; None if all are whole."""
    for folder in folders:
        for config in sorted(Path(folder).glob("*.yaml")):
            try:
                cfg = yaml.safe_load(config.read_text())
            except (OSError, yaml.YAMLError) as err:
                return TaskDataError(config.stem, config, f"does not parse ({type(err).__name__})", Path(folder))
            task = str(cfg.get("task", config.stem)) if isinstance(cfg, dict) else config.stem
            for data in data_files(cfg):
                problem = jsonl_problem(data)
                if problem:
                    return TaskDataError(task, data, problem, Path(folder))
    return None


def data_files(cfg: Any) -> list[Path]:
    """The local files a task config reads (dataset_kwargs.data_files: a path, a list, or split -> paths)."""
    files = cfg.get("dataset_kwargs", {}).get("data_files") if isinstance(cfg, dict) else None
    if isinstance(files, dict):
        files = list(files.values())
    flat: list[Any] = []
    for f in files if isinstance(files, list) else [files] if files else []:
        flat.extend(f if isinstance(f, list) else [f])
    return [Path(str(f)) for f in flat]


def jsonl_problem(path: Path) -> str | None:
    """What is wrong with a JSON-lines data file, in a few words; None when every line is a whole object."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return "is missing"
    except (OSError, UnicodeDecodeError) as err:
        return f"cannot be read ({getattr(err, 'strerror', None) or type(err).__name__})"
    if not any(line.strip() for line in lines):
        return "holds no items"
    for n, line in enumerate(lines, 1):
        try:
            if line.strip() and not isinstance(json.loads(line), dict):
                return f"line {n} is not a JSON object"
        except json.JSONDecodeError:
            return f"line {n} is not whole JSON (cut short or corrupted)"
    return None
