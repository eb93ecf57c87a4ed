"""Time one KD training step (forward + backward + optimizer step) per flow, at a named model shape.

    python benchmarks/kd_step.py --shape tiny --steps 2 --warmup 1 --json out.json
    python benchmarks/kd_step.py --shape logit_heavy --fresh-process --threads 1 --json cpu.json
    python benchmarks/kd_step.py --shape qwen3_8b_to_1.7b --device cuda --fresh-process --json h100.json

Teacher and student are Qwen3ForCausalLM built from config alone (random weights, nothing downloads).
The student keeps float32 master weights and computes under autocast in --dtype (as sekd/loop.py);
the teacher is stored in --dtype. Optimizer: AdamW (lr 1e-5, the training loop's default; --optimizer sgd
for plain SGD). Each variant times --steps steps after --warmup; the table gives the median.

Variants (SE-KD = top_k 20% by student entropy, forward KL, lam = 1, T = 1):
  floor            both bodies, no LM head, no KD: the student backpropagates mean(h^2)
  plain_torch_full_kd  [B,L,V] logits of both models, F.kl_div of their log-softmaxes over every position:
                   what plain torch does, the reference the other variants are measured against
  dense_full_kd    [B,L,V] logits of both models, sekd.kd.objective.selective_kd_loss, policy all
  chunked_full_kd  sekd.kd.flows.chunked_kd_loss, policy all
  dense_se_kd      the dense flow, SE-KD
  selective_se_kd  the chunked flow, SE-KD: chunked entropy, selective student and teacher heads
  cache_se_kd      student only (no teacher at all), SE-KD on cached rs_kd targets (N = 64 draws
                   from synthetic teacher logits, drawn once before timing)

Peak memory: with --fresh-process each variant runs in its own process (on CPU, the child's
ru_maxrss: everything resident, bodies and optimizer included; on CUDA, max_memory_allocated).
Without it, CUDA peaks are per variant (reset_peak_memory_stats) and CPU peaks are not reported.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch.nn.functional as F  # noqa: E402

from sekd.kd.flows import auto_chunk_size, chunked_kd_loss, floor_loss  # noqa: E402
from sekd.kd.objective import IGNORE, Selector, selective_kd_loss  # noqa: E402
from sekd.selection.classes import SparseTarget  # noqa: E402
from sekd.selection.criteria import forward_kl  # noqa: E402
from sekd.selection.policies import POLICIES  # noqa: E402
from sekd.selection.signals import SIGNALS  # noqa: E402

VARIANTS = ("floor", "plain_torch_full_kd", "dense_full_kd", "chunked_full_kd", "dense_se_kd", "selective_se_kd",
            "cache_se_kd")
GIB = 2**30


@dataclass(frozen=True)
class Body:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    tied: bool


@dataclass(frozen=True)
class Shape:
    teacher: Body
    student: Body
    vocab: int
    batch: int
    seq: int
    device: str
    dtype: str


SHAPES = {
    "tiny": Shape(Body(64, 128, 2, 4, 2, 16, True), Body(32, 64, 1, 2, 1, 16, True), vocab=512, batch=2, seq=64,
                  device="cpu", dtype="float32"),
    # small bodies, Qwen3's vocabulary: the LM heads and the softmaxes dominate
    "logit_heavy": Shape(Body(128, 256, 2, 4, 2, 32, False), Body(64, 128, 2, 4, 2, 16, True), vocab=151936,
                         batch=2, seq=256, device="cpu", dtype="float32"),
    # a teacher ~5x the student's body, as Qwen3-8B is to 1.7B: what the offline cache saves
    "teacher_heavy": Shape(Body(512, 1536, 8, 8, 4, 64, False), Body(128, 384, 2, 4, 2, 32, True), vocab=32768,
                           batch=2, seq=256, device="cpu", dtype="float32"),
    # Qwen3-8B -> Qwen3-1.7B, the paper's pair (B = 2, L = 512); for a GPU
    "qwen3_8b_to_1.7b": Shape(Body(4096, 12288, 36, 32, 8, 128, False), Body(2048, 6144, 28, 16, 8, 128, True),
                              vocab=151936, batch=2, seq=512, device="cuda", dtype="bfloat16"),
}


def qwen3(body: Body, vocab: int, dtype: torch.dtype, device: str):
    """A Qwen3ForCausalLM with random weights, built on `device` in `dtype`."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(vocab_size=vocab, hidden_size=body.hidden, intermediate_size=body.intermediate,
                      num_hidden_layers=body.layers, num_attention_heads=body.heads,
                      num_key_value_heads=body.kv_heads, head_dim=body.head_dim, tie_word_embeddings=body.tied,
                      max_position_embeddings=40960, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
                      attention_dropout=0.0, use_cache=False)
    with torch.device(device):
        return Qwen3ForCausalLM._from_config(cfg, dtype=dtype)


def se_kd() -> Selector:
    return Selector(SIGNALS.get("student_entropy"), POLICIES.build("top_k", k=0.2), forward_kl)


def full_kd() -> Selector:
    return Selector(None, POLICIES.build("all"), forward_kl)


def synthetic_cache(labels: torch.Tensor, vocab: int, n_draws: int = 64, seed: int = 0) -> SparseTarget:
    """rs_kd targets (distinct ids among N draws, p~ = c/N) for every valid position, from random logits."""
    from sekd.cache.draws import rs_kd_draws, to_sparse

    g = torch.Generator().manual_seed(seed)
    P = int((labels != IGNORE).sum())
    ids, counts, offsets, start = [], [], [torch.zeros(1, dtype=torch.long)], 0
    for a in range(0, P, 64):
        z = torch.randn(min(64, P - a), vocab, generator=g) * 3.0
        i, c, o = rs_kd_draws(z, n_draws, 1.0, g)
        ids.append(i), counts.append(c), offsets.append(o[1:] + start)
        start += int(o[-1])
    ids_pad, probs, mask = to_sparse(torch.cat(ids), torch.cat(counts), torch.cat(offsets), n_draws)
    return SparseTarget(ids_pad, probs, mask).to(labels.device)


class Bench:
    """Models, batch and optimizer of one shape; `step(variant)` runs one training step."""

    def __init__(self, shape: Shape, *, batch: int, seq: int, device: str, dtype: str, optimizer: str,
                 chunk_size: int, variants: tuple[str, ...], seed: int = 0):
        torch.manual_seed(seed)
        self.shape, self.device, self.chunk_size, self.V = shape, torch.device(device), chunk_size, shape.vocab
        self.dtype = getattr(torch, dtype)
        self.student = qwen3(shape.student, self.V, torch.float32, device).train()
        self.teacher = None  # cache_se_kd alone runs without one
        if any(v != "cache_se_kd" for v in variants):
            self.teacher = qwen3(shape.teacher, self.V, self.dtype, device).eval().requires_grad_(False)
        params = [p for p in self.student.parameters() if p.requires_grad]
        self.opt = (torch.optim.AdamW(params, lr=1e-5) if optimizer == "adamw" else torch.optim.SGD(params, lr=1e-5))
        g = torch.Generator().manual_seed(seed + 1)
        self.x = torch.randint(0, self.V, (batch, seq), generator=g).to(self.device)  # [B,L]
        y = torch.full_like(self.x, IGNORE)
        y[:, :-1] = self.x[:, 1:]  # x_{t+1}; the last position has no target
        self.y = y
        self.cached = synthetic_cache(self.y.cpu(), self.V).to(self.device) if "cache_se_kd" in variants else None
        self.gen = torch.Generator().manual_seed(seed + 2)

    def autocast(self):
        on = self.dtype != torch.float32
        return torch.autocast(self.device.type, dtype=self.dtype) if on else nullcontext()

    def hidden(self, model) -> torch.Tensor:
        """Final (normed) hidden states of the body, no LM head.  [B,L,d]"""
        return model.get_decoder()(input_ids=self.x, use_cache=False).last_hidden_state

    def loss(self, variant: str) -> torch.Tensor:
        kw = dict(lam=1.0, temperature=1.0, generator=self.gen)
        with self.autocast():
            if variant == "floor":
                with torch.no_grad():
                    self.hidden(self.teacher)
                return floor_loss(self.hidden(self.student))
            if variant.startswith(("dense", "plain")):
                s_logits = self.student(input_ids=self.x, use_cache=False).logits[..., : self.V]  # [B,L,V]
                with torch.no_grad():
                    t_logits = self.teacher(input_ids=self.x, use_cache=False).logits[..., : self.V]  # [B,L,V]
                if variant == "plain_torch_full_kd":  # KL(p || q) averaged over the positions with a target
                    logq = F.log_softmax(s_logits[:, :-1].float(), -1).flatten(0, 1)  # the last has none
                    logp = F.log_softmax(t_logits[:, :-1].float(), -1).flatten(0, 1)
                    return F.kl_div(logq, logp, log_target=True, reduction="batchmean")
            else:
                h_s = self.hidden(self.student)
                h_t, head_t = None, None
                if variant != "cache_se_kd":
                    with torch.no_grad():
                        h_t, head_t = self.hidden(self.teacher), self.teacher.get_output_embeddings()
                sel = full_kd() if variant == "chunked_full_kd" else se_kd()
                out = chunked_kd_loss(h_s, self.student.get_output_embeddings(), h_t, head_t, self.y, sel,
                                      vocab=self.V, cached=self.cached if variant == "cache_se_kd" else None,
                                      chunk_size=self.chunk_size, **kw)
                return out.loss_sum / max(out.weight, 1e-12)
        out = selective_kd_loss(s_logits, t_logits, self.y, full_kd() if variant == "dense_full_kd" else se_kd(), **kw)
        return out.loss_sum / max(out.weight, 1e-12)

    def step(self, variant: str) -> float:
        """One optimizer step; wall seconds."""
        self.sync()
        t0 = time.perf_counter()
        self.loss(variant).backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.sync()
        return time.perf_counter() - t0

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def run_variant(bench: Bench, variant: str, *, steps: int, warmup: int, fresh: bool) -> dict:
    cuda = bench.device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(bench.device)
    for _ in range(warmup):
        bench.step(variant)
    times = [bench.step(variant) for _ in range(steps)]
    if cuda:
        peak = torch.cuda.max_memory_allocated(bench.device) / GIB
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB if fresh else None
    med = statistics.median(times)
    tokens = bench.x.numel()
    return {"variant": variant, "median_s": med, "step_s": times, "tokens_per_s": tokens / med, "peak_gib": peak}


def machine(device: str) -> dict:
    import transformers

    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {"cpu": cpu, "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(),
            "platform": platform.platform(), "loadavg_at_start": list(os.getloadavg())}
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def add_ratios(rows: list[dict]) -> None:
    """tokens/s relative to floor's, and memory above floor's."""
    floor = next((r for r in rows if r["variant"] == "floor"), None)
    for r in rows:
        r["ratio_to_floor"] = r["tokens_per_s"] / floor["tokens_per_s"] if floor else None
        both = floor and r["peak_gib"] is not None and floor["peak_gib"] is not None
        r["mem_above_floor_gib"] = r["peak_gib"] - floor["peak_gib"] if both else None


def table(rows: list[dict]) -> str:
    from tabulate import tabulate

    def f(x, fmt):
        return "-" if x is None else format(x, fmt)

    return tabulate([[r["variant"], f(r["median_s"], ".4f"), f(r["tokens_per_s"], ",.0f"), f(r["peak_gib"], ".3f"),
                      f(r["ratio_to_floor"], ".3f"), f(r["mem_above_floor_gib"], "+.3f")] for r in rows],
                    headers=["variant", "median step s", "tokens/s", "peak GiB", "x floor tok/s", "GiB above floor"])


def child(args, variant: str) -> dict:
    """Run one variant in a fresh interpreter; its peak memory is its own."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "one.json"
        cmd = [sys.executable, __file__, "--shape", args.shape, "--variants", variant, "--json", str(out),
               "--one-variant"] + [f"--{k.replace('_', '-')}={v}" for k, v in
                                   (("batch", args.batch), ("seq", args.seq), ("steps", args.steps),
                                    ("warmup", args.warmup), ("device", args.device), ("dtype", args.dtype),
                                    ("optimizer", args.optimizer), ("chunk_size", args.chunk_size),
                                    ("threads", args.threads)) if v is not None]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"variant {variant} failed:\n{res.stderr[-4000:]}")
        return json.loads(out.read_text())["results"][0]


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    p.add_argument("--batch", type=int, help="default: the shape's")
    p.add_argument("--seq", type=int, help="default: the shape's")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of: {', '.join(VARIANTS)}")
    p.add_argument("--device", help="default: the shape's (cuda shapes fall back to nothing: they need a GPU)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default: the shape's")
    p.add_argument("--optimizer", choices=["adamw", "sgd"], default="adamw")
    p.add_argument("--chunk-size", type=int, help="positions per LM-head chunk of the chunked flow "
                   "(default: sekd.kd.flows.auto_chunk_size: 32 MiB of float32 logits on CPU, 256 MiB on CUDA)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--fresh-process", action="store_true", help="each variant in its own process (per-variant peaks)")
    p.add_argument("--json", type=Path, help="write machine info, options and results here")
    p.add_argument("--one-variant", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> list[dict]:
    args = parse(argv)
    shape = SHAPES[args.shape]
    info = machine(args.device or shape.device)  # load average before we add to it
    args.batch, args.seq = args.batch or shape.batch, args.seq or shape.seq
    asked = args.device
    args.device, args.dtype = args.device or shape.device, args.dtype or shape.dtype
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        given = f"--device {asked}" if asked else f"--shape {args.shape} (a GPU shape)"
        print(f"kd_step: {given} needs CUDA, but this machine has no CUDA device; run it on a GPU machine, "
              "or pass --device cpu (and a smaller --batch/--seq) to run it here", file=sys.stderr)
        sys.exit(2)
    args.chunk_size = args.chunk_size or auto_chunk_size(shape.vocab, torch.device(args.device).type)
    if args.threads:
        torch.set_num_threads(args.threads)
    variants = tuple(v.strip() for v in args.variants.split(",") if v.strip())
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")

    if args.fresh_process and not args.one_variant:
        rows = [child(args, v) for v in variants]
    else:
        bench = Bench(shape, batch=args.batch, seq=args.seq, device=args.device, dtype=args.dtype,
                      optimizer=args.optimizer, chunk_size=args.chunk_size, variants=variants)
        fresh = args.one_variant
        rows = [run_variant(bench, v, steps=args.steps, warmup=args.warmup, fresh=fresh) for v in variants]
    add_ratios(rows)
    if not args.one_variant:
        print(f"shape={args.shape} B={args.batch} L={args.seq} V={shape.vocab} device={args.device} "
              f"dtype={args.dtype} optimizer={args.optimizer} chunk_size={args.chunk_size} "
              f"threads={torch.get_num_threads()} steps={args.steps} warmup={args.warmup}")
        print(table(rows))
    if args.json:
        opts = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "one_variant"}
        report = {"machine": {**info, "threads": torch.get_num_threads()}, "options": opts, "shape": asdict(shape),
                  "results": rows}
        args.json.write_text(json.dumps(report, indent=2))
    return rows


if __name__ == "__main__":
    main()
