"""`sekd-report`: gather every run's record.json into one pandas table; mean ± std over seeds per configuration.

Runs that differ in anything but the seed and the keys that cannot change a result (sekd.stores.runs.UNHASHED)
are separate rows, named by what differs (`Student entropy (SE-KD) (model.name=tiny)`, `... (limit=50)`) and
by what the run's own overrides changed (`... (position.signal=kl)`), each key once.

    sekd-report outputs/demo --out outputs/demo
    sekd-report outputs/embedded --table T2 --table T7 --out outputs/embedded/tables   # the paper's layout
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path
from typing import Any

import pandas as pd
from omegaconf import OmegaConf

from sekd.report import tables
from sekd.stores.runs import UNHASHED, covers, override_key
from sekd.core.files import atomic_write_text

HEADLINE = {"acc": "Acc.", "ifeval": "IFEval", "ppl": "PPL", "ece": "ECE", "gsm8k": "GSM8K"}
MODE_ORDER = {"score_student": 0, "score_teacher": 1, "distill": 2}


# Fields a record must hold with these types (or null) for the report to read it; anything else in it is optional.
SHAPE: dict[str, tuple[type, ...]] = {
    "preset": (str,),
    "mode": (str,),
    "seed": (int,),
    "label": (str,),
    "metrics": (dict,),
    "config": (dict,),
    "costs": (dict,),
    "train_time_s": (int, float),
    "wall_time_s": (int, float),
    "tokens_seen": (int, float),
    "steps": (int, float),
    "peak_memory_mb": (int, float),
}
REQUIRED = ("preset", "mode", "seed")
RECORD_FIELDS = (
    "name",
    "preset",
    "label",
    "mode",
    "seed",
    "config_hash",
    "steps",
    "tokens_seen",
    "tokens_supervised",
    "train_time_s",
    "wall_time_s",
    "peak_memory_mb",
    "git_commit",
    "sekd_version",
    "run_dir",
    "finished_at",
    "train_samples",
    "world_size",
    "device_count",
    "tokens_per_s_per_device",
)


def shape_problem(rec: Any) -> str | None:
    """Why `rec` is not a record sekd-train writes (None when it is one)."""
    if not isinstance(rec, dict):
        return f"a JSON {type(rec).__name__}, not an object"
    for key, kinds in SHAPE.items():
        value = rec.get(key)
        if value is None:
            if key in REQUIRED:
                return f"no {key!r}"
        elif not isinstance(value, kinds) or isinstance(value, bool):
            wanted = " or ".join(k.__name__ for k in kinds)
            return f"{key!r} is {type(value).__name__} {json.dumps(value)[:40]}, not {wanted}"
    return None


def read_records(folders: list[Path]) -> list[dict]:
    """Every record.json under `folders` (recursively), parsed; a broken one is skipped with one line on stderr."""
    recs = []
    for folder in folders:
        for path in sorted(Path(folder).rglob("record.json")):
            try:
                rec = json.loads(path.read_text(encoding="utf-8"))
                problem = shape_problem(rec)
            except UnicodeDecodeError:
                problem = "not UTF-8 text"
            except json.JSONDecodeError as err:
                problem = f"not valid JSON ({err})"
            except OSError as err:
                problem = f"unreadable ({err.strerror or err})"
            if problem:
                print(f"sekd-report: skipping {path}: {problem}", file=sys.stderr)
            else:
                recs.append(rec)
    return recs


def load_records(folders: list[Path], recs: list[dict] | None = None) -> pd.DataFrame:
    """One row per run: identity, metrics (own columns), costs (`costs.*`) and resolved config (`config.*`)."""
    rows = []
    for rec in read_records(folders) if recs is None else recs:
        row = {k: rec.get(k) for k in RECORD_FIELDS}
        row["changes"] = tuple(rec.get("changes") or ())  # the overrides that changed the preset (sekd-train's)
        row["plugins"] = plugins_used(rec)
        row.update(
            {
                k: v
                for k, v in (rec.get("metrics") or {}).items()
                if isinstance(v, (int, float)) and not isinstance(v, bool)
            }
        )
        row.update(flatten(rec.get("costs") or {}, "costs"))
        row.update(flatten(rec.get("config") or {}, "config"))
        for piece in rec.get("plugins") or []:  # a plugin's source is part of the configuration, as of the run
            row[f"config.plugin_source.{piece.get('key')}"] = f"{piece.get('module')}@{piece.get('source')}"
        rows.append(row)
    df = pd.DataFrame(rows)
    if df.empty:
        return df
    # the undistilled student and the teacher first, then Full KD (every other row's reference), then the
    # methods in the order they started (the grid's); cells started within the same minute (a grid run side by
    # side) by preset name
    df["_mode"] = df["mode"].map(MODE_ORDER).fillna(3)
    df["_other"] = df["preset"].ne(REFERENCE_PRESET)
    finished = pd.to_datetime(df["finished_at"], errors="coerce", utc=True)
    wall = pd.to_numeric(df["wall_time_s"], errors="coerce").fillna(0) if "wall_time_s" in df else 0
    df["_start"] = (finished - pd.to_timedelta(wall, unit="s")).dt.floor("min")
    df["_first"] = df.groupby("preset")["_start"].transform("min")
    keys = ["_mode", "_other", "_first", "preset", "seed"]
    return df.sort_values(keys, kind="stable").drop(columns=keys[:3] + ["_start"]).reset_index(drop=True)


load_table_records = load_records  # the paper-layout tables read the same rows


def plugins_used(rec: dict) -> str | None:
    """The plugin pieces a run used, one string: `position.signal=margin (sekd_lab.pieces 0.1.0, <source hash>)`."""
    pieces = [p for p in rec.get("plugins") or [] if isinstance(p, dict)]
    shown = [
        f"{p.get('key')}={p.get('name')} ({p.get('module')} {p.get('version')}, {p.get('source')})" for p in pieces
    ]
    return "; ".join(shown) or None


def flatten(tree: Any, prefix: str) -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'<prefix>.a.b': 1}; empty dicts and lists stay leaves."""
    if isinstance(tree, dict) and tree:
        return {k: v for key, sub in tree.items() for k, v in flatten(sub, f"{prefix}.{key}").items()}
    return {prefix: tree}


# ---- one row per configuration ----------------------------------------------------------------

# Config keys that cannot change a result (sekd.stores.runs.UNHASHED: paths, logging, resources, devices, the
# scoring batch size, the label) and the seed, which a row averages over.
NOT_GROUPED = (*UNHASHED, "seed")


def grouped_key(key: str) -> bool:
    """Is `config.<key>` part of what makes two runs the same configuration?"""
    return not any(key == k or key.startswith(k + ".") for k in NOT_GROUPED)


def metric_columns(df: pd.DataFrame) -> list[str]:
    """The metrics' columns (everything numeric that is not identity, cost or config)."""
    return [
        c
        for c in df.columns
        if c not in RECORD_FIELDS
        and not c.startswith(("config.", "costs.", "_"))
        and c != "method"
        and pd.api.types.is_numeric_dtype(df[c])
    ]


def scored(df: pd.DataFrame) -> pd.Series:
    """Runs that hold at least one metric (a run with eval.suite=none trained but was never scored)."""
    cols = metric_columns(df)
    return df[cols].notna().any(axis=1) if cols else pd.Series(False, index=df.index)


def differing_keys(configs: pd.DataFrame) -> list[str]:
    """Config keys whose values differ among `configs` (one row per configuration, canonical strings);
    a group's `name` stands for the rest of that group (model.name=tiny, not its twenty sizes)."""
    keys = [k for k in configs.columns if configs[k].nunique(dropna=False) > 1]
    names = {k.removesuffix(".name") for k in keys if k.endswith(".name")}
    return [k for k in keys if not any(k.startswith(n + ".") and k != n + ".name" for n in names)]


def limit_mark(limit: Any) -> str:
    """'limit=50' for a run scored on the first N examples only; '' for the full evaluation set."""
    return "" if limit is None or pd.isna(limit) else f"limit={int(limit)}"


def _shown(canonical: str) -> str:
    value = json.loads(canonical)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return value if isinstance(value, str) else json.dumps(value)


def what_changed(own: Any, differing: list[tuple[str, str]]) -> str:
    """A run's own changes as typed (`position.signal=kl`; eval.limit is the 'limit=N' mark), then the keys
    that differ among its preset's configurations that no change of its own already names."""
    typed = [o for o in (own if isinstance(own, (list, tuple)) else ()) if override_key(o) != "eval.limit"]
    keys = [override_key(o) for o in typed]
    rest = [f"{k}={v}" for k, v in differing if not any(covers(t, k) for t in keys)]
    return ", ".join([*typed, *rest])


def assign_methods(df: pd.DataFrame) -> pd.DataFrame:
    """Add `_group` (the run's configuration minus NOT_GROUPED, one string) and `method`: its label, plus
    `key=value` for each key whose value differs among the configurations of its preset and for each override
    of the run's own that changed its preset (each key once, `what_changed`), plus 'limit=N'."""
    df = df.copy()
    df["label"] = df["label"].fillna(df["preset"]) if "label" in df.columns else df["preset"]
    cols = [c for c in df.columns if c.startswith("config.") and grouped_key(c[len("config.") :])]
    canon = df[cols].map(tables.canon) if cols else pd.DataFrame(index=df.index)
    df["_group"] = [json.dumps(r, sort_keys=True) for r in canon.to_dict("records")] if cols else ""
    bare = ~df[cols].notna().any(axis=1) if cols else pd.Series(True, index=df.index)
    df.loc[bare, "_group"] = "label:" + df.loc[bare, "label"].astype(str)  # a record without its config
    label = df.groupby(["preset", "_group"], sort=False)["label"].transform("first").astype(str)
    differing: dict[Any, list[tuple[str, str]]] = {}  # per run: (key, value shown) differing in its preset
    for _, part in df[~bare].groupby("preset", sort=False):
        configs = canon.loc[part.index].drop_duplicates()
        keys = [k[len("config.") :] for k in differing_keys(configs) if k != "config.eval.limit"]
        if keys:
            rows = canon.loc[part.index, [f"config.{k}" for k in keys]].itertuples(index=False)
            differing.update({i: [(k, _shown(v)) for k, v in zip(keys, vals)] for i, vals in zip(part.index, rows)})
    own = df["changes"] if "changes" in df.columns else pd.Series([()] * len(df), index=df.index)
    limit = df["config.eval.limit"] if "config.eval.limit" in df.columns else pd.Series(None, index=df.index)
    changed = [what_changed(o, differing.get(i, [])) for i, o in zip(df.index, own)]
    marks = [", ".join(m for m in (c, limit_mark(lim)) if m) for c, lim in zip(changed, limit)]
    df["method"] = [f"{lab} ({m})" if m else lab for lab, m in zip(label, marks)]
    return df


def one_row_per_configuration(df: pd.DataFrame) -> pd.DataFrame:
    """Runs of one configuration reached through two presets (`experiment=se_kd position.signal=kl` on one
    seed, `experiment=top_kl` on another) are one row: each takes the preset, label and method of the first
    run of its configuration. Records without their config keep their own."""
    df = df.copy()
    has = ~df["_group"].astype(str).str.startswith("label:")
    for col in ("preset", "label", "method"):
        df.loc[has, col] = df[has].groupby("_group", sort=False)[col].transform("first")
    return df


def summarize(df: pd.DataFrame) -> pd.DataFrame:
    """Per configuration (runs differing only in the seed and NOT_GROUPED keys): mean and std over seeds of
    every metric and cost, its `method` label, and the number of seeds that were scored."""
    df = one_row_per_configuration(assign_methods(df))
    numeric = [
        c
        for c in df.columns
        if pd.api.types.is_numeric_dtype(df[c]) and c != "seed" and not c.startswith(("config.", "_"))
    ]
    keys = ["preset", "_group"]
    g = df.groupby(keys, sort=False)
    out = g[numeric].agg(["mean", "std"])
    out[("method", "")] = g["method"].first()
    out[("seeds", "n")] = df[scored(df)].groupby(keys, sort=False)["seed"].nunique().reindex(out.index, fill_value=0)
    return out


def fmt(mean: float, std: float, digits: int = 1) -> str:
    """'12.30 ± 0.40'; one seed: '12.30 ± –' (same decimals, never a bare or scientific number); none: '–'."""
    if pd.isna(mean):
        return tables.MISSING
    spread = tables.MISSING if pd.isna(std) else f"{std:.{digits}f}"
    return f"{mean:.{digits}f} ± {spread}"


# The rows every distilled row is compared with (column suffix -> preset), and the metrics compared (the
# table's headline two): Full KD (is selection as good as distilling everything?) and the undistilled student
# (did distilling help at all?).
REFERENCES = {"Full KD": "full_kd", "Student": "student"}
REFERENCE_PRESET = REFERENCES["Full KD"]
VERSUS = ("acc", "ppl")


def method_context(df: pd.DataFrame) -> pd.Series:
    """Per run: its configuration minus the method (the selection axes, the criterion, the mode, the preset)
    and the seed, one string. SE-KD at 300 steps compares with Full KD at 300 steps, never at 100."""
    cols = [
        c
        for c in df.columns
        if c.startswith("config.")
        and grouped_key(c[len("config.") :])
        and not is_axis(c[len("config.") :])
        and c[len("config.") :] not in (*NOT_AXES, "preset")
    ]
    canon = df[cols].map(tables.canon) if cols else pd.DataFrame(index=df.index)
    return pd.Series([json.dumps(r, sort_keys=True) for r in canon.to_dict("records")], index=df.index)


def versus_reference(df: pd.DataFrame, metric: str, reference: str = REFERENCE_PRESET) -> dict[tuple[str, str], str]:
    """Per configuration (preset, _group) of a distilled method: its difference from the `reference` preset's
    in `metric`, paired by seed, and whether it is beyond seed noise (tables.paired_difference); 'ref.' on
    the reference itself, '–' where there is no reference of the same context or the row is not distilled.
    A reference that trains nothing (the undistilled student) does not depend on the seed: its score stands
    for every seed, and the test becomes a one-sample test of the method's seeds against it."""
    df = df.assign(_context=method_context(df))
    df = df[scored(df) & df[metric].notna()] if metric in df.columns else df.iloc[0:0]
    per_seed = df.groupby(["preset", "_group", "_context", "seed"], sort=False)[metric].mean()
    is_ref = reference_groups(df, reference)
    refs = {}
    for (preset, group, ctx), s in per_seed.groupby(level=[0, 1, 2], sort=False):
        if (preset, group) in is_ref:
            trains = df.loc[df["_group"].eq(group) & df["preset"].eq(preset), "mode"].eq("distill").all()
            refs[ctx] = s.droplevel([0, 1, 2]) if trains else float(s.mean())
    out = {}
    for (preset, group, ctx), s in per_seed.groupby(level=[0, 1, 2], sort=False):
        distilled = df.loc[df["_group"].eq(group) & df["preset"].eq(preset), "mode"].eq("distill").all()
        ours = s.droplevel([0, 1, 2])
        if (preset, group) in is_ref:
            out[(preset, group)] = "ref."
        elif distilled and ctx in refs:
            ref = refs[ctx]
            ref = pd.Series(ref, index=ours.index) if isinstance(ref, float) else ref
            d = tables.paired_difference(ours, ref)
            out[(preset, group)] = tables.fmt_difference(d, 2 if metric == "ppl" else 1)
    return out


def reference_groups(df: pd.DataFrame, reference: str) -> set[tuple[str, str]]:
    """The configurations that are the `reference` preset as it is: its runs whose selection axes are the
    preset's own. A run of the preset with another axis (`experiment=full_kd classes=top_k_tail`, a sweep over
    sparse targets) is a method compared with it, not a second reference. A preset this checkout cannot
    compose: every configuration of it."""
    groups = df.loc[df["preset"].eq(reference), "_group"].unique()
    own = own_axes(reference)
    if own is None:
        return {(reference, g) for g in groups}
    keep = set()
    for g in groups:
        row = df[df["_group"].eq(g) & df["preset"].eq(reference)].iloc[0]
        cols = [k for k in own if f"config.{k}" in df.columns]
        if all(tables.canon(row[f"config.{k}"]) == own[k] for k in cols):
            keep.add((reference, g))
    return keep


@functools.lru_cache(maxsize=None)
def own_axes(preset: str) -> dict[str, str] | None:
    """The preset's selection axes as composed (canonical strings); None where it does not compose."""
    axes = preset_axes([preset])
    if preset not in axes.index:
        return None
    return {k: v for k, v in axes.loc[preset].items() if isinstance(v, str) or pd.notna(v)}


def markdown_table(df: pd.DataFrame) -> str:
    """The headline table: Method | Acc. | PPL | ECE | (per-task accuracies) | Acc./PPL vs Full KD | Acc./PPL
    vs Student | seeds, one row per configuration; the last columns say whether a method's difference from
    Full KD, and from the undistilled student, is beyond seed noise."""
    s = summarize(df)
    metrics = [m for m in HEADLINE if (m, "mean") in s.columns]
    tasks = sorted(c[0] for c in s.columns if c[1] == "mean" and c[0].endswith("/acc"))
    assigned = one_row_per_configuration(assign_methods(df))
    versus = {
        (m, name): versus_reference(assigned, m, preset)
        for name, preset in REFERENCES.items()
        for m in VERSUS
        if m in metrics
    }
    rows = []
    for (preset, group), r in s.iterrows():
        row = {"Method": r[("method", "")], "preset": preset}
        for m in metrics:
            row[HEADLINE[m]] = fmt(r[(m, "mean")], r[(m, "std")], 2 if m == "ppl" else 1)
        for tcol in tasks:
            row[tcol.removesuffix("/acc")] = fmt(100 * r[(tcol, "mean")], 100 * r[(tcol, "std")])
        for (m, name), marks in versus.items():
            row[f"{HEADLINE[m]} vs {name}"] = marks.get((preset, group), tables.MISSING)
        row["seeds"] = str(int(r[("seeds", "n")]))
        rows.append(row)
    # the cells as written: tabulate would reparse '83362304.00' as 8.33623e+07 and '0.0' as 0
    return pd.DataFrame(rows).to_markdown(index=False, disable_numparse=True)


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

    from sekd.config.folders import CONF

    rows = {}
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        for preset in presets:
            try:
                cfg = compose(config_name="config", overrides=[f"experiment={preset}"])
            except HydraException:  # a preset this checkout does not have: its runs match by name alone
                continue
            flat = flatten(OmegaConf.to_container(cfg, resolve=True), "")
            rows[preset] = {k[1:]: tables.canon(v) for k, v in flat.items() if is_axis(k[1:])}
    return pd.DataFrame.from_dict(rows, orient="index")


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
    ap.add_argument(
        "--out",
        type=Path,
        default=None,
        help="write results.csv and table.md here (with --table: table_<T>.md, .csv, .tex)",
    )
    ap.add_argument(
        "--table",
        action="append",
        choices=tables.TABLES,
        default=None,
        help="print the paper's table T in its layout (rows, order, columns), ours beside the paper's; "
        "repeat for several",
    )
    args = ap.parse_args(argv)
    for f in args.folders:
        if not f.exists():
            print(f"sekd-report: {f}: no such folder", file=sys.stderr)
            return 2
    df = load_records(args.folders)
    if df.empty:
        print(f"sekd-report: no record.json under {', '.join(map(str, args.folders))}", file=sys.stderr)
        return 1
    if args.table:
        models = sorted(df["config.model.name"].dropna().unique()) if "config.model.name" in df else []
        if len(models) > 1:  # one table must not average the embedded pair with Qwen3
            print(
                f"sekd-report: runs of several models ({', '.join(models)}); point --table at one profile's "
                f"folder (outputs/embedded or outputs/paper)",
                file=sys.stderr,
            )
            return 2
        print(write_tables(df, args.table, args.out))
        return 0
    table = markdown_table(df)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        runs = assign_methods(df).drop(columns="_group")  # each run with the table row ("method") it went into
        atomic_write_text(args.out / "results.csv", runs.to_csv(index=False))
        atomic_write_text(args.out / "table.md", table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
