"""The paper's tables from our runs: its rows in its order, its columns, our mean ± std over seeds beside its value.

Pure functions over DataFrames; `sekd-report --table T2` (sekd/report/results.py) loads the records and writes
the files. The paper's numbers ship with the package (sekd/report/paper/, package data, so nothing reads the
repository at run time): paper_reference.csv, regenerated from the paper's published tables
(paper_tables.csv, paper_efficiency.csv) and paper_rows.csv (which preset each paper row is) by

    python -m sekd.report.tables
"""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path
from typing import Any, Callable

import pandas as pd

PAPER_DIR = Path(__file__).resolve().parent / "paper"  # the paper's published numbers, as its tables print them
REFERENCE = PAPER_DIR / "paper_reference.csv"
PAPER_ROWS = PAPER_DIR / "paper_rows.csv"
REFERENCE_COLUMNS = [
    "table",
    "section",
    "method",
    "preset",
    "acc",
    "ifeval",
    "ppl",
    "ece",
    "gsm8k",
    "wall_s",
    "selection_s",
    "notes",
]

# table -> its columns, as the paper prints them
COLUMNS = {
    "T2": ["acc", "ifeval", "ppl", "ece"],
    "T3": ["acc", "ifeval", "ppl", "ece"],
    "T4": ["acc", "ifeval", "ppl", "ece"],
    "T5": ["acc", "ppl", "gsm8k"],
    "T7": ["wall_s", "selection_s", "teacher_tokens", "tokens_per_s_device", "acc"],
    "V1": ["acc"],
    "V2": ["acc"],
}
TABLES = tuple(COLUMNS)
HEADER = {
    "acc": "Acc.",
    "ifeval": "IFEval",
    "ppl": "PPL",
    "ece": "ECE",
    "gsm8k": "GSM8K",
    "wall_s": "Wall time",
    "selection_s": "Sample selection",
    "teacher_tokens": "Teacher tokens",
    "tokens_per_s_device": "Tokens/s per device",
}
LOWER_IS_BETTER = {"ppl", "ece", "wall_s", "selection_s", "teacher_tokens"}
# column -> the record column holding ours (metrics are their own column; training_costs adds the _ ones)
SOURCE = {
    "wall_s": "_train_wall_s",
    "selection_s": "_selection_s",
    "teacher_tokens": "costs.teacher_forward_tokens",
    "tokens_per_s_device": "_tokens_per_s_device",
}
METRICS = ("acc", "ifeval", "ppl", "ece", "gsm8k")  # a run holding one of them was scored
# what a sample pre-pass costs depends on: runs sharing these share one stored set of sample scores
PREPASS_KEY = ("config.samples.name", "config.model.name", "config.data.name", "config.data.seq_len")
VALIDATION = {"V1", "V2"}
GENERAL_DATA = (
    "embedded",
    "fineweb_edu",
)  # the general-purpose regime (docs/method.md §10); anything else is task data
MISSING = "–"

# The offline cache's two T7 rows are one preset; a run's costs say which it was.
VARIANTS: dict[tuple[str, str], Callable[[pd.DataFrame], pd.Series]] = {
    ("T7", "SE-KD3X (cache construction)"): lambda r: r["costs.cache_build_seconds"].fillna(0) > 0,
    ("T7", "SE-KD3X (reuse offline cache)"): lambda r: r["costs.cache_build_seconds"].fillna(0) == 0,
}

# Rows of paper_efficiency.csv (T7) that paper_rows.csv does not map.
T7_PRESETS = {
    "Full KD (100% positions)": "full_kd",
    "RandomPos 20%": "random_pos",
    "TopSmp CE ratio": "top_smp_ce_ratio",
    "TopSmp KL": "top_smp_kl",
    "TopSmp student entropy": "top_smp",
    "SE-KD3X (cache construction)": "se_kd3x",
    "SE-KD3X (reuse offline cache)": "se_kd3x",
}


# ---- the paper's numbers --------------------------------------------------------------------


def hours(text: Any) -> float:
    """'22h52m' -> seconds; anything else -> NaN."""
    m = re.fullmatch(r"\s*(\d+)h(\d+)m\s*", str(text))
    return float(int(m[1]) * 3600 + int(m[2]) * 60) if m else math.nan


def _note(pattern: str, notes: pd.Series) -> pd.Series:
    return notes.fillna("").str.extract(pattern, expand=False)


def build_reference(tables: pd.DataFrame, efficiency: pd.DataFrame, rows: pd.DataFrame) -> pd.DataFrame:
    """paper_tables.csv (T2-T5, V1, V2) + paper_efficiency.csv (T7) + paper_rows.csv -> paper_reference.csv rows."""
    main = tables[tables["table"].isin(["T2", "T3", "T4", "T5", "V1", "V2"])].rename(columns={"gsm8k_acc": "gsm8k"})
    # T5 names its methods twice (off-policy, on-policy): the section tells the rows apart
    main = main.merge(rows[["table", "section", "method", "preset"]], on=["table", "section", "method"], how="left")
    eff = efficiency[efficiency["table"].eq("T7")]
    t7 = pd.DataFrame(
        {
            "table": "T7",
            "section": "runtime",
            "method": eff["configuration"],
            "preset": eff["configuration"].map(T7_PRESETS),
            "acc": pd.to_numeric(_note(r"acc ([\d.]+)", eff["notes"])),
            "wall_s": eff["wall"].map(hours),
            # 'sample-selection time 0h00m', 'sample-selection scoring 8h50m', 'scoring 2h11m'
            "selection_s": _note(r"(?:selection|time|scoring) (\d+h\d+m)", eff["notes"]).map(hours),
            "notes": eff["notes"],
        }
    )
    return pd.concat([main, t7], ignore_index=True).reindex(columns=REFERENCE_COLUMNS)


def reference_rows(reference: pd.DataFrame, table: str) -> pd.DataFrame:
    """The paper's rows of one table, in its order, with a display label unique within the table."""
    ref = reference[reference["table"].eq(table)].reset_index(drop=True)
    dup = ref["method"].duplicated()  # T5 repeats its methods under on-policy: name the later section
    ref["label"] = ref["method"].where(~dup, ref["method"] + " (" + ref["section"].astype(str) + ")")
    ref["preset"] = ref["preset"].astype(object).where(ref["preset"].notna(), None)
    return ref.reindex(columns=[*ref.columns, *[c for c in COLUMNS[table] if c not in ref.columns]])


# ---- our runs -------------------------------------------------------------------------------


def canon(value: Any) -> str:
    """One spelling per value, so a config read back from JSON compares equal to one composed fresh."""
    if isinstance(value, float) and math.isnan(value):
        value = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = float(value)
    return json.dumps(value, sort_keys=True)


def method_matches(records: pd.DataFrame, axes: pd.DataFrame | None) -> pd.Series:
    """Does each run's method (its `config.*` selection keys) equal its preset's as composed (`axes`, by preset)?

    Keeps a budget sweep's SE-KD at k = 1% out of the SE-KD row. Presets absent from `axes` match."""
    if axes is None or axes.empty or records.empty:
        return pd.Series(True, index=records.index)
    ref = axes.reindex(records["preset"]).set_axis(records.index)
    cols = [c for c in ref.columns if f"config.{c}" in records.columns]
    ours = records[[f"config.{c}" for c in cols]].set_axis(cols, axis=1).map(canon)
    return ((ours == ref[cols]) | ref[cols].isna()).all(axis=1)


def _col(df: pd.DataFrame, name: str) -> pd.Series:
    return df[name] if name in df.columns else pd.Series(None, index=df.index, dtype=object)


def table_records(records: pd.DataFrame, table: str, axes: pd.DataFrame | None = None) -> pd.DataFrame:
    """The runs a table may use: its split (V1, V2: validation; else test), its regime, the preset as it is."""
    r = records
    split, suite = _col(r, "config.eval.split"), _col(r, "config.eval.suite")
    on_validation = split.eq("validation") | suite.eq("validation")
    keep = on_validation if table in VALIDATION else split.eq("test") & ~on_validation
    general = _col(r, "config.data.name").isin(GENERAL_DATA)
    keep &= ~general if table == "T5" else general  # T5 is the task-specific (GSM8K) regime
    return r[keep & method_matches(r, axes)]


def _num(df: pd.DataFrame, name: str) -> pd.Series:
    return pd.to_numeric(_col(df, name), errors="coerce")


def training_costs(records: pd.DataFrame) -> pd.DataFrame:
    """Add `_selection_s` and `_train_wall_s`, the training pipeline's cost per run.

    `_tokens_per_s_device`: training tokens per second of distillation per device (`_devices`: every
    rank's, and a teacher's own), so runs at different world sizes compare.

    `_selection_s`: the sample pre-pass's seconds in runs that ran it (NaN where the scores were reused
    from an earlier run). `_train_wall_s`: distillation (`train_time_s`) + the cache build this run paid +
    the pre-pass at the mean of the runs that ran it (same sampler, model and data), so the run that
    happened to go first does not carry it alone. Not the embedded pair's pretraining, not scoring.
    Records from before `costs.pretrain_seconds` existed timed all of that together: their wall_time_s.
    """
    r = records.copy()
    reused = _col(r, "costs.prepass_reused").astype("boolean").fillna(False).astype(bool)
    r["_selection_s"] = _num(r, "costs.prepass_seconds").where(~reused)
    keys = [r[c].map(canon) for c in PREPASS_KEY if c in r.columns]
    paid = r["_selection_s"].groupby(keys, dropna=False).transform("mean") if keys else r["_selection_s"]
    wall = _num(r, "train_time_s") + _num(r, "costs.cache_build_seconds").fillna(0) + paid.fillna(0)
    r["_train_wall_s"] = wall.where(_col(r, "costs.pretrain_seconds").notna(), _num(r, "wall_time_s"))
    r["_devices"] = _num(r, "device_count").fillna(1)  # records from before world sizes: one process
    r["_tokens_per_s_device"] = _num(r, "tokens_seen") / _num(r, "train_time_s").where(lambda s: s > 0) / r["_devices"]
    return r


def full_evaluations(m: pd.DataFrame) -> pd.DataFrame:
    """Per paper row, only its runs scored on the most examples (the full set beats any eval.limit): a
    limited evaluation never averages with a full one. Adds `limit` (NaN: the full set)."""
    limit = _num(m, "config.eval.limit")
    size = limit.fillna(math.inf)
    return m[size.eq(size.groupby(m["row"]).transform("max"))].assign(limit=limit)


def match_rows(ref: pd.DataFrame, records: pd.DataFrame, table: str) -> pd.DataFrame:
    """One row per (paper row, run of its preset), the row's variant filter applied (T7's SE-KD3X)."""
    m = ref[["method", "preset"]].reset_index(names="row").merge(records, on="preset")
    keep = pd.Series(True, index=m.index)
    for (t, method), pred in VARIANTS.items():
        if t == table and not m.empty:
            keep &= ~m["method"].eq(method) | pred(m)
    return full_evaluations(m[keep])


def paper_table(
    records: pd.DataFrame, reference: pd.DataFrame, table: str, axes: pd.DataFrame | None = None
) -> pd.DataFrame:
    """One row per paper row: n_seeds and, per column, <c>_ours_mean, <c>_ours_std, <c>_paper, <c>_best."""
    if table not in COLUMNS:
        raise ValueError(f"unknown table {table!r}; choose one of: {', '.join(TABLES)}")
    ref = reference_rows(reference, table)
    cols = COLUMNS[table]
    recs = training_costs(records)
    recs = recs.assign(**{c: recs[SOURCE[c]] if SOURCE.get(c) in recs else recs.get(c, math.nan) for c in cols})
    m = match_rows(ref, table_records(recs, table, axes), table)
    g = m.groupby("row")
    stats = g[cols].agg(["mean", "std"]).reindex(ref.index)
    distilled = m["mode"].eq("distill").groupby(m["row"]).all().reindex(ref.index, fill_value=False)
    out = ref[["table", "section", "method", "label", "preset"]].copy()
    limit = g["limit"].first().reindex(ref.index)
    out["label"] = [lab if pd.isna(n) else f"{lab} (limit={int(n)})" for lab, n in zip(out["label"], limit)]
    if table == "T7":  # runs of a row may have spanned different numbers of devices: say how many
        devices = m.groupby("row")["_devices"].agg(lambda d: sorted({int(x) for x in d})).reindex(ref.index)
        out["devices"] = devices.map(lambda d: "/".join(map(str, d)) if isinstance(d, list) else "")
        out["label"] = [
            lab if d in ("", "1") else f"{lab} ({d} devices)" for lab, d in zip(out["label"], out["devices"])
        ]
    out["eval_limit"] = limit
    metrics = [c for c in METRICS if c in m.columns]
    was_scored = m[metrics].notna().any(axis=1) if metrics else pd.Series(False, index=m.index)
    out["n_seeds"] = m[was_scored].groupby("row")["seed"].nunique().reindex(ref.index).fillna(0).astype(int)
    full = limit.isna() & out["n_seeds"].gt(0)
    comparable = limit.isna() if full.any() else pd.Series(True, index=ref.index)  # a limited score is no rival
    for c in cols:
        mean = stats[(c, "mean")].astype(float)
        out[f"{c}_ours_mean"] = mean
        out[f"{c}_ours_std"] = stats[(c, "std")].astype(float)
        out[f"{c}_paper"] = pd.to_numeric(ref[c], errors="coerce")
        ours = mean.where(distilled & comparable)  # bold only among our distilled rows, as the paper does
        best = ours.min() if c in LOWER_IS_BETTER else ours.max()
        out[f"{c}_best"] = ours.eq(best) & ours.notna()
    return out


# ---- within or beyond seed noise -------------------------------------------------------------

NOISE_ALPHA = 0.05  # a difference whose two-sided paired p-value is below this is beyond seed noise
BEYOND, WITHIN, CANNOT_TELL = "beyond noise", "within noise", "cannot tell"


def paired_difference(ours: pd.Series, ref: pd.Series, alpha: float = NOISE_ALPHA) -> dict[str, Any]:
    """`ours` - `ref` over the seeds both hold (each indexed by seed): {diff (mean), n, p, verdict}.

    A paired t-test (scipy.stats.ttest_rel, two-sided) over the seeds: pairing removes what a seed does to
    both runs alike (its data order, its random keys), so the test asks only whether the method moved the
    metric. With 2 seeds the test has one degree of freedom and calls almost nothing beyond noise: that is
    the honest answer for 2 seeds. Fewer than 2 paired seeds: 'cannot tell'."""
    both = pd.concat(
        [pd.to_numeric(ours, errors="coerce"), pd.to_numeric(ref, errors="coerce")], axis=1, join="inner"
    ).dropna()
    diff = both.iloc[:, 0] - both.iloc[:, 1]
    n = len(diff)
    mean = float(diff.mean()) if n else math.nan
    if n < 2:
        return {"diff": mean, "n": n, "p": math.nan, "verdict": CANNOT_TELL}
    if diff.std() == 0:  # the same difference under every seed: no spread to test against
        p = 0.0 if mean != 0 else 1.0
    else:
        from scipy.stats import ttest_rel

        p = float(ttest_rel(both.iloc[:, 0], both.iloc[:, 1]).pvalue)
    return {"diff": mean, "n": n, "p": p, "verdict": BEYOND if p < alpha else WITHIN}


def fmt_difference(d: dict[str, Any], digits: int = 1) -> str:
    """'-2.3 beyond noise (p=0.004, n=3)', '+0.4 within noise (p=0.62, n=3)', '+0.4 cannot tell (n=1)'."""
    if d["n"] == 0 or pd.isna(d["diff"]):
        return MISSING
    shown = f"{d['diff']:+.{digits}f}"
    if d["verdict"] == CANNOT_TELL:
        return f"{shown} {CANNOT_TELL} (n={d['n']})"
    return f"{shown} {d['verdict']} (p={d['p']:.2g}, n={d['n']})"


# ---- formatting -----------------------------------------------------------------------------


def fmt_duration(s: float) -> str:
    """Seconds as the paper writes hours ('22h52m'), or minutes/seconds for CPU-sized runs."""
    if s >= 3600:
        h, m = divmod(round(s / 60), 60)
        return f"{h}h{m:02d}m"
    if s >= 60:
        m, sec = divmod(round(s), 60)
        return f"{m}m{sec:02d}s"
    return f"{s:.1f}s"


def fmt_tokens(n: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.1f}{unit}"
    return f"{n:.0f}"


def fmt_value(col: str, x: float) -> str:
    if pd.isna(x):
        return MISSING
    if col in ("wall_s", "selection_s"):
        return fmt_duration(x)
    if col in ("teacher_tokens", "tokens_per_s_device"):
        return fmt_tokens(x)
    return f"{x:.1f}"


def cell(
    col: str,
    mean: float,
    std: float,
    paper: float,
    best: bool,
    *,
    pm: str = "±",
    bold: tuple[str, str] = ("**", "**"),
    missing: str = MISSING,
) -> str:
    """'64.8 ± 0.2 (64.4)': ours (bold when best), the paper's value in parentheses; '–' where there is none
    (a single seed's spread too: '64.8 ± – (64.4)')."""
    if pd.isna(mean):
        ours = missing
    else:  # one seed: 'x ± –', like every other cell
        ours = f"{fmt_value(col, mean)} {pm} {missing if pd.isna(std) else fmt_value(col, std)}"
        ours = f"{bold[0]}{ours}{bold[1]}" if best else ours
    theirs = fmt_value(col, paper).replace(MISSING, missing)
    return ours if ours == missing and theirs == missing else f"{ours} ({theirs})"


def display(frame: pd.DataFrame, *, method: Callable[[str], str] = str, **style: Any) -> pd.DataFrame:
    """The printable table: Method | <the table's columns> | n."""
    table = frame["table"].iloc[0] if len(frame) else None
    cols = COLUMNS.get(table, []) if table is not None else []
    out = pd.DataFrame({"Method": frame["label"].map(method)})
    for c in cols:
        out[HEADER[c]] = [
            cell(c, *v, **style)
            for v in frame[[f"{c}_ours_mean", f"{c}_ours_std", f"{c}_paper", f"{c}_best"]].itertuples(index=False)
        ]
    out["n"] = frame["n_seeds"]
    return out


def caption(table: str) -> str:
    text = (
        f"Table {table}: ours as mean ± std over n scored seeds, the paper's value in parentheses; "
        f"the best of our distilled rows per column in bold; {MISSING} where there is no run or no number; "
        "'limit=N': scored on the first N examples only."
    )
    if table == "T7":
        text += (
            " Wall time: sample selection, teacher-cache build and distillation (not pretraining the "
            "embedded pair, not scoring); the cache build counts only in the row of the runs that built it. "
            "Tokens/s per device: training tokens over distillation time and the devices a run spanned (every "
            "rank's, and a teacher's own); a row whose runs spanned several devices says how many."
        )
    return text


def to_markdown(frame: pd.DataFrame, table: str) -> str:
    # the cells as written: tabulate would reparse a number-like string ('0.0' as 0)
    return f"{caption(table)}\n\n{display(frame).to_markdown(index=False, disable_numparse=True)}"


LATEX_SPECIAL = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
}


def latex_escape(text: str) -> str:
    return "".join(LATEX_SPECIAL.get(ch, ch) for ch in str(text))


def to_latex(frame: pd.DataFrame, table: str) -> str:
    """A tabular environment: bold as \\textbf, ± as $\\pm$, missing as --."""
    shown = display(frame, method=latex_escape, pm=r"$\pm$", bold=(r"\textbf{", "}"), missing="--")
    body = shown.to_latex(index=False, escape=False, column_format="l" + "r" * (shown.shape[1] - 1))
    return f"% {latex_escape(caption(table))}\n{body}"


# ---- regenerate sekd/report/paper/paper_reference.csv ----------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """python -m sekd.report.tables [--paper DIR] [--out sekd/report/paper/paper_reference.csv]"""
    import argparse

    ap = argparse.ArgumentParser(
        prog="python -m sekd.report.tables", description="regenerate sekd/report/paper/paper_reference.csv"
    )
    ap.add_argument(
        "--paper",
        type=Path,
        default=PAPER_DIR,
        help="folder holding the paper's paper_tables.csv and paper_efficiency.csv (default: %(default)s)",
    )
    ap.add_argument("--out", type=Path, default=REFERENCE)
    args = ap.parse_args(argv)
    ref = build_reference(
        pd.read_csv(args.paper / "paper_tables.csv"),
        pd.read_csv(args.paper / "paper_efficiency.csv"),
        pd.read_csv(PAPER_ROWS),
    )
    from sekd.core.files import atomic_write_text

    atomic_write_text(args.out, ref.to_csv(index=False))
    print(f"wrote {len(ref)} rows to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
