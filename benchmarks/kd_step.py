"""Time one KD training step (forward + backward + optimizer step) per flow, at a named model shape.

    python benchmarks/kd_step.py --shape tiny --rounds 2 --json out.json
    python benchmarks/kd_step.py --shape logit_heavy --threads 1 --fresh-process --json cpu.json
    python benchmarks/kd_step.py --shape qwen3_8b_to_1.7b --device cuda --fresh-process --json gpu.json

Teacher and student are Qwen3ForCausalLM built from config alone (random weights, nothing downloads).
The student keeps float32 master weights and computes under autocast in --dtype (as sekd/training/trainer.py);
the teacher is stored in --dtype. Optimizer: AdamW (lr 1e-5, the training loop's default; --optimizer sgd
for plain SGD).

Variants (SE-KD = top_k 20% by student entropy, forward KL, lam = 1, T = 1):
  floor            both bodies, no LM head, no KD: the student backpropagates mean(h^2)
  plain_torch_full_kd  [B,L,V] logits of both models, F.kl_div of their log-softmaxes over every position:
                   what plain torch does, the reference the other variants are measured against
  trl_gkd_full_kd  TRL's GKDTrainer.generalized_jsd_loss (beta = 0) on both [B,L,V] logits   (the `bench` extra)
  trl_chunked_full_kd  TRL's chunked divergence from both bodies' hidden states and heads     (the `bench` extra)
  dense_full_kd    [B,L,V] logits of both models, sekd.kd.objective.selective_kd_loss, policy all
  chunked_full_kd  sekd.kd.flows.chunked_kd_loss, policy all
  dense_se_kd      the dense flow, SE-KD
  selective_se_kd  the chunked flow, SE-KD: chunked entropy, selective student and teacher heads
  cache_se_kd      student only (no teacher at all), SE-KD on rs_kd targets read each step from a real
                   teacher cache folder (N = 64 draws; built once, before timing, by sekd.stores.teacher_cache.build)
  teacher_forward  no training: the teacher's forward with its full head, [B,L,V] logits (no grad)
  cache_build      no training: what building the cache does per batch (sekd.stores.teacher_cache.build.shard_bytes: the
                   teacher's forward, N = 64 draws per position, the encoded shard); x teacher_forward tok/s

Time: --rounds rounds after one warm-up round, every variant once per round in turn, in one process (so
what slows the machine slows every variant alike); the table gives min and median step seconds.
Peak memory (--fresh-process): each variant again in its own process, its peak above the baseline of that
process once models, batch and cache are made (CPU: Linux VmHWM reset at the baseline, so nothing of the
parent's or of the loading counts; CUDA: max_memory_allocated above memory_allocated).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from reference_losses import floor_loss, plain_full_kd  # noqa: E402
from sekd.kd.flows import auto_chunk_size, chunked_kd_loss  # noqa: E402
from sekd.kd.objective import IGNORE, LossInputs, Selector, selective_kd_loss  # noqa: E402
from sekd.selection.classes import SparseTarget  # noqa: E402
from sekd.selection.criteria import forward_kl  # noqa: E402
from sekd.selection.policies import POLICIES  # noqa: E402
from sekd.selection.signals import SIGNALS  # noqa: E402

VARIANTS = (
    "floor",
    "plain_torch_full_kd",
    "trl_gkd_full_kd",
    "trl_chunked_full_kd",
    "dense_full_kd",
    "chunked_full_kd",
    "dense_se_kd",
    "selective_se_kd",
    "cache_se_kd",
    "teacher_forward",
    "cache_build",
)
NEEDS_TRL = ("trl_gkd_full_kd", "trl_chunked_full_kd")
NO_GRAD = ("teacher_forward", "cache_build")  # no training step: the teacher's work alone
N_DRAWS = 64
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
    "tiny": Shape(
        Body(64, 128, 2, 4, 2, 16, True),
        Body(32, 64, 1, 2, 1, 16, True),
        vocab=512,
        batch=2,
        seq=64,
        device="cpu",
        dtype="float32",
    ),
    # small bodies, Qwen3's vocabulary: the LM heads and the softmaxes dominate
    "logit_heavy": Shape(
        Body(128, 256, 2, 4, 2, 32, False),
        Body(64, 128, 2, 4, 2, 16, True),
        vocab=151936,
        batch=2,
        seq=256,
        device="cpu",
        dtype="float32",
    ),
    # a teacher ~5x the student's body, as Qwen3-8B is to 1.7B: what the offline cache saves
    "teacher_heavy": Shape(
        Body(512, 1536, 8, 8, 4, 64, False),
        Body(128, 384, 2, 4, 2, 32, True),
        vocab=32768,
        batch=2,
        seq=256,
        device="cpu",
        dtype="float32",
    ),
    # Qwen3-8B -> Qwen3-1.7B, the paper's pair (B = 2, L = 512); for a GPU
    "qwen3_8b_to_1.7b": Shape(
        Body(4096, 12288, 36, 32, 8, 128, False),
        Body(2048, 6144, 28, 16, 8, 128, True),
        vocab=151936,
        batch=2,
        seq=512,
        device="cuda",
        dtype="bfloat16",
    ),
}


def qwen3(body: Body, vocab: int, dtype: torch.dtype, device: str):
    """A Qwen3ForCausalLM with random weights, built on `device` in `dtype`."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    # rope_theta: transformers 4 takes it by name, 5 folds it into rope_parameters (its signature lacks it)
    cfg = Qwen3Config(  # type: ignore[call-arg]
        vocab_size=vocab,
        hidden_size=body.hidden,
        intermediate_size=body.intermediate,
        num_hidden_layers=body.layers,
        num_attention_heads=body.heads,
        num_key_value_heads=body.kv_heads,
        head_dim=body.head_dim,
        tie_word_embeddings=body.tied,
        max_position_embeddings=40960,
        rope_theta=1_000_000.0,
        rms_norm_eps=1e-6,
        attention_dropout=0.0,
        use_cache=False,
    )
    with torch.device(device):
        return Qwen3ForCausalLM._from_config(cfg, dtype=dtype)


def se_kd() -> Selector:
    return Selector.of(SIGNALS.get("student_entropy"), POLICIES.build("top_k", k=0.2), forward_kl)


def full_kd() -> Selector:
    return Selector.of(None, POLICIES.build("all"), forward_kl)


def have_trl() -> bool:
    try:
        import trl  # noqa: F401
    except ImportError:
        return False
    return True


def sample_ids(n: int) -> list[str]:
    """The batch rows' sample ids (16 hex characters, as sekd.data.packing makes them)."""
    return [f"{i:016x}" for i in range(n)]


def build_teacher_cache(teacher, x: torch.Tensor, y: torch.Tensor, vocab: int, out: Path) -> Path:
    """A real teacher cache folder of the batch's rows, as `sekd-cache` builds it."""
    from sekd.stores.teacher_cache.build import build_cache
    from sekd.data.packing import PackedData

    data = PackedData(x.cpu(), y.cpu(), sample_ids(x.shape[0]))
    build_cache(
        teacher,
        data,
        out,
        teacher_name="random-qwen3",
        tokenizer_sig="none",
        n_draws=N_DRAWS,
        num_shards=1,
        batch_size=x.shape[0],
        device=x.device,
        vocab_size=vocab,
        progress=False,
    )
    return out


class Bench:
    """Models, batch and optimizer of one shape; `step(variant)` runs one training step."""

    def __init__(
        self,
        shape: Shape,
        *,
        batch: int,
        seq: int,
        device: str,
        dtype: str,
        optimizer: str,
        chunk_size: int,
        variants: tuple[str, ...],
        seed: int = 0,
        artifacts_dir: Path | None = None,
    ):
        torch.manual_seed(seed)
        self.shape, self.device, self.chunk_size, self.V = shape, torch.device(device), chunk_size, shape.vocab
        self.dtype = getattr(torch, dtype)
        self.student = qwen3(shape.student, self.V, torch.float32, device).train()
        g = torch.Generator().manual_seed(seed + 1)
        self.x = torch.randint(0, self.V, (batch, seq), generator=g).to(self.device)  # [B,L]
        y = torch.full_like(self.x, IGNORE)
        y[:, :-1] = self.x[:, 1:]  # x_{t+1}; the last position has no target
        self.y = y
        self.teacher = None  # cache_se_kd alone runs without one
        needs_cache = "cache_se_kd" in variants and artifacts_dir is None
        if needs_cache or any(v != "cache_se_kd" for v in variants):
            self.teacher = qwen3(shape.teacher, self.V, self.dtype, device).eval().requires_grad_(False)
        self.cache = None
        if "cache_se_kd" in variants:
            from sekd.stores.teacher_cache.store import TeacherCache

            if artifacts_dir is None:
                self._tmp = tempfile.TemporaryDirectory()
                artifacts_dir = build_teacher_cache(
                    self.teacher, self.x, self.y, self.V, Path(self._tmp.name) / "cache"
                )
            self.cache = TeacherCache.open(artifacts_dir)
            if all(v == "cache_se_kd" for v in variants):
                self.teacher = None
        params = [p for p in self.student.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(params, lr=1e-5) if optimizer == "adamw" else torch.optim.SGD(params, lr=1e-5)
        self.sample_ids = sample_ids(batch)
        self.gen = torch.Generator().manual_seed(seed + 2)

    def autocast(self):
        on = self.dtype != torch.float32
        return torch.autocast(self.device.type, dtype=self.dtype) if on else nullcontext()

    def hidden(self, model) -> torch.Tensor:
        """Final (normed) hidden states of the body, no LM head.  [B,L,d]"""
        return model.get_decoder()(input_ids=self.x, use_cache=False).last_hidden_state

    def loss(self, variant: str) -> torch.Tensor:
        with self.autocast():
            if variant == "floor":
                with torch.no_grad():
                    self.hidden(self.teacher)
                return floor_loss(self.hidden(self.student))
            if variant.startswith(("dense", "plain", "trl_gkd")):
                return self.logits_loss(variant)
            if variant == "trl_chunked_full_kd":
                return self.trl_chunked_loss()
            return self.chunked_loss(variant)

    def inputs(self, variant: str, cached: SparseTarget | None = None) -> LossInputs:
        sel = full_kd() if variant.endswith("full_kd") else se_kd()
        return LossInputs(sel, lam=1.0, temperature=1.0, generator=self.gen, cached=cached)

    def the_teacher(self):
        if self.teacher is None:
            raise ValueError("this variant runs the teacher, which cache_se_kd alone leaves out")
        return self.teacher

    def logits_loss(self, variant: str) -> torch.Tensor:
        """The variants on both models' [B,L,V] logits."""
        s_logits = self.student(input_ids=self.x, use_cache=False).logits[..., : self.V]  # [B,L,V]
        with torch.no_grad():
            t_logits = self.the_teacher()(input_ids=self.x, use_cache=False).logits[..., : self.V]  # [B,L,V]
        if variant == "plain_torch_full_kd":
            return plain_full_kd(s_logits, t_logits)
        if variant == "trl_gkd_full_kd":
            from trl.experimental.gkd import GKDTrainer

            return GKDTrainer.generalized_jsd_loss(s_logits.float(), t_logits.float(), labels=self.y, beta=0.0)
        out = selective_kd_loss(s_logits, t_logits, self.y, self.inputs(variant))
        return out.loss_sum / max(out.weight, 1e-12)

    def trl_chunked_loss(self) -> torch.Tensor:
        from trl.trainer.distillation_trainer import _chunked_divergence_loss

        h_s = self.hidden(self.student)
        with torch.no_grad():
            h_t = self.hidden(self.teacher)
        W_s, W_t = self.student.get_output_embeddings().weight, self.the_teacher().get_output_embeddings().weight
        loss, _, _ = _chunked_divergence_loss(
            h_s, h_t, W_s[: self.V], W_t[: self.V], (self.y != IGNORE).long(), beta=0.0
        )
        return loss

    def chunked_loss(self, variant: str) -> torch.Tensor:
        """The chunked flow from the bodies' hidden states; cache_se_kd with no teacher, its targets read from the
        cache folder every step, as the training loop does."""
        h_s = self.hidden(self.student)
        h_t, head_t, cached = None, None, None
        if self.cache is not None and variant == "cache_se_kd":
            cached = self.cache.targets(self.sample_ids, self.y.cpu()).to(self.device)
        elif self.teacher is not None:
            with torch.no_grad():
                h_t, head_t = self.hidden(self.teacher), self.teacher.get_output_embeddings()
        head_s = self.student.get_output_embeddings()
        out = chunked_kd_loss(
            h_s, head_s, h_t, head_t, self.y, self.inputs(variant, cached), vocab=self.V, chunk_size=self.chunk_size
        )
        return out.loss_sum / max(out.weight, 1e-12)

    @torch.no_grad()
    def teacher_work(self, variant: str) -> None:
        """teacher_forward: the teacher's logits with its full head; cache_build: the cache's work per batch."""
        with self.autocast():
            if variant == "teacher_forward":
                self.the_teacher()(input_ids=self.x, use_cache=False).logits[..., : self.V].float().sum().item()
                return
        from sekd.stores.teacher_cache.build import shard_bytes
        from sekd.stores.teacher_cache.kinds import cache_kind
        from sekd.data.packing import PackedData

        data = PackedData(self.x.cpu(), self.y.cpu(), self.sample_ids)
        shard_bytes(
            self.teacher,
            data,
            list(range(len(self.sample_ids))),
            kinds=[cache_kind("rs_kd", {"n_draws": N_DRAWS})],
            temperature=1.0,
            seed=0,
            vocab_size=self.V,
            batch_size=len(self.sample_ids),
            device=self.device,
        )

    def step(self, variant: str) -> float:
        """One optimizer step (or the teacher's work alone); wall seconds."""
        self.sync()
        t0 = time.perf_counter()
        if variant in NO_GRAD:
            self.teacher_work(variant)
        else:
            self.loss(variant).backward()
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        self.sync()
        return time.perf_counter() - t0

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def time_rounds(bench: Bench, variants: tuple[str, ...], *, rounds: int) -> dict[str, list[float]]:
    """Every variant once per round, in turn, after one warm-up round.  variant -> step seconds per round"""
    from tqdm import tqdm

    for v in variants:
        bench.step(v)
    times: dict[str, list[float]] = {v: [] for v in variants}
    for _ in tqdm(range(rounds), desc="rounds", leave=False, file=sys.stderr):
        for v in variants:
            times[v].append(bench.step(v))
    return times


def _status_bytes(key: str) -> int:
    """A field of /proc/self/status (Linux), in bytes."""
    found = re.search(rf"^{key}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    if found is None:
        raise RuntimeError(f"/proc/self/status has no {key}")
    return int(found.group(1)) * 1024


def peak_above_baseline(bench: Bench, variant: str, steps: int = 3) -> tuple[float, float]:
    """(peak GiB above the baseline, the baseline GiB) of `steps` steps of `variant`, in this process: the
    baseline is what the models, batch and cache hold before the first step."""
    if bench.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(bench.device)
        base = torch.cuda.memory_allocated(bench.device)
        for _ in range(steps):
            bench.step(variant)
        return (torch.cuda.max_memory_allocated(bench.device) - base) / GIB, base / GIB
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS: the peak from here on
    base = _status_bytes("VmRSS")
    for _ in range(steps):
        bench.step(variant)
    return (_status_bytes("VmHWM") - base) / GIB, base / GIB


def machine(device: str) -> dict:
    import transformers

    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "loadavg_at_start": list(os.getloadavg()),
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def add_ratios(rows: list[dict]) -> None:
    """Time relative to plain torch's; tokens/s relative to the floor's; cache_build's to teacher_forward's."""
    by = {r["variant"]: r for r in rows}
    for r in rows:
        ref = by.get("teacher_forward" if r["variant"] in NO_GRAD else "plain_torch_full_kd")
        r["time_vs_plain"] = r["median_s"] / ref["median_s"] if ref and r["variant"] not in NO_GRAD else None
        r["ratio_to_floor"] = r["tokens_per_s"] / by["floor"]["tokens_per_s"] if "floor" in by else None
        if r["variant"] == "cache_build" and ref:
            r["vs_teacher_forward"] = r["tokens_per_s"] / ref["tokens_per_s"]


def table(rows: list[dict]) -> str:
    from tabulate import tabulate

    def f(x, fmt):
        return "-" if x is None else format(x, fmt)

    return tabulate(
        [
            [
                r["variant"],
                f(r["min_s"], ".4f"),
                f(r["median_s"], ".4f"),
                f(r["tokens_per_s"], ",.0f"),
                f(r["time_vs_plain"], ".2f"),
                f(r["ratio_to_floor"], ".3f"),
                f(r.get("peak_above_gib"), ".3f"),
            ]
            for r in rows
        ],
        headers=[
            "variant",
            "min step s",
            "median step s",
            "tokens/s",
            "x plain time",
            "x floor tok/s",
            "GiB above baseline",
        ],
    )


def child_peak(args, variant: str, artifacts_dir: Path | None) -> tuple[float, float]:
    """`variant`'s peak above its baseline, in a fresh interpreter (nothing carried over from this one)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "peak.json"
        cmd = [sys.executable, __file__, "--shape", args.shape, "--variants", variant, "--peak-json", str(out)]
        cmd += [
            f"--{k.replace('_', '-')}={v}"
            for k, v in (
                ("batch", args.batch),
                ("seq", args.seq),
                ("device", args.device),
                ("dtype", args.dtype),
                ("optimizer", args.optimizer),
                ("chunk_size", args.chunk_size),
                ("threads", args.threads),
                ("artifacts_dir", artifacts_dir),
            )
            if v is not None
        ]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"variant {variant} failed:\n{res.stderr[-4000:]}")
        got = json.loads(out.read_text())
        return got["peak_above_gib"], got["baseline_gib"]


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    p.add_argument("--batch", type=int, help="default: the shape's")
    p.add_argument("--seq", type=int, help="default: the shape's")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds (after one warm-up round)")
    p.add_argument(
        "--variants",
        default=None,
        help=f"comma-separated, of: {', '.join(VARIANTS)} (default: all; TRL's where trl is installed)",
    )
    p.add_argument("--device", help="default: the shape's (cuda shapes fall back to nothing: they need a GPU)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default: the shape's")
    p.add_argument("--optimizer", choices=["adamw", "sgd"], default="adamw")
    p.add_argument(
        "--chunk-size",
        type=int,
        help="positions per LM-head chunk of the chunked flow "
        "(default: sekd.kd.flows.auto_chunk_size: 32 MiB of float32 logits on CPU, 256 MiB on CUDA)",
    )
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument(
        "--fresh-process", action="store_true", help="also each variant's peak memory, each in its own process"
    )
    p.add_argument("--json", type=Path, help="write machine info, options and results here")
    p.add_argument("--artifacts-dir", type=Path, help=argparse.SUPPRESS)  # a built cache for cache_se_kd
    p.add_argument("--peak-json", type=Path, help=argparse.SUPPRESS)  # child_peak's child
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
        print(
            f"kd_step: {given} needs CUDA, but this machine has no CUDA device; run it on a GPU machine, "
            "or pass --device cpu (and a smaller --batch/--seq) to run it here",
            file=sys.stderr,
        )
        sys.exit(2)
    args.chunk_size = args.chunk_size or auto_chunk_size(shape.vocab, torch.device(args.device).type)
    if args.threads:
        torch.set_num_threads(args.threads)
    variants = (
        tuple(v.strip() for v in args.variants.split(",") if v.strip())
        if args.variants
        else tuple(v for v in VARIANTS if v not in NEEDS_TRL or have_trl())
    )
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"kd_step: unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    if any(v in NEEDS_TRL for v in variants) and not have_trl():
        raise SystemExit("kd_step: the TRL variants need trl: pip install -e '.[bench]'")
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    if any(v in NEEDS_TRL for v in variants):  # imported now: trl's import is neither a step's time nor its memory
        import trl.experimental.gkd, trl.trainer.distillation_trainer  # noqa: E401, F401

    bench = Bench(
        shape,
        batch=args.batch,
        seq=args.seq,
        device=args.device,
        dtype=args.dtype,
        optimizer=args.optimizer,
        chunk_size=args.chunk_size,
        variants=variants,
        artifacts_dir=args.artifacts_dir,
    )
    if args.peak_json:  # the child of child_peak
        peak, base = peak_above_baseline(bench, variants[0])
        args.peak_json.write_text(json.dumps({"peak_above_gib": peak, "baseline_gib": base}))
        return []
    times = time_rounds(bench, variants, rounds=args.rounds)
    tokens = bench.x.numel()
    rows: list[dict[str, Any]] = [
        {
            "variant": v,
            "min_s": min(times[v]),
            "median_s": statistics.median(times[v]),
            "step_s": times[v],
            "tokens_per_s": tokens / statistics.median(times[v]),
        }
        for v in variants
    ]
    if args.fresh_process:
        artifacts_dir = Path(bench.cache.root) if bench.cache is not None else None
        for r in rows:
            r["peak_above_gib"], r["baseline_gib"] = child_peak(args, r["variant"], artifacts_dir)
    add_ratios(rows)
    print(
        f"shape={args.shape} B={args.batch} L={args.seq} V={shape.vocab} device={args.device} "
        f"dtype={args.dtype} optimizer={args.optimizer} chunk_size={args.chunk_size} "
        f"threads={torch.get_num_threads()} rounds={args.rounds}"
    )
    print(table(rows))
    if args.json:
        opts = {
            k: (str(v) if isinstance(v, Path) else v)
            for k, v in vars(args).items()
            if k not in ("peak_json", "artifacts_dir")
        }
        report = {
            "machine": {**info, "threads": torch.get_num_threads()},
            "options": opts,
            "shape": asdict(shape),
            "results": rows,
        }
        args.json.write_text(json.dumps(report, indent=2))
    return rows


if __name__ == "__main__":
    main()
