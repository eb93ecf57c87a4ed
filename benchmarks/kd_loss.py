"""Time and peak memory of the KD loss alone, from both models' final hidden states and LM heads.

    python benchmarks/kd_loss.py --shape logit_heavy --threads 1 --json loss.json
    python benchmarks/kd_loss.py --shape logit_heavy --threads 1 --chunk-sizes 27,128,510   # time vs chunk size
    python benchmarks/kd_loss.py --shape logit_heavy --vocab 32768 --seqs 256,4096 --variants selective_se_kd
    python benchmarks/kd_loss.py --shape qwen3_8b_to_1.7b --device cuda --json gpu_loss.json

Inputs (made once, outside what is measured): h_s [B,L,d_s] and the student head W_s [V,d_s] with
gradients, h_t [B,L,d_t] and W_t [V,d_t] without, labels = the next token (none at the last position).
Each call computes the loss and its gradients in h_s and W_s (forward + backward); nothing else.

Variants (forward KL at T = 1, averaged over the positions with a target):
  plain_torch_full_kd   both [B,L,V] logits, F.kl_div of their log_softmaxes: the reference (x 1)
  trl_gkd_full_kd       TRL's GKDTrainer.generalized_jsd_loss (beta = 0) on the same logits     (the `bench` extra)
  trl_chunked_full_kd   TRL's DistillationTrainer chunked divergence from hidden states          (the `bench` extra)
  sekd_dense_full_kd    sekd.kd.objective.selective_kd_loss on both logits, policy all
  sekd_chunked_full_kd  sekd.kd.flows.chunked_kd_loss, policy all
  plain_chunked_full_kd the obvious chunked loss: per chunk of positions, logits, F.kl_div, backward
  sekd_selective_se_kd  sekd.kd.flows.chunked_kd_loss, SE-KD: top 20% of positions by student entropy
  sekd_sparse_<sampler> sekd.kd.flows.chunked_kd_loss, policy all, against a sparse target drawn from the
                        teacher's logits at each chunk (the selective head: no [B,L,V] teacher logits), one row
                        per class sampler at about 32 classes a position (SPARSE)

Time: --rounds rounds after one warm-up round; each round runs every variant once, in turn, in this one
process (what moves the machine moves every variant alike); the table gives min and median. Memory: each
variant again in a fresh process, its own peak resident set (Linux VmHWM, reset after the inputs are made)
above the resident set with the inputs made (`GiB above inputs`); on CUDA, max_memory_allocated above the
inputs. Ratios are to plain_torch_full_kd's median time and peak.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from kd_step import SHAPES, full_kd, machine, se_kd  # noqa: E402
from reference_losses import plain_full_kd  # noqa: E402
from sekd.kd.flows import auto_chunk_size, chunked_kd_loss  # noqa: E402
from sekd.kd.objective import IGNORE, LossInputs, Selector, selective_kd_loss  # noqa: E402
from sekd.selection.criteria import forward_kl  # noqa: E402
from sekd.selection.policies import POLICIES  # noqa: E402

GIB = 2**30


@dataclass
class Inputs:
    h_s: torch.Tensor  # [B,L,d_s], requires grad
    W_s: torch.Tensor  # [V,d_s], requires grad
    h_t: torch.Tensor  # [B,L,d_t]
    W_t: torch.Tensor  # [V,d_t]
    y: torch.Tensor  # [B,L], IGNORE at the last position
    chunk_size: int

    @staticmethod
    def make(
        batch: int,
        seq: int,
        vocab: int,
        d_s: int,
        d_t: int,
        *,
        device: str,
        dtype: torch.dtype,
        chunk_size: int,
        seed: int = 0,
    ) -> "Inputs":
        g = torch.Generator().manual_seed(seed)

        def randn(*shape, scale):
            return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

        # logits of a few nats' spread, as trained models give
        h_s = randn(batch, seq, d_s, scale=1.0).requires_grad_()
        W_s = randn(vocab, d_s, scale=2.0 / d_s**0.5).requires_grad_()
        h_t, W_t = randn(batch, seq, d_t, scale=1.0), randn(vocab, d_t, scale=3.0 / d_t**0.5)
        x = torch.randint(0, vocab, (batch, seq), generator=g)
        y = torch.full_like(x, IGNORE)
        y[:, :-1] = x[:, 1:]
        return Inputs(h_s, W_s, h_t, W_t, y.to(device), chunk_size)

    def logits(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Student logits with grad, teacher logits without.  [B,L,V] x 2"""
        with torch.no_grad():
            z_t = self.h_t @ self.W_t.t()
        return self.h_s @ self.W_s.t(), z_t

    def clear(self) -> None:
        self.h_s.grad = self.W_s.grad = None


class Linear:  # what chunked_kd_loss takes for a head: something with .weight and .bias
    def __init__(self, weight):
        self.weight, self.bias = weight, None


def plain_torch_full_kd(inp: Inputs) -> None:
    plain_full_kd(*inp.logits()).backward()


def trl_gkd_full_kd(inp: Inputs) -> None:
    from trl.experimental.gkd import GKDTrainer

    z_s, z_t = inp.logits()
    GKDTrainer.generalized_jsd_loss(z_s.float(), z_t.float(), labels=inp.y, beta=0.0).backward()


def trl_chunked_full_kd(inp: Inputs) -> None:
    from trl.trainer.distillation_trainer import _chunked_divergence_loss

    loss, _, _ = _chunked_divergence_loss(inp.h_s, inp.h_t, inp.W_s, inp.W_t, (inp.y != IGNORE).long(), beta=0.0)
    loss.backward()


def sekd_dense_full_kd(inp: Inputs) -> None:
    z_s, z_t = inp.logits()
    out = selective_kd_loss(z_s, z_t, inp.y, LossInputs(full_kd(), lam=1.0, temperature=1.0))
    (out.loss_sum / out.weight).backward()


def _chunked(inp: Inputs, sel: Selector) -> None:
    out = chunked_kd_loss(
        inp.h_s,
        Linear(inp.W_s),
        inp.h_t,
        Linear(inp.W_t),
        inp.y,
        LossInputs(sel, lam=1.0, temperature=1.0, generator=torch.Generator()),
        vocab=inp.W_s.shape[0],
        chunk_size=inp.chunk_size,
    )
    (out.loss_sum / out.weight).backward()


def sekd_chunked_full_kd(inp: Inputs) -> None:
    _chunked(inp, full_kd())


def sekd_selective_se_kd(inp: Inputs) -> None:
    _chunked(inp, se_kd())


# each class sampler at about 32 classes a position (a budget of records, as a cache would store)
SPARSE: dict[str, dict[str, Any]] = {
    "rs_kd": {"n_draws": 32},
    "rs_kd_tail": {"top": 16, "n_draws": 16},
    "top_k_truncation": {"top": 32},
    "top_k_tail": {"top": 32},
    "top_p": {"p": 0.9, "max_k": 32},
    "student_top_k": {"top": 32},
    "union_top_k": {"top": 16},
}


def sparse_variant(name: str, options: dict[str, Any]) -> Callable[[Inputs], None]:
    def run(inp: Inputs) -> None:
        from sekd.selection.classes import CLASSES

        _chunked(inp, Selector.of(None, POLICIES.build("all"), forward_kl, classes=CLASSES.build(name, **options)))

    run.__name__ = f"sekd_sparse_{name}"
    return run


def plain_chunked_full_kd(inp: Inputs) -> None:
    """Per chunk of C positions: logits, F.kl_div, backward at once (the gradients accumulate in .grad)."""
    h_s, h_t = inp.h_s[:, :-1].flatten(0, 1), inp.h_t[:, :-1].flatten(0, 1)  # positions with a target
    n = h_s.shape[0]
    for a in range(0, n, inp.chunk_size):
        sl = slice(a, a + inp.chunk_size)
        with torch.no_grad():
            logp = F.log_softmax((h_t[sl] @ inp.W_t.t()).float(), -1)
        logq = F.log_softmax((h_s[sl] @ inp.W_s.t()).float(), -1)
        (F.kl_div(logq, logp, log_target=True, reduction="sum") / n).backward(retain_graph=True)


VARIANTS: dict[str, Callable[[Inputs], None]] = {
    f.__name__: f
    for f in (
        plain_torch_full_kd,
        trl_gkd_full_kd,
        trl_chunked_full_kd,
        sekd_dense_full_kd,
        sekd_chunked_full_kd,
        plain_chunked_full_kd,
        sekd_selective_se_kd,
        *(sparse_variant(name, options) for name, options in SPARSE.items()),
    )
}
NEEDS_TRL = ("trl_gkd_full_kd", "trl_chunked_full_kd")
REFERENCE = "plain_torch_full_kd"


def have_trl() -> bool:
    try:
        import trl  # noqa: F401
    except ImportError:
        return False
    return True


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def call(fn, inp: Inputs, device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn(inp)
    sync(device)
    dt = time.perf_counter() - t0
    inp.clear()
    return dt


def time_rounds(inp: Inputs, variants: list[str], rounds: int, device) -> dict[str, list[float]]:
    """Every variant once per round, in turn, after one warm-up round.  name -> seconds per round"""
    for v in variants:
        call(VARIANTS[v], inp, device)
    times: dict[str, list[float]] = {v: [] for v in variants}
    from tqdm import tqdm

    for _ in tqdm(range(rounds), desc="rounds", leave=False, file=sys.stderr):
        for v in variants:
            times[v].append(call(VARIANTS[v], inp, device))
    return times


def _status(key: str) -> int:
    """A field of /proc/self/status in bytes (Linux)."""
    found = re.search(rf"^{key}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    if found is None:
        raise RuntimeError(f"/proc/self/status has no {key}")
    return int(found.group(1)) * 1024


def peak_above_inputs(fn, inp: Inputs, device, calls: int = 2) -> float:
    """Peak memory of `calls` calls above what the inputs already hold, in GiB (this process's own)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        for _ in range(calls):
            call(fn, inp, device)
        return (torch.cuda.max_memory_allocated() - base) / GIB
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS now: the peak from here on
    base = _status("VmRSS")
    for _ in range(calls):
        call(fn, inp, device)
    return (_status("VmHWM") - base) / GIB


def fresh_peak(args, variant: str, seq: int, chunk_size: int) -> float:
    """`variant`'s peak above inputs, measured in a fresh interpreter (nothing carried over from this one)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "peak.json"
        cmd = [
            sys.executable,
            __file__,
            "--peak-of",
            variant,
            "--peak-json",
            str(out),
            "--shape",
            args.shape,
            "--seqs",
            str(seq),
            "--chunk-sizes",
            str(chunk_size),
            "--device",
            args.device,
            "--dtype",
            args.dtype,
        ]
        cmd += [f"--{k}={getattr(args, k)}" for k in ("batch", "vocab", "threads") if getattr(args, k) is not None]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"the peak of {variant} failed:\n{res.stderr[-4000:]}")
        return json.loads(out.read_text())["peak_gib"]


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="tiny", help="hidden sizes, vocabulary, B and L")
    p.add_argument("--batch", type=int, help="default: the shape's")
    p.add_argument("--seqs", default=None, help="comma-separated sequence lengths (default: the shape's)")
    p.add_argument("--vocab", type=int, help="default: the shape's")
    p.add_argument(
        "--chunk-sizes",
        default=None,
        help="comma-separated positions per chunk of the chunked variants (default: sekd.kd.flows.auto_chunk_size)",
    )
    p.add_argument(
        "--variants",
        default=None,
        help=f"comma-separated, of: {', '.join(VARIANTS)} (default: all; TRL's where trl is installed)",
    )
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--no-peaks", action="store_true", help="time only (no fresh process per variant)")
    p.add_argument("--device", help="default: the shape's")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], help="of the inputs (default: the shape's)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--json", type=Path, help="write machine, options and results here")
    p.add_argument("--peak-of", help=argparse.SUPPRESS)
    p.add_argument("--peak-json", type=Path, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def table(rows: list[dict]) -> str:
    from tabulate import tabulate

    def f(x, fmt):
        return "-" if x is None else format(x, fmt)

    return tabulate(
        [
            [
                r["L"],
                r["chunk_size"],
                r["variant"],
                f(r["min_s"], ".3f"),
                f(r["median_s"], ".3f"),
                f(r["time_vs_plain"], ".2f"),
                f(r["peak_above_inputs_gib"], ".3f"),
                f(r["peak_vs_plain"], ".2f"),
            ]
            for r in rows
        ],
        headers=["L", "chunk", "variant", "min s", "median s", "x plain time", "GiB above inputs", "x plain peak"],
    )


def main(argv=None) -> list[dict]:
    args = parse(argv)
    shape = SHAPES[args.shape]
    info = machine(args.device or shape.device)
    args.device, args.dtype = args.device or shape.device, args.dtype or shape.dtype
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        print(
            f"kd_loss: --device {args.device} needs CUDA, but this machine has no CUDA device; run it on a GPU "
            "machine, or pass --device cpu",
            file=sys.stderr,
        )
        sys.exit(2)
    if args.threads:
        torch.set_num_threads(args.threads)
    B, V = args.batch or shape.batch, args.vocab or shape.vocab
    seqs = [int(s) for s in args.seqs.split(",")] if args.seqs else [shape.seq]
    chunk_sizes = (
        [int(c) for c in args.chunk_sizes.split(",")]
        if args.chunk_sizes
        else [auto_chunk_size(V, torch.device(args.device).type)]
    )
    dtype = getattr(torch, args.dtype)

    def inputs(seq, chunk):
        return Inputs.make(
            B, seq, V, shape.student.hidden, shape.teacher.hidden, device=args.device, dtype=dtype, chunk_size=chunk
        )

    if args.peak_of:  # the child of fresh_peak
        if args.peak_of in NEEDS_TRL:  # imported before the peak is reset: trl's import is not the loss's memory
            import trl.experimental.gkd, trl.trainer.distillation_trainer  # noqa: E401, F401
        peak = peak_above_inputs(VARIANTS[args.peak_of], inputs(seqs[0], chunk_sizes[0]), args.device)
        args.peak_json.write_text(json.dumps({"peak_gib": peak}))
        return []
    variants = (
        [v.strip() for v in args.variants.split(",") if v.strip()]
        if args.variants
        else [v for v in VARIANTS if v not in NEEDS_TRL or have_trl()]
    )
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"kd_loss: unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    if any(v in NEEDS_TRL for v in variants) and not have_trl():
        raise SystemExit("kd_loss: the TRL variants need trl: pip install -e '.[bench]'")

    rows: list[dict[str, Any]] = []
    for seq in seqs:
        for chunk in chunk_sizes:
            print(
                f"shape={args.shape} B={B} L={seq} V={V} d_s={shape.student.hidden} d_t={shape.teacher.hidden} "
                f"chunk={chunk} device={args.device} dtype={args.dtype} threads={torch.get_num_threads()} "
                f"rounds={args.rounds}",
                flush=True,
            )
            times = time_rounds(inputs(seq, chunk), variants, args.rounds, args.device)
            for v in variants:
                fresh = None if args.no_peaks else fresh_peak(args, v, seq, chunk)
                rows.append(
                    {
                        "L": seq,
                        "chunk_size": chunk,
                        "variant": v,
                        "min_s": min(times[v]),
                        "median_s": statistics.median(times[v]),
                        "times_s": times[v],
                        "peak_above_inputs_gib": fresh,
                    }
                )
    for r in rows:
        ref = next(
            (x for x in rows if x["variant"] == REFERENCE and x["L"] == r["L"] and x["chunk_size"] == r["chunk_size"]),
            None,
        )
        r["time_vs_plain"] = r["median_s"] / ref["median_s"] if ref else None
        both = ref is not None and r["peak_above_inputs_gib"] is not None and ref["peak_above_inputs_gib"]
        r["peak_vs_plain"] = r["peak_above_inputs_gib"] / ref["peak_above_inputs_gib"] if ref and both else None
    print(table(rows))
    if args.json:
        opts = {
            k: (str(v) if isinstance(v, Path) else v)
            for k, v in vars(args).items()
            if k not in ("peak_of", "peak_json")
        }
        report = {
            "machine": {**info, "threads": torch.get_num_threads()},
            "options": opts,
            "batch": B,
            "vocab": V,
            "results": rows,
        }
        args.json.write_text(json.dumps(report, indent=2))
    return rows


if __name__ == "__main__":
    main()
