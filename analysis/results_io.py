"""Results as one pandas table for the notebooks: `sekd.report` rows plus short names for the budgets and costs.

`sekd.report.load_table_records` gives one row per run with its metrics and, flattened, its resolved config
(`config.*`) and costs (`costs.*`). The figures need a few of those under short names: the budgets
`k` and `l`, the costs, and the `setting` a run was scored in (model and evaluation split: a curve must
not average test and validation accuracies). `load_results` accepts run folders or a results CSV.

    from analysis.results_io import load_results
    df = load_results("outputs/embedded")      # record.json files below it, else its results.csv
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable, Iterable

import pandas as pd

from sekd.report import load_table_records as table_records

ALIASES = {  # short name -> the flattened column of record.json it copies
    "k": "config.position.k",
    "l": "config.samples.l",
    "policy": "config.position.policy",
    "signal": "config.position.signal",
    "sampler": "config.samples.name",
    "classes": "config.classes.name",
    "model_name": "config.model.name",
    "teacher_forward_tokens": "costs.teacher_forward_tokens",
    "cache_bytes_read": "costs.cache_bytes_read",
    "prepass_seconds": "costs.prepass_seconds",
    "cache_build_seconds": "costs.cache_build_seconds",
}
NUMERIC = ["k", "l", "teacher_forward_tokens", "cache_bytes_read", "prepass_seconds", "cache_build_seconds"]


def _with_aliases(df: pd.DataFrame) -> pd.DataFrame:
    df = df.copy()
    for short, col in ALIASES.items():
        if short not in df.columns:
            df[short] = df[col] if col in df.columns else None
    for c in NUMERIC:
        df[c] = pd.to_numeric(df[c], errors="coerce")
    if "setting" not in df.columns:
        parts = [df[c].astype("string") if c in df.columns else pd.Series(pd.NA, index=df.index, dtype="string")
                 for c in ("config.model.name", "config.eval.suite", "config.eval.split")]
        df["setting"] = (parts[0] + " " + parts[1] + "/" + parts[2]).astype(object)  # 'embedded embedded/test'
        df.loc[df["setting"].isna(), "setting"] = None
    return df


def load_runs(folders: Iterable[str | Path]) -> pd.DataFrame:
    """Every record.json under `folders`: `sekd.report.load_table_records`' columns plus ALIASES and `setting`."""
    df = table_records([Path(f) for f in folders])
    return df if df.empty else _with_aliases(df)


def load_results(source: str | Path) -> pd.DataFrame:
    """Rows from a results CSV, or from the record.json files under a folder (its results.csv if it has none).

    A CSV written by `sekd-report` has no config or cost columns: k, l, the costs and `setting` come back
    empty (NaN / None), so callers test for data, not for columns.
    """
    source = Path(source)
    if source.is_file():
        df = pd.read_csv(source)
    elif source.is_dir() and any(source.rglob("record.json")):
        return load_runs([source])
    elif (source / "results.csv").is_file():
        df = pd.read_csv(source / "results.csv")
    else:
        print(f"results_io: nothing to read at {source} (no CSV, no record.json below it)", file=sys.stderr)
        return pd.DataFrame()
    return _with_aliases(df)


def one_setting(df: pd.DataFrame, rows: Callable[[pd.DataFrame], pd.DataFrame] = lambda d: d,
                want: str | None = None) -> tuple[str | None, pd.DataFrame]:
    """The runs of one setting (model and evaluation): `want`, else the one where `rows(part)` is longest.

    Runs without a setting (a results CSV) count as one setting, None. Returns (setting, its runs).
    """
    if df.empty or "setting" not in df.columns or df["setting"].isna().all():
        return None, df
    parts = {s: df[df["setting"] == s] for s in df["setting"].dropna().unique()}
    if want is not None:
        if want not in parts:
            raise ValueError(f"no run was scored in setting {want!r}; settings: {', '.join(sorted(parts))}")
        return want, parts[want]
    best = max(parts, key=lambda s: len(rows(parts[s])))
    return best, parts[best]
