"""Figures over the results table: budget curves (k, l), accuracy-vs-cost Pareto plots, the signal-overlap heatmap.

Plain functions: a DataFrame in (one row per run, as `sekd.report.loading.load_results` gives), a
matplotlib Figure out; `save` writes it as a PNG atomically. Figures are built without pyplot (no global
state, no backend to choose, nothing left open); no training, no models.

    fig = budget_curve(df, "k", "acc")       # mean ± std over seeds against k, one line per method
    save(fig, "outputs/demo/figures/k_budget.png")
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Sequence

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import EngFormatter, FuncFormatter, NullFormatter

from sekd.core.files import atomic_write_bytes
from sekd.report.results import HEADLINE

GROUP = ["preset", "label"]  # one method = one preset (its label for humans)
LOWER_IS_BETTER = {"ppl", "ece"}
BUDGETS = {"k": "k (fraction of positions kept)", "l": "l (fraction of samples kept)"}
COSTS = {
    "wall_time_s": ("wall time", "s"),
    "train_wall_s": ("training wall time", "s"),
    "train_time_s": ("distillation time", "s"),
    "teacher_forward_tokens": ("teacher forward tokens", ""),
    "cache_bytes_read": ("teacher-cache bytes read", "B"),
    "prepass_seconds": ("sample pre-pass time", "s"),
    "tokens_per_s_device": ("training tokens/s per device", "tok/s"),
}
SPEEDS = {"tokens_per_s_device"}  # x axes where more is better: the front runs to the right
TIMES = {"wall_time_s", "train_wall_s", "train_time_s", "prepass_seconds"}  # wall-clock costs: fair at one world size


def cost_arrow(cost: str) -> str:
    return "↑" if cost in SPEEDS else "↓"


def higher_is_better(metric: str) -> bool:
    return metric.split("/")[-1] not in LOWER_IS_BETTER and "perplexity" not in metric


def metric_label(metric: str) -> str:
    name = HEADLINE.get(metric, metric)
    arrow = "↑" if higher_is_better(metric) else "↓"
    return f"{name} {arrow}"


def _need(df: pd.DataFrame, cols: Sequence[str]) -> None:
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise ValueError(f"the results have no column {', '.join(missing)}; columns: {', '.join(map(str, df.columns))}")


def _one_setting(df: pd.DataFrame) -> None:
    """Refuse to average runs scored under different models or evaluation splits into one figure."""
    if "setting" in df.columns and df["setting"].dropna().nunique() > 1:
        raise ValueError(
            f"runs from several settings ({', '.join(sorted(df['setting'].dropna().unique()))}): "
            "keep one, e.g. with sekd.report.loading.one_setting"
        )


def _limit_note(df: pd.DataFrame) -> str:
    """' (limit=50)' when the figure's runs were scored on the first N examples only: a title must say so."""
    if "setting" not in df.columns:
        return ""
    marks = {m for s in df["setting"].dropna() for m in str(s).split() if m.startswith("limit=")}
    return f" ({', '.join(sorted(marks))})" if marks else ""


def _devices_note(df: pd.DataFrame) -> str:
    """', 1-2 devices per run' when some run spanned more than one device (world size x a teacher's own): the
    figure says so. Nothing for one-device runs, or results without the column."""
    if "devices" not in df.columns or not (df["devices"].dropna() > 1).any():
        return ""
    counts = sorted({int(n) for n in df["devices"].dropna()})
    return f", {counts[0]}" + (f"-{counts[-1]}" if len(counts) > 1 else "") + " devices per run"


def fair_cost(df: pd.DataFrame, cost: str) -> str:
    """The x axis to plot for `cost`: itself, unless it is a wall-clock time and the distilled runs spanned
    different numbers of devices (world sizes, a teacher's own device): 2 ranks finish sooner than 1 at the
    same work, so their times do not compare, and the axis is training tokens/s per device instead."""
    d = _distilled(df)
    if (
        cost in TIMES
        and "tokens_per_s_device" in d.columns
        and "devices" in d.columns
        and d["devices"].dropna().nunique() > 1
    ):
        return "tokens_per_s_device"
    return cost


def _distilled(df: pd.DataFrame) -> pd.DataFrame:
    return df[df["mode"] == "distill"] if "mode" in df.columns else df


def _references(df: pd.DataFrame) -> pd.DataFrame:
    return df[df["mode"] != "distill"] if "mode" in df.columns else df.iloc[:0]


def aggregate(df: pd.DataFrame, keys: Sequence[str], values: Sequence[str]) -> pd.DataFrame:
    """Mean and std over seeds of `values` per `keys`: columns keys, <v>_mean, <v>_std, n (first-seen order)."""
    g = df.groupby(list(keys), sort=False, dropna=False)
    out = g[list(values)].agg(["mean", "std"])
    out.columns = [f"{v}_{s}" for v, s in out.columns]
    out["n"] = g.size()
    return out.reset_index()


REFERENCE_STYLE = {"student": dict(ls=":", color="0.3"), "teacher": dict(ls="--", color="0.15")}


def _colors() -> list[str]:
    return list(matplotlib.rcParams["axes.prop_cycle"].by_key().get("color", ["C0"]))


def _reference_lines(ax, refs: pd.DataFrame, metric: str, first_color: int = 0) -> None:
    """A horizontal line at the seed-mean of `metric` per method in `refs`: student dotted, teacher dashed,
    distilled methods dash-dotted in the colour cycle's next colours (after the first_color curves)."""
    colors, i = _colors(), first_color
    for _, r in aggregate(refs, GROUP, [metric]).iterrows():
        style = REFERENCE_STYLE.get(r["preset"])
        if style is None:
            style, i = dict(ls="-.", color=colors[i % len(colors)]), i + 1
        ax.axhline(r[f"{metric}_mean"], lw=1.1, alpha=0.85, label=r["label"], gid="reference", **style)


# ---- budget curves ---------------------------------------------------------------------------

OTHER = {"k": "l", "l": "k"}


def _series_keys(d: pd.DataFrame, param: str) -> list[str]:
    """preset, label, plus the other budget when it varies within some method (so each line holds it fixed)."""
    other = OTHER[param]
    if other in d.columns and len(d) and d.groupby(GROUP, sort=False)[other].nunique().max() > 1:
        return [*GROUP, other]
    return list(GROUP)


def _in(d: pd.DataFrame, keys: list[str], members: set) -> pd.Series:
    return pd.Series([t in members for t in d[keys].itertuples(index=False, name=None)], index=d.index, dtype=bool)


def budget_sweeps(df: pd.DataFrame, param: str = "k") -> pd.DataFrame:
    """The distilled runs of methods trained at two or more values of `param` (the curves' rows)."""
    if param not in OTHER or param not in df.columns or "label" not in df.columns:
        return df.iloc[:0]
    d = _distilled(df).dropna(subset=[param])
    if d.empty:
        return d
    keys = _series_keys(d, param)
    n = d.groupby(keys, sort=False, dropna=False)[param].transform("nunique")
    return d[n >= 2]


def budget_curve(
    df: pd.DataFrame,
    param: str = "k",
    metric: str = "acc",
    *,
    references: bool = True,
    logx: bool | None = None,
    title: str | None = None,
) -> Figure:
    """metric (mean ± std over seeds) against the budget `param`, one line per method swept over it.

    References (horizontal lines): the undistilled student and the teacher, and Full KD (runs at
    k = l = 100% that are not part of a curve). Log x for k unless `logx` says otherwise.
    Raises ValueError when no method was run at two budgets.
    """
    if param not in BUDGETS:
        raise ValueError(f"param must be one of {sorted(BUDGETS)}, not {param!r}")
    _need(df, [param, metric, *GROUP])
    _one_setting(df)
    sweep = budget_sweeps(df, param).dropna(subset=[metric])
    if sweep.empty:
        raise ValueError(f"no method was run at two or more values of {param}: nothing to draw a curve through")
    d = _distilled(df).dropna(subset=[param])
    keys, other = _series_keys(d, param), OTHER[param]
    # name the other budget only for a method run at several values of it (one line per value)
    several = set(d.groupby(GROUP, sort=False)[other].nunique().loc[lambda n: n > 1].index) if other in keys else set()
    logx = (param == "k") if logx is None else logx

    fig = Figure(figsize=(7.0, 4.4), dpi=120)
    ax = fig.add_subplot()
    colors = _colors()
    series = list(sweep.groupby(keys, sort=False, dropna=False))
    for i, (key, g) in enumerate(series):
        key = key if isinstance(key, tuple) else (key,)
        s = aggregate(g, [param], [metric]).sort_values(param)
        x, y, e = s[param].to_numpy(float), s[f"{metric}_mean"].to_numpy(float), s[f"{metric}_std"].to_numpy(float)
        name = key[1] + (f" ({other}={key[2]:.0%})" if tuple(key[:2]) in several else "")
        c = colors[i % len(colors)]
        ax.plot(x, y, marker="o", ms=4, color=c, label=name, gid="sweep")
        if np.isfinite(e).any():
            ax.fill_between(x, y - np.nan_to_num(e), y + np.nan_to_num(e), color=c, alpha=0.18, lw=0)

    if references:
        full = d.dropna(subset=[metric])
        for b in OTHER:  # Full KD: every position of every sample
            full = full[full[b] == 1.0] if b in full.columns else full
        swept = set(sweep[keys].drop_duplicates().itertuples(index=False, name=None))
        full = full[~_in(full, keys, swept)]
        _reference_lines(ax, pd.concat([_references(df).dropna(subset=[metric]), full]), metric, len(series))

    if logx:
        ax.set_xscale("log")
        ax.set_xticks(np.unique(sweep[param].to_numpy(float)))
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{100 * v:.3g}%"))  # 0.025 -> 2.5%
    ax.set_xlabel(BUDGETS[param])
    ax.set_ylabel(metric_label(metric))
    ax.set_title(
        title or f"{HEADLINE.get(metric, metric)} against the {param} budget (mean ± std over seeds)" + _limit_note(df)
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    return fig


# ---- accuracy against cost -------------------------------------------------------------------


def pareto_front(cost: Sequence[float], value: Sequence[float], *, maximize: bool = True) -> np.ndarray:
    """on_front[i]: no other point costs no more and scores at least as well, strictly better in one.  [N] -> bool[N]

    Points with a NaN coordinate are never on the front.
    """
    c = np.asarray(cost, dtype=float)
    v = np.asarray(value, dtype=float) * (1 if maximize else -1)  # now: low cost, high v
    ok = np.isfinite(c) & np.isfinite(v)
    out = np.zeros(len(c), dtype=bool)
    for i in np.flatnonzero(ok):
        others = ok & (c <= c[i]) & (v >= v[i]) & ((c < c[i]) | (v > v[i]))
        out[i] = not others.any()
    return out


def pareto_table(
    df: pd.DataFrame, cost: str = "wall_time_s", metric: str = "acc", *, modes: Sequence[str] | None = ("distill",)
) -> pd.DataFrame:
    """Per method (and per budget k / l where a method ran at several, and per `cache_role` where some of its
    runs built the teacher cache and others reused it): cost and metric mean ± std over seeds, n seeds, a
    display name, and whether it is on the Pareto front."""
    _need(df, [cost, metric, *GROUP])
    _one_setting(df)
    d = df[df["mode"].isin(modes)] if modes is not None and "mode" in df.columns else df
    d = d.dropna(subset=[cost, metric])
    # a method run at several budgets is one point per budget, named by it; building the offline cache is a
    # cost of the run that built it: its runs and those that reused the cache are separate points
    varying = [
        b
        for b in (*OTHER, "cache_role", "devices")
        if b in d.columns and len(d) and d.groupby(GROUP, sort=False)[b].nunique().max() > 1
    ]
    t = aggregate(d, [*GROUP, *varying], [cost, metric])
    t.insert(2, "name", t["label"].astype(str))
    for b in varying:
        several = t.groupby(GROUP, sort=False)[b].transform("nunique") > 1
        t.loc[several, "name"] += [
            f" (cache {v})"
            if b == "cache_role"
            else f" ({v:g} device{'s' * (v != 1)})"
            if b == "devices"
            else f" {b}={v:.0%}"
            for v in t.loc[several, b]
        ]
    spent = -t[f"{cost}_mean"] if cost in SPEEDS else t[f"{cost}_mean"]
    t["on_front"] = pareto_front(spent, t[f"{metric}_mean"], maximize=higher_is_better(metric))
    return t


def pareto(
    df: pd.DataFrame,
    cost: str = "wall_time_s",
    metric: str = "acc",
    *,
    modes: Sequence[str] | None = ("distill",),
    references: bool = True,
    logx: bool = False,
    annotate: str = "auto",
    title: str | None = None,
) -> Figure:
    """metric against cost, one point (± std over seeds on both axes) per method and budget, the front drawn through.

    Only `modes` runs are points (by default the distilled ones: scoring the student or the teacher has no
    training cost); the undistilled student and teacher become dashed horizontal references.
    `cost=tokens_per_s_device` (training throughput per device, fair across world sizes) is a speed: more is
    better, the front runs to the right; a method's runs on different numbers of devices are separate points,
    and the title says how many devices the runs spanned.
    `annotate`: name "all" points, only the "front", or "auto" (all up to 10 points, else the front).
    Raises ValueError when no run has both the cost and the metric.
    """
    if annotate not in ("auto", "all", "front"):
        raise ValueError(f"annotate must be auto, all or front, not {annotate!r}")
    t = pareto_table(df, cost, metric, modes=modes)
    if t.empty:
        raise ValueError(f"no run has both {cost} and {metric}")
    named = t["on_front"] | (annotate == "all") | (annotate == "auto" and len(t) <= 10)
    name, unit = COSTS.get(cost, (cost, ""))
    fig = Figure(figsize=(7.0, 4.6), dpi=120)
    ax = fig.add_subplot()
    for i, r in t.iterrows():
        ax.errorbar(
            r[f"{cost}_mean"],
            r[f"{metric}_mean"],
            xerr=r[f"{cost}_std"],
            yerr=r[f"{metric}_std"],
            fmt="o",
            ms=6,
            capsize=3,
            color="tab:blue" if r["on_front"] else "tab:gray",
            gid="point",
        )
        if named[i]:
            ax.annotate(
                r["name"],
                (r[f"{cost}_mean"], r[f"{metric}_mean"]),
                xytext=(5, 5),
                textcoords="offset points",
                fontsize=7,
            )
    ax.margins(x=0.12)  # room for the labels of the extreme points
    f = t[t["on_front"]].sort_values(f"{cost}_mean")
    ax.plot(
        f[f"{cost}_mean"],
        f[f"{metric}_mean"],
        drawstyle="steps-post",
        color="tab:blue",
        lw=1.5,
        alpha=0.7,
        label="Pareto front",
        gid="front",
    )
    if references and "mode" in df.columns:
        _reference_lines(ax, _references(df).dropna(subset=[metric]), metric)
    if logx:
        ax.set_xscale("symlog" if (t[f"{cost}_mean"] <= 0).any() else "log")
    else:
        ax.xaxis.set_major_formatter(EngFormatter(unit=unit, sep=" "))
    ax.set_xlabel(f"{name} {cost_arrow(cost)}" + (f" ({unit})" if unit and logx else ""))
    ax.set_ylabel(metric_label(metric))
    ax.set_title(
        title
        or f"{HEADLINE.get(metric, metric)} against {name} (mean ± std over seeds)"
        + _limit_note(df)
        + _devices_note(df)
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    return fig


# ---- signal overlap --------------------------------------------------------------------------


def overlap_heatmap(matrix: pd.DataFrame, *, title: str | None = None) -> Figure:
    """Heatmap of a signals x signals Jaccard matrix (`analysis.overlap.jaccard_matrix`), cells annotated."""
    from analysis.overlap import label  # signal names for humans; one definition

    S = len(matrix)
    if S == 0 or matrix.shape != (S, S):
        raise ValueError(f"need a non-empty square matrix, got shape {matrix.shape}")
    side = max(4.0, 0.75 * S + 2.5)
    fig = Figure(figsize=(side + 1.0, side), dpi=120)
    ax = fig.add_subplot()
    vals = matrix.to_numpy(float)
    im = ax.imshow(vals, cmap="viridis", vmin=0.0, vmax=1.0)
    ax.set_xticks(range(S), [label(str(c)) for c in matrix.columns], rotation=40, ha="right", rotation_mode="anchor")
    ax.set_yticks(range(S), [label(str(c)) for c in matrix.index])
    for i in range(S):
        for j in range(S):
            v = vals[i, j]
            ax.text(
                j,
                i,
                "n/a" if v != v else f"{v:.2f}",
                ha="center",
                va="center",
                fontsize=8,
                color="black" if v == v and v > 0.6 else "white",
            )
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="Jaccard |A ∩ B| / |A ∪ B|")
    ax.set_title(title or "Overlap of selected positions")
    fig.tight_layout()
    return fig


# ---- output ----------------------------------------------------------------------------------


def save(fig: Figure, path: str | Path) -> Path:
    """Write `fig` as a PNG at `path` atomically (temp file beside it, then os.replace)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(Path(path), buf.getvalue())
    return Path(path)
