"""`sekd.load_results`: every run as one pandas row, for notebooks and your own plots.

    from sekd import load_results
    df = load_results("outputs/embedded")      # record.json files below it, else its results.csv

A row is `sekd.report.results.load_records`' (metrics, the resolved config flattened as `config.*`, costs as
`costs.*`) plus short names (ALIASES: the budgets `k` and `l`, the pieces, the costs) and the `setting` a
run was scored in (model, evaluation suite/split and eval.limit: a curve must not average a test and a
validation score, nor a 50-example score with a full one). docs/api.md lists every column.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Callable, Iterable

import pandas as pd

from sekd.report.results import limit_mark
from sekd.report.results import load_records as table_records
from sekd.report.tables import training_costs

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
    "pretrain_seconds": "costs.pretrain_seconds",
    "train_wall_s": "_train_wall_s",
    "tokens_per_s_device": "_tokens_per_s_device",  # training tokens/s per device: fair across world sizes
    "devices": "_devices",  # devices a run spanned: every rank's, and a teacher's own
}
NUMERIC = [
    "k",
    "l",
    "teacher_forward_tokens",
    "cache_bytes_read",
    "prepass_seconds",
    "cache_build_seconds",
    "pretrain_seconds",
    "train_wall_s",
    "tokens_per_s_device",
    "devices",
]


def env_path(name: str, default: str | Path) -> Path:
    """The path in environment variable `name` (else `default`); a relative one is taken from the folder the
    user ran the command in ($PWD, which the shell sets and Jupyter leaves as it was when it starts a kernel in
    the notebook's own folder), not from the kernel's working directory."""
    value = os.environ.get(name)
    if not value:
        return Path(default)
    path = Path(value).expanduser()
    invoked = os.environ.get("PWD")
    base = Path(invoked) if invoked and Path(invoked).is_dir() else Path.cwd()
    return path if path.is_absolute() else base / path


def cache_role(df: pd.DataFrame) -> pd.Series:
    """'built' for a run that built its offline teacher cache, 'reused' for one that read a cache built
    before, None for a run without one."""
    cache = df["config.classes.cache"] if "config.classes.cache" in df.columns else pd.Series(None, index=df.index)
    seconds = (
        df["costs.cache_build_seconds"] if "costs.cache_build_seconds" in df.columns else pd.Series(0.0, index=df.index)
    )
    built = pd.to_numeric(seconds, errors="coerce").fillna(0) > 0
    role = pd.Series("reused", index=df.index, dtype=object).where(~built, "built")
    return role.where(cache.notna(), None)


def _with_aliases(df: pd.DataFrame) -> pd.DataFrame:
    df = training_costs(df)
    for short, col in ALIASES.items():
        if short not in df.columns:
            df[short] = df[col] if col in df.columns else None
    for c in NUMERIC:
        df[c] = pd.to_numeric(df[c], errors="coerce")
    if "setting" not in df.columns:
        parts = [
            df[c].astype("string") if c in df.columns else pd.Series(pd.NA, index=df.index, dtype="string")
            for c in ("config.model.name", "config.eval.suite", "config.eval.split")
        ]
        df["setting"] = (parts[0] + " " + parts[1] + "/" + parts[2]).astype(object)  # 'embedded embedded/test'
        if "config.eval.limit" in df.columns:  # 'embedded embedded/test limit=50': never beside a full score
            marks = df["config.eval.limit"].map(limit_mark)
            df["setting"] = [
                s if s is None or pd.isna(s) or not m else f"{s} {m}" for s, m in zip(df["setting"], marks)
            ]
        df.loc[df["setting"].isna(), "setting"] = None
    if "cache_role" not in df.columns:
        df["cache_role"] = cache_role(df)
    return df


def load_runs(folders: Iterable[str | Path]) -> pd.DataFrame:
    """Every record.json under `folders`: `sekd.report.results.load_table_records`' columns plus ALIASES and `setting`."""
    df = table_records([Path(f) for f in folders])
    return df if df.empty else _with_aliases(df)


def load_results(source: str | Path) -> pd.DataFrame:
    """Rows from a results CSV, or from the record.json files under a folder (its results.csv if it has none).

    A CSV without config or cost columns (from an older `sekd-report`) gives k, l, the costs and `setting`
    back empty (NaN / None), so callers test for data, not for columns.
    """
    source = Path(source)
    if source.is_file():
        df = pd.read_csv(source)
    elif source.is_dir() and any(source.rglob("record.json")):
        return load_runs([source])
    elif (source / "results.csv").is_file():
        df = pd.read_csv(source / "results.csv")
    else:
        print(f"sekd: load_results: nothing to read at {source} (no CSV, no record.json below it)", file=sys.stderr)
        return pd.DataFrame()
    return _with_aliases(df)


def one_setting(
    df: pd.DataFrame, rows: Callable[[pd.DataFrame], pd.DataFrame] = lambda d: d, want: str | None = None
) -> tuple[str | None, pd.DataFrame]:
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
