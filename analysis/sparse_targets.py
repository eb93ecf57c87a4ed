"""Which sparse teacher target gives the gradient closest to Full KD's, and at what bytes per position?

For one teacher and student on held-out positions (float64 logits), each class sampler of
sekd/selection/classes.py (CLASSES) over a range of budgets (k, p, N draws), and each criterion that takes
its form of target (forward_kl; reverse_kl for renormalized and tail targets), against Full KD's gradient in
the student's logits g* = dD_full/ds, per position, over R draws of a random sampler (one otherwise):

    bias      ||E[g] - g*||             rms over positions of the unbiased ||mean_r g_r - g*||^2 - variance / R
    variance  E||g - E[g]||^2           the unbiased estimate over the R draws (0 for a deterministic one)
    error     sqrt(E||g - g*||^2)       one draw's error, bias^2 + variance: what one training step sees
    loss gap  E[D_sparse] - D_full;     bytes per position: `bytes_per_position` (the cache's records)

Means over positions (bias and error: root mean squares); `*_rel` divides by the rms of ||g*||. Writes sparse_targets.csv (one
row per sampler, options, criterion), sparse_targets.md and sparse_targets.png into --out.

    python -m analysis.sparse_targets --out outputs/sparse_targets      # the embedded pair and corpus
    python -m analysis.sparse_targets --teacher Qwen/Qwen3-8B --student Qwen/Qwen3-1.7B --device cuda --out ...
"""

from __future__ import annotations

import argparse
import math
import os
import time
import zlib
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from sekd.core.files import atomic_write_text
from sekd.selection.classes import CLASSES, ClassSampler, SparseTarget
from sekd.selection.criteria import CRITERIA, Criterion, sparse_capable, sparse_divergence
from sekd.stores.teacher_cache import format as cache_format

K_GRID = (1, 2, 4, 8, 16, 32, 64, 128, 256)
P_GRID = (0.5, 0.7, 0.8, 0.9, 0.95, 0.99)
N_GRID = (1, 2, 4, 8, 16, 32, 64, 128, 256)
TAIL_SPLITS = ((1, 4), (1, 16), (1, 64), (4, 4), (4, 16), (4, 64), (16, 16), (16, 64))  # rs_kd_tail (top, N)
TOP_P_MAX_K = 256
SAMPLERS = ("rs_kd", "rs_kd_tail", "top_k_truncation", "top_k_tail", "top_p", "student_top_k", "union_top_k")
# how the cache stores a sampler's target: RS-KD's draws as (id, count) records, rs_kd_tail's head as (id,
# probability) records and its draws as (id, count) ones; every other kind as (id, probability) records
COUNTED = {"rs_kd": "counts"}  # the cache's (id, count) kind; every other kind stores (id, probability)
BIAS_FLOOR = 1e-4  # the plot's floor for a relative bias


# ---- bytes ------------------------------------------------------------------------------------


def bytes_per_position(
    vocab_size: int, *, prob_records: float = 0.0, count_records: float = 0.0, n_draws: int = 1, tail: bool = False
) -> float:
    """One position's sparse target in the teacher cache, in bytes, by the cache's own record sizes
    (sekd/stores/teacher_cache/format.py):

    - a (class id, count) record of RS-KD draws: `bytes_per_record(V, N)` (3 bytes while V <= 2^18 and
      N <= 64, else 6);
    - a (class id, float16 probability) record, every other kind: `prob_record_bytes(V)` (4, 6 above 2^18);
    - a tail target's tail mass: one more float16, 2 bytes;
    - the support's length: 1 byte per position (while no position holds more than 255 classes).

    prob_records, count_records: the mean records per position, measured on the data.
    """
    counted = count_records * cache_format.bytes_per_record(vocab_size, n_draws) if count_records else 0.0
    return 1.0 + prob_records * cache_format.prob_record_bytes(vocab_size) + counted + (2.0 if tail else 0.0)


def target_records(name: str, options: dict[str, Any], target: SparseTarget) -> tuple[Tensor, Tensor]:
    """(probability records, count records) per position of a target as the cache would store it.  -> [N], [N]"""
    kept = target.mask.to(torch.float64)
    kind = COUNTED.get(name, "probs")
    if kind == "counts":
        return torch.zeros_like(kept[:, 0]), kept.sum(-1)
    return kept.sum(-1), torch.zeros_like(kept[:, 0])


# ---- the settings: samplers x budgets --------------------------------------------------------


@dataclass(frozen=True)
class Setting:
    """One sampler at one budget: its options, the option that is the budget, and the criteria it is read by."""

    sampler: str
    options: tuple[tuple[str, Any], ...]
    budget: str
    criteria: tuple[str, ...] = field(default=())

    @property
    def opts(self) -> dict[str, Any]:
        return dict(self.options)

    @property
    def family(self) -> str:
        """The sampler and its options but the budget: one line of the plot per family and criterion."""
        rest = " ".join(f"{k}={v}" for k, v in self.options if k != self.budget)
        return f"{self.sampler} {rest}".strip()

    def label(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.options)


def accepting(piece: ClassSampler, options: dict[str, Any], criteria: Iterable[str] | None = None) -> tuple[str, ...]:
    """The sparse-capable criteria that take this sampler's form of target (sparse_divergence's refusals)."""
    out = []
    for name in criteria if criteria is not None else sparse_capable():
        try:
            sparse_divergence(CRITERIA.get(name), piece.name, piece.form_of(options))
        except ValueError:
            continue
        out.append(name)
    return tuple(out)


def settings(
    samplers: Sequence[str] = SAMPLERS,
    *,
    k: Sequence[int] = K_GRID,
    p: Sequence[float] = P_GRID,
    n: Sequence[int] = N_GRID,
    splits: Sequence[tuple[int, int]] = TAIL_SPLITS,
    max_k: int = TOP_P_MAX_K,
    criteria: Sequence[str] | None = None,
) -> list[Setting]:
    """Every sampler at every budget of its kind, with the criteria that take it (none: left out)."""
    grid: dict[str, tuple[str, list[dict[str, Any]]]] = {
        "rs_kd": ("n_draws", [{"n_draws": v} for v in n]),
        "rs_kd_tail": ("n_draws", [{"top": a, "n_draws": b} for a, b in splits]),
        "top_k_tail": ("top", [{"top": v} for v in k]),
        "top_p": ("p", [{"p": v, "max_k": max_k} for v in p]),
    }
    for name, norms in (
        ("top_k_truncation", ("renormalized", "raw")),
        ("student_top_k", ("renormalized", "raw", "tail")),
        ("union_top_k", ("renormalized", "raw", "tail")),
    ):
        grid[name] = ("top", [{"top": v, "normalization": m} for m in norms for v in k])
    out = []
    for name in samplers:
        if name not in grid:
            raise ValueError(f"--samplers: {name!r} has no budget grid here; known: {', '.join(grid)}")
        budget, option_sets = grid[name]
        piece = CLASSES.get(name)
        for opts in option_sets:
            CLASSES.build(name, **opts)  # the options' own checks, one line each
            crits = accepting(piece, opts, criteria)
            if crits:
                out.append(Setting(name, tuple(opts.items()), budget, crits))
    return out


# ---- the estimator ----------------------------------------------------------------------------


def loss_and_gradient(divergence: Callable[[Tensor], Tensor], s: Tensor) -> tuple[Tensor, Tensor]:
    """D per position and dD/ds per position (D_n depends on s_n alone: the gradient of the sum).  -> [N], [N,V]"""
    x = s.detach().clone().requires_grad_(True)
    d = divergence(x)
    (g,) = torch.autograd.grad(d.sum(), x)
    return d.detach(), g


def full_kd(crit: Criterion, s: Tensor, t: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """Full KD's D_full and g* = dD_full/ds per position, the dense criterion in float64.  -> [N], [N,V]"""
    y = torch.zeros(s.shape[0], dtype=torch.long)  # the KL criteria do not read the labels
    return loss_and_gradient(lambda x: crit(x, t.double(), y, temperature=temperature), s.double())


@dataclass
class Tally:
    """Sums over draws at each position against g*: sum_r (g_r - g*), sum_r ||g_r - g*||^2, sum_r D_r."""

    diff: Tensor
    sq: Tensor
    loss: Tensor
    draws: int = 0

    @classmethod
    def zeros(cls, n: int, v: int) -> "Tally":
        z = torch.zeros(n, dtype=torch.float64)
        return cls(torch.zeros(n, v, dtype=torch.float64), z.clone(), z.clone())

    def add(self, d: Tensor, g: Tensor, g_full: Tensor) -> None:
        e = g - g_full
        self.diff += e
        self.sq += e.pow(2).sum(-1)
        self.loss += d
        self.draws += 1

    def per_position(self, d_full: Tensor, g_full: Tensor) -> dict[str, Tensor]:
        """mse = E||g - g*||^2, variance (unbiased; 0 from one draw), bias2 = ||mean g - g*||^2 - variance / R
        (unbiased for ||E[g] - g*||^2), gap = E[D] - D_full, and ||g*||^2, D_full.  each [N]"""
        R = self.draws
        mean_sq = (self.diff / R).pow(2).sum(-1)
        mse = self.sq / R
        var = (self.sq - R * mean_sq).clamp_min(0.0) / (R - 1) if R > 1 else torch.zeros_like(mse)
        bias2 = mean_sq - var / R
        return {
            "mse": mse,
            "variance": var,
            "bias2": bias2,
            "gap": self.loss / R - d_full,
            "g2": g_full.pow(2).sum(-1),
            "d_full": d_full,
        }


def measure(
    s: Tensor,
    t: Tensor,
    setting: Setting,
    *,
    temperature: float = 1.0,
    draws: int = 32,
    seed: int = 0,
    chunk: int = 1024,
    full: dict[str, tuple[Tensor, Tensor]] | None = None,
) -> dict[str, dict[str, Tensor]]:
    """One setting at every position of s, t [N,V]: criterion -> per-position statistics (Tally.per_position,
    plus the records per position). A random sampler draws R = `draws` times from a generator seeded by the
    setting (so a row does not depend on the others); `full`: D_full and g* per criterion, computed if None."""
    piece = CLASSES.build(setting.sampler, **setting.opts)
    R = draws if piece.random else 1
    if piece.random and R < 2:
        raise ValueError(f"--draws {draws}: a random sampler's variance needs at least 2 draws")
    gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(f"{setting.sampler} {setting.label()}".encode()))
    crits = {c: CRITERIA.get(c) for c in setting.criteria}
    full = full or {c: full_kd(crit, s, t, temperature) for c, crit in crits.items()}
    parts: dict[str, list[dict[str, Tensor]]] = {c: [] for c in crits}
    for a in range(0, s.shape[0], chunk):
        sc, tc = s[a : a + chunk].double(), t[a : a + chunk].double()
        tallies = {c: Tally.zeros(*sc.shape) for c in crits}
        prob_rec, count_rec = (
            torch.zeros(sc.shape[0], dtype=torch.float64),
            torch.zeros(sc.shape[0], dtype=torch.float64),
        )
        for _ in range(R):
            target = piece(tc, temperature=temperature, generator=gen, student=sc)
            pr, cr = target_records(setting.sampler, setting.opts, target)
            prob_rec, count_rec = prob_rec + pr, count_rec + cr
            for c, crit in crits.items():
                sparse = sparse_divergence(crit, setting.sampler, target.form)
                d, g = loss_and_gradient(partial(sparse, target=target, temperature=temperature), sc)
                tallies[c].add(d, g, full[c][1][a : a + chunk])
        for c, tally in tallies.items():
            d_full, g_full = (x[a : a + chunk] for x in full[c])
            stats = tally.per_position(d_full, g_full)
            parts[c].append({**stats, "prob_records": prob_rec / R, "count_records": count_rec / R})
    return {c: {k: torch.cat([p[k] for p in ps]) for k in ps[0]} for c, ps in parts.items()}


def summarize(stats: dict[str, Tensor], setting: Setting, criterion: str, *, vocab_size: int, draws: int) -> dict:
    """One table row from the per-position statistics of one setting and criterion."""
    piece = CLASSES.get(setting.sampler)
    opts = setting.opts
    g_norm = float(stats["g2"].sqrt().mean())
    g_rms = math.sqrt(float(stats["g2"].mean()))
    bias2 = float(stats["bias2"].mean())  # unbiased for mean ||E[g] - g*||^2: near 0, either sign, if unbiased
    bias = math.sqrt(max(bias2, 0.0))
    # the draws' noise in that mean: its standard error over positions (0 for a deterministic sampler)
    se = (
        float(stats["bias2"].std()) / math.sqrt(stats["bias2"].numel())
        if piece.random and len(stats["bias2"]) > 1
        else 0.0
    )
    loss_full = float(stats["d_full"].mean())
    prob_rec, count_rec = float(stats["prob_records"].mean()), float(stats["count_records"].mean())
    form = piece.form_of(opts)
    return {
        "sampler": setting.sampler,
        "options": setting.label(),
        "family": setting.family,
        "budget": setting.budget,
        "budget_value": opts[setting.budget],
        "form": form,
        "criterion": criterion,
        "random": piece.random,
        "cacheable": not piece.needs_student,
        "draws": draws if piece.random else 1,
        "positions": int(stats["g2"].numel()),
        "support": prob_rec + count_rec,
        "bytes_per_position": bytes_per_position(
            vocab_size,
            prob_records=prob_rec,
            count_records=count_rec,
            n_draws=int(opts.get("n_draws", 1)),
            tail=form == "tail",
        ),
        "grad_norm": g_norm,
        "bias": bias,
        "bias_rel": bias / g_rms if g_rms > 0 else math.nan,
        "bias2_rel": bias2 / g_rms**2 if g_rms > 0 else math.nan,
        "bias_rel_upper": math.sqrt(max(bias2 + 2 * se, 0.0)) / g_rms if g_rms > 0 else math.nan,  # ~95% bound
        "variance": float(stats["variance"].mean()),
        "std_rel": math.sqrt(float(stats["variance"].mean())) / g_rms if g_rms > 0 else math.nan,
        "error_rel": math.sqrt(float(stats["mse"].mean())) / g_rms if g_rms > 0 else math.nan,
        "loss_full": loss_full,
        "loss_gap": float(stats["gap"].mean()),
        "loss_gap_rel": float(stats["gap"].mean()) / loss_full if loss_full > 0 else math.nan,
    }


def full_rows(full: dict[str, tuple[Tensor, Tensor]], vocab_size: int) -> list[dict]:
    """Full KD itself, per criterion: the whole distribution as float16 logits, 2 |V| bytes, no error."""
    return [
        {
            "sampler": "full",
            "options": "",
            "family": "full",
            "budget": "",
            "budget_value": math.nan,
            "form": "dense",
            "criterion": c,
            "random": False,
            "cacheable": True,
            "draws": 1,
            "positions": int(d.numel()),
            "support": float(vocab_size),
            "bytes_per_position": 2.0 * vocab_size,
            "grad_norm": float(g.pow(2).sum(-1).sqrt().mean()),
            **dict.fromkeys(
                ("bias", "bias_rel", "bias2_rel", "bias_rel_upper", "variance", "std_rel", "error_rel"), 0.0
            ),
            "loss_full": float(d.mean()),
            "loss_gap": 0.0,
            "loss_gap_rel": 0.0,
        }
        for c, (d, g) in full.items()
    ]


def sweep_targets(
    s: Tensor,
    t: Tensor,
    grid: Sequence[Setting],
    *,
    temperature: float = 1.0,
    draws: int = 32,
    seed: int = 0,
    chunk: int = 1024,
    progress: bool = False,
) -> pd.DataFrame:
    """The table: Full KD's rows, then one row per setting and criterion that takes it."""
    from tqdm.auto import tqdm

    s, t = s.double(), t.double()
    V = s.shape[-1]
    crits = sorted({c for st in grid for c in st.criteria})
    full = {c: full_kd(CRITERIA.get(c), s, t, temperature) for c in crits}
    rows = full_rows(full, V)
    for st in tqdm(grid, desc="sparse targets", disable=not progress, leave=False):
        per = measure(s, t, st, temperature=temperature, draws=draws, seed=seed, chunk=chunk, full=full)
        rows += [summarize(stats, st, c, vocab_size=V, draws=draws) for c, stats in per.items()]
    return pd.DataFrame(rows)


# ---- held-out logits --------------------------------------------------------------------------


@torch.no_grad()
def heldout_logits(
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    input_ids: Tensor,
    labels: Tensor,
    *,
    positions: int,
    vocab: int,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
) -> tuple[Tensor, Tensor]:
    """Both models' next-token logits at the first `positions` positions with a label, in float64 on the CPU,
    cut to the tokenizer's `vocab`.  [B,L] -> s [N,V], t [N,V]"""
    student.eval()
    teacher.eval()
    s_parts: list[Tensor] = []
    t_parts: list[Tensor] = []
    have = 0
    for a in range(0, input_ids.shape[0], batch_size):
        if have >= positions:
            break
        x = input_ids[a : a + batch_size].to(device)
        keep = (labels[a : a + batch_size] != -100).to(device)
        for model, parts in ((student, s_parts), (teacher, t_parts)):
            parts.append(model(input_ids=x).logits[..., :vocab][keep].double().cpu())
        have += int(keep.sum())
    if have == 0:
        raise ValueError("the held-out split has no position with a label")
    return torch.cat(s_parts)[:positions], torch.cat(t_parts)[:positions]


# ---- output -----------------------------------------------------------------------------------

COLUMNS = ["sampler", "options", "criterion", "bytes_per_position", "error_rel", "bias_rel", "std_rel", "loss_gap"]


def markdown_table(df: pd.DataFrame, columns: Sequence[str] = COLUMNS) -> str:
    """Rows as a GitHub markdown table (numbers to 4 significant digits; no tabulate needed)."""

    def cell(v: Any) -> str:
        if isinstance(v, (float, np.floating)):
            return "" if v != v else f"{v:.4g}"
        return str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r[c]) for c in columns) + " |" for _, r in df.iterrows()]
    return "\n".join(lines)


def headline(df: pd.DataFrame) -> pd.DataFrame:
    """Per family and criterion: its largest budget's row (the least error it reaches here)."""
    d = df[df["sampler"] != "full"]
    last = d.sort_values("bytes_per_position").groupby(["family", "criterion"], sort=False).tail(1)
    return last.sort_values(["cacheable", "error_rel"], ascending=[False, True])


def summary(df: pd.DataFrame, about: str) -> str:
    """The markdown summary: what was measured, the headline per family, then every row."""
    d = df[df["sampler"] != "full"]
    unbiased = sorted(set(d.loc[d["random"], "family"]))
    lines = [
        "# Sparse teacher targets against Full KD's gradient",
        "",
        about,
        "",
        "error_rel = sqrt(E||g - g*||^2) / rms ||g*|| (one draw); bias_rel = rms ||E[g] - g*|| / rms ||g*|| "
        "(debiased over the draws: about 0 for an unbiased sampler); "
        "std_rel = sqrt(E||g - E[g]||^2) / rms ||g*||; loss_gap = E[D_sparse] - D_full (nats per position); "
        "bytes: `bytes_per_position`. Full KD: "
        + ", ".join(f"{r.criterion} D_full = {r.loss_full:.4g}" for r in df[df["sampler"] == "full"].itertuples()),
        f"; random samplers ({', '.join(unbiased) or 'none'}) are measured over their draws.",
        "",
        "## Each family at its largest budget",
        "",
        markdown_table(headline(df), ["family", "criterion", *COLUMNS[3:], "cacheable"]),
        "",
        "## Every row",
        "",
        markdown_table(df),
        "",
    ]
    return "\n".join(lines)


def plot(df: pd.DataFrame, path: str | Path, *, title: str | None = None) -> Path:
    """Error (one draw), bias and loss gap against bytes per position, log-log; one line per family and
    criterion (colour: family, dashes: criterion; o: cacheable, x: needs the student), a random sampler's
    bias as its ~95% upper bound (v), Full KD's bytes as a vertical line. Written atomically."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    from analysis.plots import save

    d = df[df["sampler"] != "full"].sort_values("bytes_per_position")
    fig = Figure(figsize=(16.0, 6.4), dpi=100)
    axes = fig.subplots(1, 3)
    palette = colormaps["tab20"]
    colors = {name: palette(i % 20) for i, name in enumerate(dict.fromkeys(d["family"]))}
    dashes = {c: ls for c, ls in zip(dict.fromkeys(d["criterion"]), ("-", "--", ":", "-."))}
    panels = (
        ("error_rel", "gradient error sqrt(E||g - g*||²) / rms ||g*||", "log"),
        ("bias_rel", f"bias ||E[g] - g*|| / rms ||g*||  (v: upper bound; floor {BIAS_FLOOR:g})", "log"),
        ("loss_gap", "loss gap E[D_sparse] - D_full (nats)", "symlog"),
    )
    for ax, (col, ylabel, yscale) in zip(axes, panels):
        for (family, crit), g in d.groupby(["family", "criterion"], sort=False):
            bound = col == "bias_rel" and bool(g["random"].iloc[0])
            y = g["bias_rel_upper" if bound else col].to_numpy(float)
            y = np.maximum(y, BIAS_FLOOR) if col == "bias_rel" else y
            marker = "v" if bound else "o" if bool(g["cacheable"].iloc[0]) else "x"
            ax.plot(
                g["bytes_per_position"], y, marker=marker, ms=3.5, lw=1.2, color=colors[family],
                ls=dashes[crit], label=f"{family} · {crit}", gid="family",
            )  # fmt: skip
        full = df.loc[df["sampler"] == "full", "bytes_per_position"]
        if len(full):
            ax.axvline(float(full.iloc[0]), color="0.3", ls=":", lw=1, label="Full KD (float16 logits)")
        ax.set_xscale("log")
        ax.set_yscale(yscale, **({"linthresh": 1e-3} if yscale == "symlog" else {}))
        ax.set_xlabel("bytes per position")
        ax.set_ylabel(ylabel, fontsize=8)
        ax.grid(alpha=0.3, which="both")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=6.5, frameon=False)
    fig.suptitle(title or "Sparse teacher targets against Full KD")
    fig.tight_layout(rect=(0, 0.22, 1, 0.96))
    return save(fig, Path(path))


# ---- CLI --------------------------------------------------------------------------------------


def load_pair(args: argparse.Namespace) -> dict[str, Any]:
    """The embedded pair of conf/model/<--model> (built once under paths.cache), or --teacher/--student."""
    from analysis.overlap import load_setup

    extra = []
    if args.teacher or args.student:
        if not (args.teacher and args.student):
            raise SystemExit("--teacher and --student go together (hub names or folders)")
        extra = ["model.source=pretrained", f"model.teacher={args.teacher}", f"model.student={args.student}"]
        extra += [f"model.tokenizer={args.tokenizer}"] if args.tokenizer else []
        extra += ["model.name=pretrained"]
    return load_setup(
        args.model, args.split, cache=args.cache, seq_len=args.seq_len, device=args.device, overrides=extra
    )


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def splits(text: str) -> list[tuple[int, int]]:
    """'1:4,4:16' -> [(1, 4), (4, 16)]: rs_kd_tail's (top, n_draws)."""
    out = []
    for part in filter(None, text.split(",")):
        top, _, n = part.partition(":")
        out.append((int(top), int(n)))
    return out


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m analysis.sparse_targets", description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="folder for sparse_targets.csv, .md and .png")
    p.add_argument("--model", default="embedded", help="a conf/model/<name>.yaml (embedded, tiny, ...)")
    p.add_argument("--teacher", default=None, help="a hub name or folder (with --student): instead of --model's pair")
    p.add_argument("--student", default=None)
    p.add_argument("--tokenizer", default=None, help="default: the student's")
    p.add_argument("--split", default="validation", help="the held-out split of the data group (embedded corpus)")
    p.add_argument("--positions", type=int, default=2048, help="held-out positions (the first ones with a label)")
    p.add_argument("--draws", type=int, default=16, help="R: draws of a random sampler per position")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--samplers", default=",".join(SAMPLERS), help="comma-separated")
    p.add_argument("--k", type=ints, default=list(K_GRID), help="top-k budgets, comma-separated")
    p.add_argument("--p", type=floats, default=list(P_GRID), help="top-p budgets")
    p.add_argument("--n", type=ints, default=list(N_GRID), help="rs_kd draws N")
    p.add_argument("--splits", type=splits, default=list(TAIL_SPLITS), help="rs_kd_tail top:N pairs, '1:4,4:16'")
    p.add_argument("--max-k", type=int, default=TOP_P_MAX_K, help="top_p's cap on its support")
    p.add_argument("--seq-len", type=int, default=None, help="default: the data group's seq_len")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--chunk", type=int, default=1024, help="positions per block of the estimator")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="where the models run; the estimator runs in float64 on the CPU")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cache", default=None, help="default: paths.cache (SEKD_CACHE_DIR or .sekd_cache)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> pd.DataFrame:
    """Load, measure, write the CSV, the markdown summary and the plot into --out."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(var, "1")
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    grid = settings(
        [x for x in args.samplers.split(",") if x], k=args.k, p=args.p, n=args.n, splits=args.splits, max_k=args.max_k
    )  # options checked before anything loads
    setup = load_pair(args)
    data = setup["data"]
    s, t = heldout_logits(
        setup["student"], setup["teacher"], data.input_ids, data.labels,
        positions=args.positions, vocab=setup["vocab"], batch_size=args.batch_size, device=args.device,
    )  # fmt: skip
    start = time.monotonic()
    df = sweep_targets(
        s, t, grid, temperature=args.temperature, draws=args.draws, seed=args.seed, chunk=args.chunk, progress=True
    )
    pair = f"{args.teacher} -> {args.student}" if args.teacher else f"model={args.model}"
    about = (
        f"{pair}, {args.split} split, {s.shape[0]} positions, V = {s.shape[1]}, T = {args.temperature:g}, "
        f"R = {args.draws} draws per random sampler, seed {args.seed}; {time.monotonic() - start:.0f} s."
    )
    out = Path(args.out)
    atomic_write_text(out / "sparse_targets.csv", df.to_csv(index=False, float_format="%.6g"))
    atomic_write_text(out / "sparse_targets.md", summary(df, about))
    plot(
        df, out / "sparse_targets.png", title=f"Sparse teacher targets against Full KD: {pair}, {s.shape[0]} positions"
    )
    print(about + "\n\n" + markdown_table(headline(df), ["family", "criterion", *COLUMNS[3:]]))
    print(f"\nwrote {out / 'sparse_targets.csv'}, sparse_targets.md, sparse_targets.png")
    return df


if __name__ == "__main__":
    main()
