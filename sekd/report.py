"""`sekd-report`: gather every run's record.json into one pandas table; mean ± std over seeds per method.

    sekd-report outputs/demo --out outputs/demo
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd

from sekd.io import atomic_write_text

HEADLINE = {"acc": "Acc.", "ifeval": "IFEval", "ppl": "PPL", "ece": "ECE", "gsm8k": "GSM8K"}
MODE_ORDER = {"score_student": 0, "score_teacher": 1, "distill": 2}


def load_records(folders: list[Path]) -> pd.DataFrame:
    """One row per run: identity, flattened metrics (`metric` columns) and costs."""
    rows = []
    for folder in folders:
        for path in sorted(Path(folder).rglob("record.json")):
            try:
                rec = json.loads(path.read_text())
            except json.JSONDecodeError as err:
                print(f"sekd-report: skipping {path}: not valid JSON ({err})", file=sys.stderr)
                continue
            row = {k: rec.get(k) for k in ("preset", "label", "mode", "seed", "config_hash", "steps",
                                            "tokens_seen", "tokens_supervised", "train_time_s", "wall_time_s",
                                            "peak_memory_mb", "git_commit", "run_dir", "finished_at", "train_samples")}
            row.update({k: v for k, v in rec.get("metrics", {}).items() if isinstance(v, (int, float))})
            rows.append(row)
    df = pd.DataFrame(rows)
    if df.empty:
        return df
    # the undistilled student and the teacher first, then methods in the order they were run (the grid's)
    df["_mode"] = df["mode"].map(MODE_ORDER).fillna(3)
    df["_first"] = df.groupby("preset")["finished_at"].transform("min")
    return df.sort_values(["_mode", "_first", "seed"]).drop(columns=["_mode", "_first"]).reset_index(drop=True)


def summarize(df: pd.DataFrame) -> pd.DataFrame:
    """Per method: mean and std over seeds of every numeric column, and the number of seeds."""
    numeric = [c for c in df.columns if pd.api.types.is_numeric_dtype(df[c]) and c != "seed"]
    g = df.groupby(["preset", "label"], sort=False)
    out = g[numeric].agg(["mean", "std"])
    out[("seeds", "n")] = g["seed"].nunique()
    return out


def fmt(mean: float, std: float, digits: int = 1) -> str:
    if pd.isna(mean):
        return "–"
    return f"{mean:.{digits}f}" if pd.isna(std) else f"{mean:.{digits}f} ± {std:.{digits}f}"


def markdown_table(df: pd.DataFrame) -> str:
    """The headline table: Method | Acc. | PPL | ECE | (per-task accuracies) | seeds."""
    s = summarize(df)
    metrics = [m for m in HEADLINE if (m, "mean") in s.columns]
    tasks = sorted(c[0] for c in s.columns if c[1] == "mean" and c[0].endswith("/acc"))
    rows = []
    for (preset, label), r in s.iterrows():
        row = {"Method": label, "preset": preset}
        for m in metrics:
            row[HEADLINE[m]] = fmt(r[(m, "mean")], r[(m, "std")], 2 if m == "ppl" else 1)
        for tcol in tasks:
            row[tcol.removesuffix("/acc")] = fmt(100 * r[(tcol, "mean")], 100 * r[(tcol, "std")])
        row["seeds"] = int(r[("seeds", "n")])
        rows.append(row)
    return pd.DataFrame(rows).to_markdown(index=False)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="sekd-report", description=__doc__.splitlines()[0])
    ap.add_argument("folders", nargs="+", type=Path, help="folders searched (recursively) for record.json")
    ap.add_argument("--out", type=Path, default=None, help="write results.csv and table.md here")
    args = ap.parse_args(argv)
    for f in args.folders:
        if not f.exists():
            print(f"sekd-report: {f}: no such folder", file=sys.stderr)
            return 2
    df = load_records(args.folders)
    if df.empty:
        print(f"sekd-report: no record.json under {', '.join(map(str, args.folders))}", file=sys.stderr)
        return 1
    table = markdown_table(df)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.out / "results.csv", df.to_csv(index=False))
        atomic_write_text(args.out / "table.md", table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
