"""Do the importance signals pick the same positions? Pairwise Jaccard overlap of top_k selections.

For a batch of held-out sequences, each signal u (docs/method.md §4) ranks the valid positions and top_k keeps
ceil(k * n_valid) per sequence (docs/method.md §5). For two signals a, b with selections A, B:

    J(a, b) = |A ∩ B| / |A ∪ B|,   per sequence and averaged (default), or pooled over the batch.

    python -m analysis.overlap --model tiny --split validation --k 0.2 --n 16 --out overlap.png [--csv overlap.csv]
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any, Sequence

import pandas as pd
import torch
from torch import Tensor

from sekd.data.packing import IGNORE, PackedData
from sekd.core.files import atomic_write_text
from sekd.selection.policies import POLICIES
from sekd.selection.signals import SIGNALS, importance

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"


# ---- selections and their overlap ----------------------------------------------------------


@torch.no_grad()
def selections(
    s_logits: Tensor,
    t_logits: Tensor | None,
    labels: Tensor,
    signals: Sequence[str],
    k: float,
    *,
    seed: int = 0,
    generator: torch.Generator | None = None,
    normalization: str = "sum",
    temperature: float = 1.0,
) -> dict[str, Tensor]:
    """m_t = top_k(u_sig) for each signal: name -> bool [B,T].  [B,T,V],[B,T,V]|None,[B,T]

    The random signal draws from `generator` (default: a CPU generator seeded with `seed`).
    """
    valid = labels != IGNORE  #                                                  [B,T]
    policy = POLICIES.build("top_k", k=k)
    gen = generator if generator is not None else torch.Generator().manual_seed(seed)
    T = labels.shape[1]
    out: dict[str, Tensor] = {}
    for name in signals:
        u = importance(
            SIGNALS.get(name),
            s_logits,
            t_logits,
            labels,
            valid,
            generator=gen,
            normalization=normalization,
            temperature=temperature,
        )  # u(t)   [B,T]
        out[name] = (policy(u, valid).dense(T) > 0) & valid  #                   [B,T]
    return out


def _stack(masks: dict[str, Tensor]) -> Tensor:
    """Masks as one float64 tensor.  S x [B,T] -> [S,B,T]"""
    shapes = {tuple(m.shape) for m in masks.values()}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2:
        raise ValueError(f"masks must all be [B,T] of one shape; got {sorted(shapes)}")
    return torch.stack([m.detach().bool().cpu() for m in masks.values()]).double()


def jaccard_matrix(masks: dict[str, Tensor], *, per_sequence: bool = True) -> pd.DataFrame:
    """J[a,b] = |A ∩ B| / |A ∪ B|, averaged over sequences (or pooled over the batch); diagonal 1.

    A sequence where both selections are empty has no overlap to measure and is left out of the mean;
    a pair with no such sequence at all gets NaN.
    """
    names = list(masks)
    M = _stack(masks)  #                                                         [S,B,T]
    inter = torch.einsum("ibt,jbt->ijb", M, M)  # |A ∩ B| per sequence          [S,S,B]
    size = M.sum(-1)  # |A|                                                      [S,B]
    union = size[:, None, :] + size[None, :, :] - inter  # |A ∪ B|              [S,S,B]
    if per_sequence:
        seen = union > 0
        ratio = torch.where(seen, inter / union.clamp_min(1), torch.zeros_like(inter))
        J = ratio.sum(-1) / seen.sum(-1)  # NaN where no sequence counts          [S,S]
    else:
        U = union.sum(-1)
        J = torch.where(U > 0, inter.sum(-1) / U.clamp_min(1), torch.full_like(U, float("nan")))
    J.fill_diagonal_(1.0)
    return pd.DataFrame(J.numpy(), index=names, columns=names)


# ---- models over held-out data --------------------------------------------------------------


@torch.no_grad()
def _logits(model: torch.nn.Module, x: Tensor, vocab: int | None) -> Tensor:
    """Next-token logits in float32, cut to the tokenizer's vocabulary.  [B,T] -> [B,T,V]"""
    z = model(input_ids=x).logits
    return (z if vocab is None else z[..., :vocab]).float()


def signal_overlap(
    student: torch.nn.Module,
    teacher: torch.nn.Module | None,
    data: PackedData,
    *,
    signals: Sequence[str] | None = None,
    k: float = 0.2,
    n_sequences: int = 16,
    batch_size: int = 8,
    seed: int = 0,
    device: str | torch.device = "cpu",
    vocab: int | None = None,
    per_sequence: bool = True,
    normalization: str = "sum",
    temperature: float = 1.0,
) -> pd.DataFrame:
    """Jaccard matrix of the signals' top_k selections on the first n_sequences of `data`.

    Both models run without gradient in eval mode (their mode is restored after) and must already be
    on `device`; `vocab` cuts padded logit rows (Qwen-style heads) to the tokenizer's size.
    `signals` defaults to every registered signal; the teacher may be None when none needs it.
    """
    names = list(signals) if signals is not None else SIGNALS.names()
    need_teacher = any(SIGNALS.get(n).needs_teacher for n in names)
    if need_teacher and teacher is None:
        raise ValueError("a signal needs teacher logits but no teacher was given")
    read_teacher = teacher if need_teacher else None  # the teacher, where a signal reads its logits
    if n_sequences < 1 or batch_size < 1:
        raise ValueError(f"n_sequences={n_sequences} and batch_size={batch_size} must be >= 1")
    n = min(n_sequences, len(data))
    gen = torch.Generator().manual_seed(seed)  # one stream for the whole pass
    models = [m for m in (student, teacher) if m is not None]
    modes = [(mod, mod.training) for m in models for mod in m.modules()]  # restored exactly after
    parts: dict[str, list[Tensor]] = {name: [] for name in names}
    try:
        for m in models:
            m.eval()
        for i in range(0, n, batch_size):
            x = data.input_ids[i : min(i + batch_size, n)].to(device)  #          [B,T]
            y = data.labels[i : min(i + batch_size, n)].to(device)  #             [B,T]
            s_logits = _logits(student, x, vocab)  #                              [B,T,V]
            t_logits = _logits(read_teacher, x, vocab) if read_teacher is not None else None  # [B,T,V]
            batch = selections(
                s_logits, t_logits, y, names, k, generator=gen, normalization=normalization, temperature=temperature
            )
            for name, picked in batch.items():
                parts[name].append(picked.cpu())
    finally:
        for mod, mode in modes:
            mod.training = mode
    return jaccard_matrix({name: torch.cat(p) for name, p in parts.items()}, per_sequence=per_sequence)


# ---- output ---------------------------------------------------------------------------------

ABBREV = {"kl": "KL", "ce": "CE"}


def label(name: str) -> str:
    """A signal name for humans: 'kl_plus_student_entropy' -> 'KL + student entropy'."""
    parts = name.split("_plus_")
    return " + ".join(" ".join(ABBREV.get(w, w) for w in p.split("_")) for p in parts)


def markdown(df: pd.DataFrame, digits: int = 2) -> str:
    """The matrix as a GitHub markdown table (no tabulate needed)."""
    head = "| | " + " | ".join(map(str, df.columns)) + " |"
    rule = "|---" * (len(df.columns) + 1) + "|"
    rows = [f"| {idx} | " + " | ".join(f"{v:.{digits}f}" for v in row) + " |" for idx, row in zip(df.index, df.values)]
    return "\n".join([head, rule, *rows])


def plot_overlap(df: pd.DataFrame, path: str | Path, *, title: str | None = None) -> Path:
    """Heatmap PNG of the Jaccard matrix, each cell annotated with 2 decimals; written atomically."""
    from analysis.plots import overlap_heatmap, save

    return save(overlap_heatmap(df, title=title), Path(path))


# ---- CLI ------------------------------------------------------------------------------------


def load_setup(
    model: str, split: str, *, cache: str | None, seq_len: int | None, device: str, overrides: Sequence[str] = ()
) -> dict[str, Any]:
    """Compose conf/ for model=<model> (and `overrides`: a pretrained pair's); load the pair, the tokenizer and
    the held-out split."""
    from hydra import compose, initialize_config_dir

    from sekd.app.checks import source_options, typed
    from sekd.data.dataset import build_packed
    from sekd.models.loading import check_same_tokenizer, load_model, resolve_pair, shared_vocab

    given = [f"model={model}", *overrides] + ([f"paths.cache={cache}"] if cache else [])
    given += [f"data.seq_len={seq_len}"] if seq_len else []
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=given)
    teacher_path, student_path, tok_path = resolve_pair(typed(cfg))
    trc = cfg.model.trust_remote_code
    tok = check_same_tokenizer(teacher_path, student_path, tok_path, trc)
    dev = torch.device(device)
    student = load_model(student_path, dev, torch.float32, trc)
    teacher = load_model(teacher_path, dev, torch.float32, trc)
    data = build_packed(
        cfg.data.name,
        split,
        tok,
        seq_len=cfg.data.seq_len,
        token_budget=None,
        artifacts_dir=Path(cfg.paths.cache) / "data",
        separator=cfg.data.separator,
        **source_options(cfg),
    )
    return {"student": student, "teacher": teacher, "data": data, "vocab": shared_vocab(tok, student, teacher)}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m analysis.overlap", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny", help="a conf/model/<name>.yaml (tiny, embedded, ...)")
    p.add_argument("--split", default="validation")
    p.add_argument("--k", type=float, default=0.2, help="top_k budget (fraction of valid positions)")
    p.add_argument("--n", type=int, default=16, help="held-out sequences (the first n of the split)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--signals", nargs="+", default=None, help=f"default: all of {', '.join(SIGNALS.names())}")
    p.add_argument("--pooled", action="store_true", help="pool counts over the batch instead of averaging sequences")
    p.add_argument("--seq-len", type=int, default=None, help="default: the data group's seq_len")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cache", default=None, help="default: paths.cache (SEKD_CACHE_DIR or .sekd_cache)")
    p.add_argument("--out", default="overlap.png")
    p.add_argument("--csv", default=None)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> pd.DataFrame:
    """Parse, build, measure, write: the matrix to stdout as markdown, the PNG (and CSV) to disk."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(var, "1")
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    setup = load_setup(args.model, args.split, cache=args.cache, seq_len=args.seq_len, device=args.device)
    df = signal_overlap(
        setup["student"],
        setup["teacher"],
        setup["data"],
        signals=args.signals,
        k=args.k,
        n_sequences=args.n,
        batch_size=args.batch_size,
        seed=args.seed,
        device=args.device,
        vocab=setup["vocab"],
        per_sequence=not args.pooled,
    )
    n = min(args.n, len(setup["data"]))
    how = "pooled" if args.pooled else "mean over sequences"
    title = f"Jaccard overlap of top-k positions\nmodel={args.model}, {args.split}, k={args.k:g}, n={n} ({how})"
    print(title.replace("\n", ": ") + "\n\n" + markdown(df))
    plot_overlap(df, args.out, title=title)
    if args.csv:
        atomic_write_text(Path(args.csv), df.to_csv(float_format="%.6f"))
    print(f"\nwrote {args.out}" + (f" and {args.csv}" if args.csv else ""))
    return df


if __name__ == "__main__":
    main()
