"""The miniature's measurements (docs/miniature.md): how the methods' scores move with the distillation length
and with the student's size and pretraining, and how the miniature's orderings compare with the paper's.

Reads records only (sekd.report.results's loader) and the Full KD runs' metrics.jsonl; it never trains.

    python -m analysis.miniature outputs/miniature --out docs --csv analysis
        # docs/miniature_steps.png, docs/miniature_loss.png, docs/miniature_sizes.png,
        # analysis/miniature_steps.csv, analysis/miniature_sizes.csv
    python -m analysis.miniature outputs/embedded --spearman T2 --spearman T4
        # each table's Spearman rank correlation of our rows' Acc. with the paper's, per seed
    python -m analysis.miniature outputs/miniature --out docs --pretrain .sekd_cache
        # docs/miniature_pretrain.png: the held-out loss of each pair pretrained with keep=best_validation
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Sequence

import pandas as pd

from sekd.report import tables
from sekd.report.results import load_records

# short name -> the flattened column of record.json it copies
COLUMNS = {
    "train_steps": "config.train.steps",
    "student_steps": "config.model.embedded.student.steps",
    "student_hidden": "config.model.embedded.student.hidden_size",
    "teacher_steps": "config.model.embedded.teacher.steps",
    "teacher_hidden": "config.model.embedded.teacher.hidden_size",
    "lr": "config.train.lr",
}
DEFAULT_PAIR = {"teacher_steps": 500, "student_steps": 300, "student_hidden": 64}  # conf/model/embedded.yaml's
PAIR = list(DEFAULT_PAIR)  # what tells the pretrained pairs apart
METHOD_ORDER = ["student", "full_kd", "random_pos", "se_kd", "se_kd3x", "teacher"]
LABELS = {
    "student": "Student (no distillation)",
    "teacher": "Teacher",
    "full_kd": "Full KD",
    "random_pos": "RandomPos 20%",
    "se_kd": "SE-KD",
    "se_kd3x": "SE-KD3X",
}
METRICS = ("acc", "ppl")


def runs(folders: Sequence[str | Path]) -> pd.DataFrame:
    """One row per scored run with the short columns above (`train_steps` = the optimizer steps it took)."""
    df = load_records([Path(f) for f in folders])
    if df.empty:
        return df
    for short, col in COLUMNS.items():
        df[short] = df[col] if col in df.columns else math.nan
    df["train_steps"] = pd.to_numeric(df["steps"], errors="coerce")  # what it ran (null in config = epochs)
    return df[df["acc"].notna()].reset_index(drop=True)


def per_method(df: pd.DataFrame, keys: Sequence[str]) -> pd.DataFrame:
    """Mean and std over seeds of Acc. and PPL per (preset, *keys) of the demo's methods (a T2 sweep sharing the
    root adds other presets: not these tables'), and the number of seeds."""
    df = df[df["preset"].isin(METHOD_ORDER)]
    g = df.groupby(["preset", *keys], dropna=False)
    out = g[list(METRICS)].agg(["mean", "std"])
    out.columns = [f"{m}_{s}" for m, s in out.columns]
    out["seeds"] = g["seed"].nunique()
    out = out.reset_index()
    out["_order"] = out["preset"].map({p: i for i, p in enumerate(METHOD_ORDER)}).fillna(len(METHOD_ORDER))
    return out.sort_values(["_order", *keys]).drop(columns="_order").reset_index(drop=True)


def default_pair(df: pd.DataFrame) -> pd.Series:
    return pd.concat([df[k].eq(v) for k, v in DEFAULT_PAIR.items()], axis=1).all(axis=1)


def steps_table(df: pd.DataFrame) -> pd.DataFrame:
    """The default pair, every method per distillation length (the undistilled student needs none: steps 0)."""
    d = df[default_pair(df)].copy()
    d.loc[d["mode"].ne("distill"), "train_steps"] = 0
    return per_method(d, ["train_steps"])


def sizes_table(df: pd.DataFrame, train_steps: int = 300) -> pd.DataFrame:
    """Every pretrained pair, the methods at one distillation length, the undistilled student and the teacher
    beside them (the default pair's teacher is scored at no distillation length)."""
    d = df[df["train_steps"].eq(train_steps) | df["mode"].ne("distill")]
    return per_method(d, PAIR)


def loss_curves(df: pd.DataFrame, preset: str = "full_kd") -> pd.DataFrame:
    """The training loss logged (metrics.jsonl) by the longest run of `preset` per student spec: step, loss."""
    d = df[df["preset"].eq(preset)].sort_values("train_steps")
    frames = []
    for _, r in d.groupby(PAIR, dropna=False).tail(1).iterrows():
        path = Path(str(r["run_dir"])) / "metrics.jsonl"
        if not path.exists():
            continue
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        frame = pd.DataFrame(rows)[["step", "loss"]]
        frames.append(frame.assign(**{k: r[k] for k in PAIR}, train_steps=r["train_steps"]))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["step", "loss"])


def artifacts_dir(cfg: dict) -> Path:
    """The run's paths.cache: a record keeps it as written (`${oc.env:SEKD_CACHE_DIR,.sekd_cache}`), resolved here
    as the run resolved it, so the pair is found where the run built it (never rebuilt in a folder of that name)."""
    from omegaconf import OmegaConf

    return Path(OmegaConf.create({"cache": cfg["paths"]["cache"]}).cache)


def heldout_kd(run_dir: str | Path, cfg: dict, split: str = "validation", batch_size: int = 16) -> float:
    """The student's forward KL to its teacher per position, averaged over the held-out `split` of the
    embedded corpus (the training loss's quantity on text it never trained on); the pair as its run built it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sekd.data.dataset import build_packed
    from sekd.embedded.build import pretrained_model, tokenizer

    cache, emb = artifacts_dir(cfg), cfg["model"]["embedded"]
    tok_dir = tokenizer(cache / "embedded", emb["vocab_size"])  # both cached by the run: looked up, not rebuilt
    teacher_dir = pretrained_model(cache / "embedded", "teacher", tok_dir, emb["teacher"], emb["seq_len"], emb["seed"])
    tok = AutoTokenizer.from_pretrained(teacher_dir)
    data = build_packed(
        "embedded", split, tok, seq_len=cfg["data"]["seq_len"], token_budget=None, artifacts_dir=cache / "data"
    )
    models = [
        AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
        for d in (teacher_dir, Path(run_dir) / "model")
    ]
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(data.input_ids), batch_size):
            x, y = data.input_ids[i : i + batch_size], data.labels[i : i + batch_size]
            t, st = (m(input_ids=x).logits.log_softmax(-1) for m in models)
            kl = (t.exp() * (t - st)).sum(-1)
            keep = y != -100
            total, count = total + float(kl[keep].sum()), count + int(keep.sum())
    return total / max(1, count)


def heldout_curve(df: pd.DataFrame, preset: str = "full_kd") -> pd.DataFrame:
    """heldout_kd of every run of `preset` that kept its model: one row per run (pair, train_steps, kd)."""
    rows = []
    for _, r in df[df["preset"].eq(preset)].iterrows():
        rec = Path(str(r["run_dir"]))
        cfgs = sorted(rec.glob("*/record.json"))
        if not (rec / "model").exists() or not cfgs:
            continue
        cfg = json.loads(cfgs[0].read_text())["config"]
        rows.append(
            {
                **{k: r[k] for k in PAIR},
                "train_steps": r["train_steps"],
                "seed": r["seed"],
                "heldout_kd": heldout_kd(rec, cfg),
            }
        )
    return pd.DataFrame(rows)


def pair_name(key: Sequence, short: bool = False) -> str:
    """(teacher_steps, student_steps, student_hidden) -> 'T500 / S300 h64' or a longer legend."""
    t, s, h = (int(x) for x in key)
    return f"T{t}\nS{s} h{h}" if short else f"T{t} / S{s} h{h}"


def plot_steps(table: pd.DataFrame, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from analysis.plots import save

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, metric in zip(axes, METRICS):
        for preset, part in table.groupby("preset", sort=False):
            if preset in ("student", "teacher"):
                ax.axhline(
                    part[f"{metric}_mean"].iloc[0],
                    ls="--",
                    color="gray" if preset == "student" else "k",
                    label=LABELS.get(preset, preset),
                )
                continue
            ax.errorbar(
                part["train_steps"],
                part[f"{metric}_mean"],
                yerr=part[f"{metric}_std"].fillna(0),
                marker="o",
                capsize=3,
                label=LABELS.get(preset, preset),
            )
        ax.set_xscale("log")
        ax.set_xlabel("distillation optimizer steps (16 sequences each)")
        ax.set_ylabel({"acc": "Acc. (higher is better)", "ppl": "PPL (lower is better)"}[metric])
        if metric == "ppl":
            ax.set_yscale("log")
    axes[0].legend(fontsize=8)
    fig.suptitle("Embedded pair: score against distillation length")
    fig.tight_layout()
    return save(fig, path)


def plot_loss(curves: pd.DataFrame, path: Path, heldout: pd.DataFrame | None = None, window: int = 10) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from analysis.plots import save

    fig, ax = plt.subplots(figsize=(8.5, 4.5))
    for i, (key, part) in enumerate(curves.groupby(PAIR, dropna=False)):
        smooth = part["loss"].rolling(window, min_periods=1).mean()
        ax.plot(part["step"], smooth, color=f"C{i}", label=pair_name(key))
        if heldout is not None and not heldout.empty:
            h = heldout[pd.concat([heldout[k].eq(v) for k, v in zip(PAIR, key)], axis=1).all(axis=1)]
            h = h.groupby("train_steps", as_index=False)["heldout_kd"].mean()
            ax.plot(h["train_steps"], h["heldout_kd"], "o--", color=f"C{i}")
    ax.set_yscale("log")
    ax.set_title("lines: training loss; points: the same on the validation split", fontsize=9)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(f"Full KD training loss (forward KL, mean of {window} logs)")
    ax.legend(
        fontsize=8,
        title="T: teacher pretraining steps; S: student's, h: its width",
        title_fontsize=8,
        loc="center left",
        bbox_to_anchor=(1.01, 0.5),
    )
    fig.tight_layout()
    return save(fig, path)


def plot_sizes(table: pd.DataFrame, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from analysis.plots import save

    specs = table[PAIR].drop_duplicates().dropna()
    specs = specs.sort_values(PAIR).reset_index(drop=True)
    presets = list(table["preset"].unique())
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / max(1, len(presets))
    for ax, metric in zip(axes, METRICS):
        for i, preset in enumerate(presets):
            part = table[table["preset"].eq(preset)].merge(specs.reset_index(), on=PAIR)
            ax.bar(part["index"] + i * width, part[f"{metric}_mean"], width, label=LABELS.get(preset, preset))
        ax.set_xticks(
            specs.index + width * (len(presets) - 1) / 2,
            [pair_name(k, short=True) for k in specs.itertuples(index=False)],
            fontsize=8,
        )
        ax.set_ylabel({"acc": "Acc. (higher is better)", "ppl": "PPL (lower is better)"}[metric])
        if metric == "ppl":
            ax.set_yscale("log")
    axes[0].legend(fontsize=8)
    fig.suptitle(
        "Pretrained pairs (T: teacher pretraining steps; S: student's, and its width h): "
        "methods at 300 distillation steps",
        fontsize=10,
    )
    fig.tight_layout()
    return save(fig, path)


def pretrain_curves(cache: str | Path) -> pd.DataFrame:
    """Every embedded model pretrained with keep=best_validation under `cache`: one row per measurement
    (role, steps of its schedule, hidden size, step, train_loss, val_loss, kept: the step it ended at)."""
    rows = []
    for curve_file in sorted(Path(cache).glob("embedded/model-*/pretrain_curve.json")):
        spec = json.loads((curve_file.parent / "inputs.json").read_text())
        curve = pd.DataFrame(json.loads(curve_file.read_text()))
        kept = int(curve.loc[curve["val_loss"].idxmin(), "step"])
        rows.append(
            curve.assign(
                role=spec["role"], schedule=spec["spec"]["steps"], hidden=spec["spec"]["hidden_size"], kept=kept
            )
        )
    return pd.concat(rows, ignore_index=True) if rows else pd.DataFrame()


def plot_pretrain(curves: pd.DataFrame, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from analysis.plots import save

    fig, ax = plt.subplots(figsize=(7, 4))
    for (role, schedule, hidden), part in curves.groupby(["role", "schedule", "hidden"], sort=False):
        name = f"{role} (h{hidden}, {schedule}-step schedule)"
        (line,) = ax.plot(part["step"], part["val_loss"], marker=".", label=f"{name}: held-out")
        ax.plot(part["step"], part["train_loss"], ls=":", color=line.get_color(), label=f"{name}: train batch")
        kept = part[part["step"] == part["kept"]]
        ax.scatter(kept["step"], kept["val_loss"], s=80, facecolors="none", edgecolors="k", zorder=3)
    ax.set_xlabel("pretraining step (16 sequences of 128 tokens)")
    ax.set_ylabel("next-token CE (nats)")
    ax.set_title("Pretraining the miniature's pair: the circled step is the one kept")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return save(fig, path)


def spearman_vs_paper(df: pd.DataFrame, table: str) -> dict[str, float]:
    """The Spearman rank correlation of our distilled rows' Acc. with the paper's, one per seed (the undistilled
    student and the teacher left out: every scale orders them alike). {mean, std, seeds, rows}."""
    from scipy.stats import spearmanr

    from sekd.report.results import preset_axes

    reference = pd.read_csv(tables.REFERENCE)
    axes = preset_axes(sorted(set(reference["preset"].dropna()) & set(df["preset"].dropna())))
    distilled = df[df["mode"].eq("distill")]
    per_seed = []  # (rows, rho): a seed that ran only some of the table's rows is no comparable rho
    for _, seeded in distilled.groupby("seed"):
        t = tables.paper_table(seeded, reference, table, axes)
        t = t[t["acc_ours_mean"].notna() & t["acc_paper"].notna()]
        if len(t) >= 3:
            per_seed.append((len(t), float(spearmanr(t["acc_ours_mean"], t["acc_paper"]).statistic)))
    rows = max((n for n, _ in per_seed), default=0)
    s = pd.Series([rho for n, rho in per_seed if n == rows], dtype=float)
    return {"mean": s.mean(), "std": s.std(), "seeds": len(s), "rows": rows}


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m analysis.miniature", description=__doc__.splitlines()[0])
    ap.add_argument("folders", nargs="+", help="folders holding the miniature sweeps' runs")
    ap.add_argument("--out", type=Path, default=None, help="write the PNGs here")
    ap.add_argument("--csv", type=Path, default=None, help="write miniature_steps.csv and miniature_sizes.csv here")
    ap.add_argument(
        "--heldout",
        action="store_true",
        help="also measure each Full KD run's KD loss on the validation split (loads the models)",
    )
    ap.add_argument(
        "--pretrain",
        type=Path,
        default=None,
        help="a cache folder (paths.cache): plot its pairs' pretraining curves into --out",
    )
    ap.add_argument(
        "--spearman",
        action="append",
        choices=("T2", "T3", "T4"),
        default=[],
        help="print the table's Spearman rank correlation with the paper's Acc. (repeatable)",
    )
    args = ap.parse_args(argv)
    df = runs(args.folders)
    if df.empty:
        print(f"python -m analysis.miniature: no scored record.json under {', '.join(args.folders)}", file=sys.stderr)
        return 1
    steps, sizes = steps_table(df), sizes_table(df)
    print(steps.to_markdown(index=False, floatfmt=".2f"), end="\n\n")
    print(sizes.to_markdown(index=False, floatfmt=".2f"))
    if args.csv:
        args.csv.mkdir(parents=True, exist_ok=True)
        steps.to_csv(args.csv / "miniature_steps.csv", index=False, float_format="%.4g")
        sizes.to_csv(args.csv / "miniature_sizes.csv", index=False, float_format="%.4g")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        plot_steps(steps, args.out / "miniature_steps.png")
        curves = loss_curves(df)
        heldout = heldout_curve(df) if args.heldout else None
        if heldout is not None:
            heldout = heldout.sort_values([*PAIR, "train_steps"])
            print(heldout.to_markdown(index=False, floatfmt=".3f"))
            if args.csv:
                heldout.to_csv(args.csv / "miniature_heldout.csv", index=False, float_format="%.4g")
        if not curves.empty:
            plot_loss(curves, args.out / "miniature_loss.png", heldout)
        if sizes[PAIR].drop_duplicates().dropna().shape[0] > 1:
            plot_sizes(sizes, args.out / "miniature_sizes.png")
        if args.pretrain:
            pretrain = pretrain_curves(args.pretrain)
            if pretrain.empty:
                print(
                    f"python -m analysis.miniature: no pretraining curve under {args.pretrain}/embedded",
                    file=sys.stderr,
                )
                return 1
            print(
                pretrain.groupby(["role", "schedule", "hidden"])[["kept"]]
                .first()
                .assign(
                    val_loss=pretrain[pretrain["step"] == pretrain["kept"]]
                    .groupby(["role", "schedule", "hidden"])["val_loss"]
                    .first()
                )
                .to_markdown(floatfmt=".3f")
            )
            plot_pretrain(pretrain, args.out / "miniature_pretrain.png")
    for table in args.spearman:
        r = spearman_vs_paper(df, table)
        print(
            f"{table}: Spearman rho of Acc. vs the paper's = {r['mean']:.2f} ± {r['std']:.2f} "
            f"over {r['seeds']} seeds, {r['rows']} distilled rows"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
