"""`sekd-report`: gather every run's record.json into one pandas table; mean ± std over seeds per method.

    sekd-report outputs/demo --out outputs/demo
    sekd-report outputs/embedded --table T2 --table T7 --out outputs/embedded/tables   # the paper's layout
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import pandas as pd
from omegaconf import OmegaConf

from sekd import tables
from sekd.io import atomic_write_text

HEADLINE = {"acc": "Acc.", "ifeval": "IFEval", "ppl": "PPL", "ece": "ECE", "gsm8k": "GSM8K"}
MODE_ORDER = {"score_student": 0, "score_teacher": 1, "distill": 2}


def read_records(folders: list[Path]) -> list[dict]:
    """Every record.json under `folders` (recursively), parsed; a broken one is reported and skipped."""
    recs = []
    for folder in folders:
        for path in sorted(Path(folder).rglob("record.json")):
            try:
                recs.append(json.loads(path.read_text()))
            except json.JSONDecodeError as err:
                print(f"sekd-report: skipping {path}: not valid JSON ({err})", file=sys.stderr)
    return recs


def load_records(folders: list[Path], recs: list[dict] | None = None) -> pd.DataFrame:
    """One row per run: identity, flattened metrics (`metric` columns) and costs."""
    rows = []
    for rec in read_records(folders) if recs is None else recs:
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


def flatten(tree: Any, prefix: str) -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'<prefix>.a.b': 1}; empty dicts and lists stay leaves."""
    if isinstance(tree, dict) and tree:
        return {k: v for key, sub in tree.items() for k, v in flatten(sub, f"{prefix}.{key}").items()}
    return {prefix: tree}


def load_details(recs: list[dict]) -> pd.DataFrame:
    """Per run (by run_dir): its resolved config as `config.*` and its costs as `costs.*` columns."""
    rows = [{"run_dir": rec.get("run_dir"), **flatten(rec.get("config") or {}, "config"),
             **flatten(rec.get("costs") or {}, "costs")} for rec in recs]
    return pd.DataFrame(rows).drop_duplicates("run_dir") if rows else pd.DataFrame(columns=["run_dir"])


# The keys that make a method: the three selection axes, the criterion and the mode. Where a cache
# lives and how many samples a pre-pass batches change nothing the table compares.
AXES = ("position.", "classes.", "samples.", "criterion.")
NOT_AXES = ("classes.cache", "samples.batch_size")


def is_axis(key: str) -> bool:
    return key == "mode" or key.startswith(AXES) and key not in NOT_AXES


def preset_axes(presets: list[str]) -> pd.DataFrame:
    """Per preset (index): its method keys as composed from conf/experiment, canonical strings (tables.canon)."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException

    rows = {}
    with initialize_config_dir(config_dir=str(tables.ROOT / "conf"), version_base="1.3"):
        for preset in presets:
            try:
                cfg = compose(config_name="config", overrides=[f"experiment={preset}"])
            except HydraException:  # a preset this checkout does not have: its runs match by name alone
                continue
            flat = flatten(OmegaConf.to_container(cfg, resolve=True), "")
            rows[preset] = {k[1:]: tables.canon(v) for k, v in flat.items() if is_axis(k[1:])}
    return pd.DataFrame.from_dict(rows, orient="index")


def load_table_records(folders: list[Path]) -> pd.DataFrame:
    """load_records' rows plus each run's config and costs, for the paper-layout tables."""
    recs = read_records(folders)  # read once, for both views
    df = load_records(folders, recs)
    return df.merge(load_details(recs), on="run_dir", how="left") if not df.empty else df


def write_tables(df: pd.DataFrame, names: list[str], out: Path | None) -> str:
    """Each named table as markdown (returned, and with --out as table_<T>.md), CSV and LaTeX."""
    reference = pd.read_csv(tables.REFERENCE)
    axes = preset_axes(sorted(set(reference["preset"].dropna()) & set(df["preset"].dropna())))
    shown = []
    for name in names:
        frame = tables.paper_table(df, reference, name, axes)
        md = tables.to_markdown(frame, name)
        shown.append(md)
        if out:
            out.mkdir(parents=True, exist_ok=True)
            atomic_write_text(out / f"table_{name}.md", md + "\n")
            atomic_write_text(out / f"table_{name}.csv", frame.to_csv(index=False))
            atomic_write_text(out / f"table_{name}.tex", tables.to_latex(frame, name))
    return "\n\n".join(shown)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="sekd-report", description=__doc__.splitlines()[0])
    ap.add_argument("folders", nargs="+", type=Path, help="folders searched (recursively) for record.json")
    ap.add_argument("--out", type=Path, default=None,
                    help="write results.csv and table.md here (with --table: table_<T>.md, .csv, .tex)")
    ap.add_argument("--table", action="append", choices=tables.TABLES, default=None,
                    help="print the paper's table T in its layout (rows, order, columns), ours beside the paper's; "
                         "repeat for several")
    args = ap.parse_args(argv)
    for f in args.folders:
        if not f.exists():
            print(f"sekd-report: {f}: no such folder", file=sys.stderr)
            return 2
    df = load_table_records(args.folders) if args.table else load_records(args.folders)
    if df.empty:
        print(f"sekd-report: no record.json under {', '.join(map(str, args.folders))}", file=sys.stderr)
        return 1
    if args.table:
        models = sorted(df["config.model.name"].dropna().unique()) if "config.model.name" in df else []
        if len(models) > 1:  # one table must not average the embedded pair with Qwen3
            print(f"sekd-report: runs of several models ({', '.join(models)}); point --table at one profile's "
                  f"folder (outputs/embedded or outputs/paper)", file=sys.stderr)
            return 2
        print(write_tables(df, args.table, args.out))
        return 0
    table = markdown_table(df)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.out / "results.csv", df.to_csv(index=False))
        atomic_write_text(args.out / "table.md", table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
