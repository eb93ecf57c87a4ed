"""Evaluation suites: which lm-eval tasks run, and which result fills which reported column (docs/method.md §11).

- `embedded`: the local tasks of `tasks.py` on the held-out corpus (split test or validation).
- `task`: the embedded tasks plus the arithmetic generation task `sekd_arith_<split>` of `generation.py`;
  Acc. = mean of choice acc, last-word acc and arith strict-match; the gsm8k column = the arith match.
- `paper`: arc_easy, hellaswag, piqa, lambada_openai (acc, perplexity), gsm8k (strict-match), ifeval
  (prompt-level strict, at most 512 new tokens as the paper's runs; lm-eval's own config allows 1280).
- `validation` (choosing k and l): arc_easy, gsm8k, hellaswag, piqa on validation data: hellaswag and piqa
  as in `paper`, `sekd_arc_easy_validation` without a test split (lm-eval falls back to validation), and
  `sekd_gsm8k_validation` on the last 500 training problems, its few-shot examples drawn from the others.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Callable

from sekd.core.registry import Registry

Metric = tuple[str, str]  # (task name in lm-eval's results, "metric,filter" key)

GSM8K_HELD_OUT = 500
IFEVAL_MAX_GEN_TOKS = 512  # the paper's runs; lm-eval's ifeval.yaml says 1280


@dataclass(frozen=True)
class Suite:
    """Tasks to run and the columns they give; a `derived` task is a built-in config with overrides."""

    name: str
    split: str
    tasks: tuple[str, ...]
    acc: tuple[Metric, ...]  # averaged, unweighted, into Acc.
    multiple_choice: tuple[str, ...]  # ECE is averaged over these
    ppl: Metric | None = None
    ifeval: Metric | None = None
    gsm8k: Metric | None = None
    derived: dict[str, tuple[str, dict[str, Any]]] = field(default_factory=dict)
    embedded: bool = False
    arith: str | None = None  # the embedded arithmetic generation task (generation.py), built locally


SUITES: Registry[Callable[..., Suite]] = Registry("suite")  # (split, [gsm8k_validation_size]) -> Suite


def _check_split(name: str, split: str | None, allowed: tuple[str, ...]) -> str:
    """None means the suite's own split (the first allowed)."""
    if split is None:
        return allowed[0]
    if split not in allowed:
        raise ValueError(f"suite {name!r} runs on split {' or '.join(map(repr, allowed))}, not {split!r}")
    return split


def get_suite(name: str, split: str | None = None, *, gsm8k_validation_size: int = GSM8K_HELD_OUT) -> Suite:
    """The named suite on `split` (None: the suite's own split). Unknown names raise, listing the known.
    `gsm8k_validation_size`: how many of GSM8K's last training problems the validation suite scores."""
    fn = SUITES.get(name)
    if "gsm8k_validation_size" in SUITES.options(name):
        return fn(split, gsm8k_validation_size=gsm8k_validation_size)
    return fn(split)


@SUITES.register("embedded")
def embedded(split: str | None) -> Suite:
    split = _check_split("embedded", split, ("test", "validation"))
    choice, lastword = f"sekd_choice_{split}", f"sekd_lastword_{split}"
    return Suite(
        name="embedded",
        split=split,
        tasks=(choice, lastword),
        acc=((choice, "acc,none"), (lastword, "acc,none")),
        multiple_choice=(choice,),
        ppl=(lastword, "perplexity,none"),
        embedded=True,
    )


@SUITES.register("task")
def task(split: str | None) -> Suite:
    split = _check_split("task", split, ("test", "validation"))
    choice, lastword, arith = f"sekd_choice_{split}", f"sekd_lastword_{split}", f"sekd_arith_{split}"
    return Suite(
        name="task",
        split=split,
        tasks=(choice, lastword, arith),
        acc=((choice, "acc,none"), (lastword, "acc,none"), (arith, "exact_match,strict-match")),
        multiple_choice=(choice,),
        ppl=(lastword, "perplexity,none"),
        gsm8k=(arith, "exact_match,strict-match"),
        embedded=True,
        arith=arith,
    )


@SUITES.register("paper")
def paper(split: str | None) -> Suite:
    split = _check_split("paper", split, ("test",))
    return Suite(
        name="paper",
        split=split,
        tasks=("arc_easy", "hellaswag", "piqa", "lambada_openai", "gsm8k", "ifeval"),
        acc=(
            ("arc_easy", "acc,none"),
            ("hellaswag", "acc,none"),
            ("piqa", "acc,none"),
            ("lambada_openai", "acc,none"),
            ("gsm8k", "exact_match,strict-match"),
        ),
        multiple_choice=("arc_easy", "hellaswag", "piqa"),
        ppl=("lambada_openai", "perplexity,none"),
        ifeval=("ifeval", "prompt_level_strict_acc,none"),
        gsm8k=("gsm8k", "exact_match,strict-match"),
        # the same task name, lm-eval's config with the generation length capped (merged into its kwargs)
        derived={"ifeval": ("ifeval", {"generation_kwargs": {"max_gen_toks": IFEVAL_MAX_GEN_TOKS}})},
    )


def gsm8k_held_out(dataset: Any, n_held: int = GSM8K_HELD_OUT) -> Any:
    """The last n_held training problems: our GSM8K validation set."""
    n = len(dataset)
    return dataset.select(range(n - n_held, n))


def gsm8k_fewshot_pool(dataset: Any, n_held: int = GSM8K_HELD_OUT) -> Any:
    """The training problems not held out, for few-shot examples."""
    return dataset.select(range(len(dataset) - n_held))


@SUITES.register("validation")
def validation(split: str | None, *, gsm8k_validation_size: int = GSM8K_HELD_OUT) -> Suite:
    split = _check_split("validation", split, ("validation",))
    arc, gsm = "sekd_arc_easy_validation", "sekd_gsm8k_validation"
    return Suite(
        name="validation",
        split=split,
        tasks=(arc, gsm, "hellaswag", "piqa"),
        acc=((arc, "acc,none"), (gsm, "exact_match,strict-match"), ("hellaswag", "acc,none"), ("piqa", "acc,none")),
        multiple_choice=(arc, "hellaswag", "piqa"),
        gsm8k=(gsm, "exact_match,strict-match"),
        derived={
            arc: ("arc_easy", {"test_split": None}),
            gsm: (
                "gsm8k",
                {
                    "test_split": "train",
                    "process_docs": functools.partial(gsm8k_held_out, n_held=gsm8k_validation_size),
                    "fewshot_config": {
                        "process_docs": functools.partial(gsm8k_fewshot_pool, n_held=gsm8k_validation_size)
                    },
                },
            ),
        },
    )


def lm_eval_tasks(suite: Suite, task_manager: Any) -> list[str | dict[str, Any]]:
    """What to pass as simple_evaluate(tasks=...): names, and inline configs for derived tasks."""
    from lm_eval.tasks._yaml_loader import load_yaml

    out: list[str | dict[str, Any]] = []
    for name in suite.tasks:
        if name not in suite.derived:
            out.append(name)
            continue
        base, overrides = suite.derived[name]
        entry = task_manager.task_index.get(base)
        if entry is None or entry.yaml_path is None:
            raise ValueError(f"{name}: lm-eval has no YAML task {base!r} to derive from")
        cfg = load_yaml(entry.yaml_path, resolve_func=True)
        for key in ("tag", "group", "task_alias"):  # the derived task joins none of the base's tags
            cfg.pop(key, None)
        merged = {
            k: {**cfg[k], **v} if isinstance(v, dict) and isinstance(cfg.get(k), dict) else v
            for k, v in overrides.items()
        }  # a dict override updates the base's dict (generation_kwargs)
        out.append({**cfg, **merged, "task": name})
    return out
