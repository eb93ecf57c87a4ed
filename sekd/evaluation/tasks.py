"""Local lm-eval tasks built from held-out prose: a HellaSwag-style choice task and a LAMBADA-style last word.

Items come from the prose of each document (runs of unindented lines; indented code and grammar
blocks are dropped and break a run), so every context and answer is contiguous text of its document.
The build is deterministic and cached under a content hash of (docs, builder version, params); the
folder holds the jsonl data and one YAML config per task, with absolute `data_files` paths because
lm-eval resolves relative ones against the working directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from sekd.core.artifacts import build_once
from sekd.core.files import atomic_write_text

BUILDER_VERSION = 1
DATA_FILES = ("choice.jsonl", "lastword.jsonl")


@dataclass(frozen=True)
class TaskParams:
    """Item shapes (in words) and the build seed; part of the cache key."""

    seed: int = 0
    choice_context: tuple[int, int] = (20, 40)
    choice_continuation: tuple[int, int] = (8, 12)
    n_distractors: int = 3
    lastword_context: tuple[int, int] = (30, 60)
    lastword_min_letters: int = 4
    stride: tuple[int, int] = (16, 26)  # words between consecutive cut points
    max_items: int = 300


@dataclass(frozen=True)
class EmbeddedTasks:
    """What lm-eval needs: the folder to include and the task names."""

    include_path: Path
    choice: str
    lastword: str

    @property
    def names(self) -> list[str]:
        return [self.choice, self.lastword]


def prose_runs(doc: str) -> list[list[str]]:
    """Words of each maximal run of unindented lines (blank lines do not break a run)."""
    runs: list[list[str]] = []
    run: list[str] = []
    for line in doc.splitlines():
        if line[:1].isspace():  # code, grammar or an indented example
            if run:
                runs.append(run)
            run = []
        elif line.strip():
            run.extend(line.split())
    if run:
        runs.append(run)
    return runs


def _cuts(rng: random.Random, n: int, lo: int, hi: int, p: TaskParams) -> list[int]:
    """Cut points in [lo, n - hi], one every `stride` words."""
    out, cut = [], lo + rng.randint(0, p.stride[0])
    while cut <= n - hi:
        out.append(cut)
        cut += rng.randint(*p.stride)
    return out


def _cap(rng: random.Random, items: list[dict], max_items: int) -> list[dict]:
    """Keep at most max_items, chosen at random, in document order."""
    if len(items) <= max_items:
        return items
    keep = sorted(rng.sample(range(len(items)), max_items))
    return [items[i] for i in keep]


def choice_items(docs: list[str], p: TaskParams) -> list[dict]:
    """Context -> the true next words plus distractors of equal word count from other documents."""
    rng = random.Random(f"choice:{p.seed}")
    runs = [(d, r) for d, doc in enumerate(docs) for r in prose_runs(doc)]
    items = []
    for d, words in runs:
        # distractors come from other documents (other runs of this one if it is the only document)
        others = [w for e, w in runs if e != d] or [w for _, w in runs if w is not words]
        for cut in _cuts(rng, len(words), p.choice_context[0], p.choice_continuation[1], p):
            n_ctx = min(rng.randint(*p.choice_context), cut)
            n_cont = rng.randint(*p.choice_continuation)
            true = " ".join(words[cut : cut + n_cont])
            choices = [true]
            pool = [w for w in others if len(w) >= n_cont]
            for _ in range(100 * p.n_distractors):  # a few tries absorb rare duplicates
                if len(choices) > p.n_distractors or not pool:
                    break
                other = rng.choice(pool)
                start = rng.randint(0, len(other) - n_cont)
                cand = " ".join(other[start : start + n_cont])
                if cand not in choices:
                    choices.append(cand)
            if len(choices) <= p.n_distractors:
                continue
            label = rng.randrange(len(choices))
            choices[0], choices[label] = choices[label], choices[0]
            items.append({"doc": d, "context": " ".join(words[cut - n_ctx : cut]), "choices": choices, "label": label})
    return _cap(rng, items, p.max_items)


def _is_target(word: str, p: TaskParams) -> bool:
    return word.isascii() and word.isalpha() and len(word) >= p.lastword_min_letters


def lastword_items(docs: list[str], p: TaskParams) -> list[dict]:
    """Context cut right before an alphabetic word of >= 4 letters; target = ' ' + that word."""
    rng = random.Random(f"lastword:{p.seed}")
    items = []
    for d, doc in enumerate(docs):
        for words in prose_runs(doc):
            for cut in _cuts(rng, len(words), p.lastword_context[0], 1, p):
                # move forward to the next eligible word (a cut may only land on one)
                while cut < len(words) and not _is_target(words[cut], p):
                    cut += 1
                if cut >= len(words):
                    break
                n_ctx = min(rng.randint(*p.lastword_context), cut)
                items.append({"doc": d, "context": " ".join(words[cut - n_ctx : cut]), "target": " " + words[cut]})
    # a forward move can land two cut points on the same word
    seen, unique = set(), []
    for it in items:
        key = (it["doc"], it["context"], it["target"])
        if key not in seen:
            seen.add(key)
            unique.append(it)
    return _cap(rng, unique, p.max_items)


def content_hash(docs: list[str], split: str, p: TaskParams) -> str:
    """Cache key: docs, builder version, params and the split name (which is part of the task names)."""
    h = hashlib.sha256()
    h.update(json.dumps({"version": BUILDER_VERSION, "split": split, "params": asdict(p)}, sort_keys=True).encode())
    for doc in docs:
        h.update(hashlib.sha256(doc.encode()).digest())
    return h.hexdigest()[:16]


def task_configs(folder: Path, split: str) -> dict[str, dict]:
    """YAML file name -> lm-eval task config, with data paths pointing into `folder`."""

    def data(name: str) -> dict:
        return {
            "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": str(folder.resolve() / name)}},
            "test_split": "test",
            "metadata": {"version": BUILDER_VERSION},
        }

    choice = {
        "task": f"sekd_choice_{split}",
        **data("choice.jsonl"),
        "output_type": "multiple_choice",
        "doc_to_text": "context",
        "doc_to_target": "label",
        "doc_to_choice": "choices",
        "metric_list": [
            {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
        ],
    }
    lastword = {  # as lm-eval's lambada_openai
        "task": f"sekd_lastword_{split}",
        **data("lastword.jsonl"),
        "output_type": "loglikelihood",
        "doc_to_text": "context",
        "doc_to_target": "target",
        "metric_list": [
            {"metric": "perplexity", "aggregation": "perplexity", "higher_is_better": False},
            {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
        ],
    }
    return {f"{cfg['task']}.yaml": cfg for cfg in (choice, lastword)}


def _write_configs(folder: Path, target: Path, split: str) -> None:
    """Write the YAMLs into `folder` for data that will live in `target`; skip files already equal."""
    for name, cfg in task_configs(target, split).items():
        text = yaml.safe_dump(cfg, sort_keys=False)
        path = folder / name
        if not path.exists() or path.read_text() != text:
            atomic_write_text(path, text)


def _jsonl(items: list[dict]) -> str:
    return "".join(json.dumps(it, ensure_ascii=False) + "\n" for it in items)


def build_tasks(
    docs: list[str], artifacts_dir: str | os.PathLike, *, split: str, params: TaskParams = TaskParams()
) -> EmbeddedTasks:
    """Build (or reuse) the two tasks for `docs`, named sekd_choice_<split> and sekd_lastword_<split>."""
    if not docs:
        raise ValueError("build_tasks needs at least one document")
    root = Path(artifacts_dir).resolve() / "lm_eval_tasks"
    folder = root / f"{split}-{content_hash(docs, split, params)}"

    def fill(tmp: Path) -> None:
        choice, lastword = choice_items(docs, params), lastword_items(docs, params)
        if not choice or not lastword:
            raise ValueError(f"documents too short: {len(choice)} choice, {len(lastword)} last-word items")
        (tmp / "choice.jsonl").write_text(_jsonl(choice))
        (tmp / "lastword.jsonl").write_text(_jsonl(lastword))
        _write_configs(tmp, folder, split)

    # a folder whose data was removed since (a cleaned cache) is built again
    build_once(folder, fill, folder=True, ready=lambda f: all((f / n).is_file() for n in DATA_FILES))
    # the cache may have been moved since it was built: keep data paths absolute and current
    _write_configs(folder, folder, split)
    return EmbeddedTasks(folder, f"sekd_choice_{split}", f"sekd_lastword_{split}")
