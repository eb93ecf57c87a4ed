"""Score a Hugging Face checkpoint folder on a suite with lm-eval; keep the raw output, return flat metrics.

Set HF_HUB_OFFLINE, HF_DATASETS_OFFLINE and TRANSFORMERS_OFFLINE before the first Hugging Face import
(the entry point's job): set later they do nothing.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from sekd.evaluation.calibration import suite_ece
from sekd.evaluation.suites import GSM8K_HELD_OUT, Suite, get_suite, lm_eval_tasks
from sekd.evaluation.task_files import broken_task
from sekd.evaluation.tasks import build_tasks
from sekd.core.files import atomic_write_text, storage_error
from sekd.distributed.launch import one_process

if TYPE_CHECKING:
    from lm_eval.tasks import TaskManager


def score_checkpoint(
    model_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    suite: str = "embedded",
    split: str | None = None,
    docs: list[str] | None = None,
    problems: list[dict] | None = None,
    artifacts_dir: str | os.PathLike,
    batch_size: int = 16,
    limit: int | float | None = None,
    device: str = "cpu",
    seed: int = 42,
    dtype: str = "float32",
    bootstrap_iters: int = 1000,
    gsm8k_validation_size: int = GSM8K_HELD_OUT,
    verbose: bool = False,
) -> dict[str, float]:
    """Run lm-eval on `model_dir` (model + tokenizer), write out_dir/lm_eval/, return flat metrics.

    split=None is the suite's own split (embedded: test). For the embedded suites, docs=None takes
    the held-out documents of `split` from the embedded corpus; for a suite with the arithmetic task
    (`task`), problems=None takes sekd.data.arith.problems(split). Generations are kept in
    out_dir/lm_eval/samples_<task>.jsonl (`resps` raw, `filtered_resps` the extracted answer).
    `seed` sets lm-eval's seeds (few-shot examples, python/numpy/torch): the run passes eval.seed, fixed
    across training seeds, so that a spread over seeds is training variance alone.
    `gsm8k_validation_size`: the GSM8K training problems the validation suite holds out (data.validation_size).
    `verbose`: lm-eval's INFO lines, prints and progress bars on the console; otherwise they go to
    out_dir/lm_eval.log (its warnings still reach the console).
    """
    s = get_suite(suite, split, gsm8k_validation_size=gsm8k_validation_size)
    if docs is not None and not s.embedded:
        raise ValueError(f"docs only apply to the embedded suite, not {suite!r}")
    if problems is not None and not s.arith:
        raise ValueError(f"problems only apply to a suite with the arithmetic task, not {suite!r}")
    folders = task_folders(s, artifacts_dir, docs, problems)
    (Path(out_dir) / "lm_eval" / "results.json").unlink(missing_ok=True)  # no older results beside new samples
    with lm_eval_output(Path(out_dir) / "lm_eval.log", verbose), one_process():
        world = fresh_accelerate_state()
        res = run_lm_eval(
            model_dir,
            s,
            folders,
            batch_size=batch_size,
            device=device,
            limit=limit,
            seed=seed,
            dtype=dtype,
            bootstrap_iters=bootstrap_iters,
        )
    if res is None:
        raise RuntimeError("lm-eval returned no results (not rank 0?)")
    res["sekd"] = {"eval_world_size": world}  # 1: scored by this process alone (results.json keeps it)
    write_raw(res, Path(out_dir) / "lm_eval")
    return flatten(res, s)


def run_lm_eval(
    model_dir: str | os.PathLike,
    s: Suite,
    folders: list[Path],
    *,
    batch_size: int,
    device: str,
    limit: int | float | None,
    seed: int,
    dtype: str,
    bootstrap_iters: int,
) -> dict | None:
    """lm-eval over suite `s`; a failure one of our tasks' files in `folders` explains is a TaskDataError
    naming the task, any other stays lm-eval's own error."""
    import lm_eval

    try:
        tm = task_manager(s, folders)
        return lm_eval.simple_evaluate(
            model="hf",
            model_args={"pretrained": str(model_dir), "dtype": dtype},  # a dict: a path may hold commas
            tasks=lm_eval_tasks(s, tm),
            task_manager=tm,
            batch_size=batch_size,
            device=device,
            limit=limit,
            log_samples=True,
            bootstrap_iters=bootstrap_iters,  # lm-eval's 100000 bootstraps perplexity in a process pool
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
        )
    except Exception as err:
        broken = broken_task(folders)
        if broken is None:
            raise
        raise broken from err


def task_folders(
    s: Suite, artifacts_dir: str | os.PathLike, docs: list[str] | None, problems: list[dict] | None
) -> list[Path]:
    """The folders of the local tasks of an embedded suite `s` (built from `docs` / `problems`, or the split's
    own); [] for the others (lm-eval's own tasks)."""
    if not s.embedded:
        return []
    if docs is None:
        from sekd.data.corpus import load_split

        docs = load_split(s.split)
    folders = [build_tasks(docs, artifacts_dir, split=s.split).include_path]
    if s.arith:
        from sekd.evaluation.generation import build_arith_task

        folders.append(build_arith_task(s.split, artifacts_dir, problems=problems))
    return folders


def task_manager(s: Suite, folders: list[Path]) -> TaskManager:
    """lm-eval's TaskManager for suite `s`: the embedded suites' local tasks in `folders`, without indexing
    lm-eval's built-in tasks (8 s); the others', all of them."""
    from lm_eval.tasks import TaskManager

    if not s.embedded:
        return TaskManager()
    return TaskManager(include_path=[str(f) for f in folders], include_defaults=False)


def fresh_accelerate_state() -> int:
    """The number of processes lm-eval's `Accelerator()` will see (1 inside `one_process`). accelerate keeps its
    state in a process-wide singleton: one made under a launcher's variables (a torchrun rank that scored
    before) is dropped first, so the next `Accelerator()` reads the one-process environment."""
    from accelerate.state import AcceleratorState, PartialState

    if PartialState._shared_state and PartialState().num_processes > 1:
        AcceleratorState._reset_state(reset_partial_state=True)
    return PartialState().num_processes


@contextlib.contextmanager
def lm_eval_output(log: Path, verbose: bool):
    """lm-eval's chatter (its INFO log lines, `print`s, tqdm bars) into `log` instead of the console, where
    a sweep's log should hold one line per cell; its warnings and errors still reach stderr."""
    if verbose:
        yield
        return
    logger = logging.getLogger("lm_eval")
    saved = logger.level, logger.propagate
    log.parent.mkdir(parents=True, exist_ok=True)
    with NamedLog(log) as out:
        to_file, to_console = logging.StreamHandler(out), logging.StreamHandler(sys.__stderr__)
        to_file.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
        to_console.setLevel(logging.WARNING)
        logger.addHandler(to_file)
        logger.addHandler(to_console)
        logger.setLevel(logging.INFO)
        logger.propagate = False
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
                yield
        finally:
            logger.removeHandler(to_file)
            logger.removeHandler(to_console)
            logger.setLevel(saved[0])
            logger.propagate = saved[1]


class NamedLog(io.TextIOBase):
    """lm_eval.log, whose storage faults name it: lm-eval's prints and log lines reach it through buffers,
    where a full disk is an OSError naming no file (the fault's line would not say which)."""

    def __init__(self, path: Path):
        self.path = path
        with self.named():
            self.file = open(path, "w")

    @contextlib.contextmanager
    def named(self):
        try:
            yield
        except OSError as err:
            fault = storage_error(err, self.path)
            if fault is None:
                raise
            raise fault from err

    def write(self, text: str) -> int:
        with self.named():
            return self.file.write(text)

    def flush(self) -> None:
        with self.named():
            self.file.flush()

    def close(self) -> None:
        if self.closed:
            return
        try:
            super().close()  # flushes
        finally:
            with self.named():
                self.file.close()


def _number(v: Any) -> float | None:
    """A float from lm-eval's values (numpy scalars, floats); None for 'N/A' and other strings."""
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.integer, np.floating)):
        return None
    return float(v)


def _metric(results: dict, task: str, key: str) -> float:
    if task not in results or key not in results[task]:
        raise KeyError(f"lm-eval results have no {key!r} for task {task!r}")
    x = _number(results[task][key])
    if x is None:
        raise ValueError(f"lm-eval result {task}/{key} is not a number: {results[task][key]!r}")
    return x


def flatten(res: dict, suite: Suite) -> dict[str, float]:
    """lm-eval's output -> our metric names: per-task `task/metric[,filter]`, then acc, ppl, ece, ifeval, gsm8k.

    acc, ece, ifeval and gsm8k are x100 (the paper's columns); per-task values are lm-eval's own.
    """
    results = res["results"]
    out: dict[str, float] = {}
    for task, metrics in results.items():
        for key, v in metrics.items():
            x = _number(v)
            if "," not in key or x is None:  # alias, and 'N/A' stderrs
                continue
            metric, flt = key.split(",", 1)
            out[f"{task}/{metric}" if flt == "none" else f"{task}/{key}"] = x
    out["acc"] = 100 * float(np.mean([_metric(results, t, k) for t, k in suite.acc]))
    if suite.ppl:
        out["ppl"] = _metric(results, *suite.ppl)
    if suite.multiple_choice:
        out["ece"] = 100 * suite_ece(res["samples"], suite.multiple_choice)
    if suite.ifeval:
        out["ifeval"] = 100 * _metric(results, *suite.ifeval)
    if suite.gsm8k:
        out["gsm8k"] = 100 * _metric(results, *suite.gsm8k)
    return out


def _jsonable(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (set, frozenset)):
        return sorted(o, key=str)
    return str(o)  # callables in configs, dtypes, paths


def write_raw(res: dict, folder: Path) -> None:
    """lm-eval's output as it is: results.json (all but samples) and samples_<task>.jsonl; results last."""
    folder.mkdir(parents=True, exist_ok=True)
    for task, rows in res.get("samples", {}).items():
        atomic_write_text(
            folder / f"samples_{task}.jsonl", "".join(json.dumps(r, default=_jsonable) + "\n" for r in rows)
        )
    rest = {k: v for k, v in res.items() if k != "samples"}
    atomic_write_text(folder / "results.json", json.dumps(rest, default=_jsonable, indent=2))
