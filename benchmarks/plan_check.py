"""The plan (`sekd-train ... --plan`, sekd/app/plan.py) against measured CPU peaks.

    python benchmarks/plan_check.py --json benchmarks/results/plan_check_cpu.json
    python benchmarks/plan_check.py --shapes tiny,embedded

For each shape, one fresh process builds a random-weight Qwen3 teacher and student (kd_step.py's `Bench`:
fp32 on CPU, AdamW), takes the loaded baseline (its resident set once models and batch exist: on CPU that
already holds both models' weights), and runs 3 training steps of the chunked flow; the measured number is
the peak resident set (Linux VmHWM) above that baseline, as kd_step.py measures. The plan predicts the same
quantity from the shapes alone (`sekd.app.plan.cpu_above_loaded`: gradients, AdamW state, the LM head's
blocks and weight-gradient buffer, activations, the teacher's forward). Target: within 20% everywhere.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from kd_step import Body  # noqa: E402

GIB = 2**30
TOLERANCE = 0.20


@dataclass(frozen=True)
class Case:
    teacher: Body
    student: Body
    vocab: int
    batch: int
    seq: int
    variant: str = "selective_se_kd"  # SE-KD: 20% of positions by student entropy (experiment=se_kd)


CASES = {
    # kd_step.py's tiny pair
    "tiny": Case(Body(64, 128, 2, 4, 2, 16, True), Body(32, 64, 1, 2, 1, 16, True), vocab=512, batch=2, seq=64),
    # the embedded pair (conf/model/embedded.yaml) at train=embedded's micro-batch 8 x 128
    "embedded": Case(Body(128, 384, 4, 4, 2, 32, True), Body(64, 192, 2, 4, 2, 16, True), vocab=2048, batch=8, seq=128),
    # Qwen3's vocabulary, small bodies: the LM heads dominate
    "logit_heavy": Case(
        Body(128, 256, 2, 4, 2, 32, False), Body(64, 128, 2, 4, 2, 16, True), vocab=151936, batch=2, seq=256
    ),
    "logit_heavy_full_kd": Case(
        Body(128, 256, 2, 4, 2, 32, False),
        Body(64, 128, 2, 4, 2, 16, True),
        vocab=151936,
        batch=2,
        seq=256,
        variant="chunked_full_kd",
    ),
    # activations dominate: a deeper, wider student, long rows; micro-batch 2 and 6
    "body_mb2": Case(
        Body(256, 768, 2, 8, 4, 32, False), Body(256, 1024, 6, 8, 4, 32, True), vocab=8192, batch=2, seq=512
    ),
    "body_mb6": Case(
        Body(256, 768, 2, 8, 4, 32, False), Body(256, 1024, 6, 8, 4, 32, True), vocab=8192, batch=6, seq=512
    ),
    # an untied student head, a wider vocabulary, more layers
    "untied_v32k": Case(
        Body(256, 768, 4, 8, 4, 32, False), Body(192, 512, 4, 6, 2, 32, False), vocab=32768, batch=4, seq=256
    ),
}


def config(body: Body, vocab: int):
    """The Qwen3Config kd_step.qwen3 builds its models from."""
    from transformers import Qwen3Config

    return Qwen3Config(
        vocab_size=vocab,
        hidden_size=body.hidden,
        intermediate_size=body.intermediate,
        num_hidden_layers=body.layers,
        num_attention_heads=body.heads,
        num_key_value_heads=body.kv_heads,
        head_dim=body.head_dim,
        tie_word_embeddings=body.tied,
        max_position_embeddings=40960,
        rope_theta=1_000_000.0,  # type: ignore[call-arg]  # 4.x's name: transformers 5's stub lists rope_parameters
        rms_norm_eps=1e-6,
        attention_dropout=0.0,
        use_cache=False,
    )


def predicted(case: Case, chunk: int) -> float:
    """The plan's peak above the loaded baseline, GiB."""
    from sekd.app.plan import Shape, cpu_above_loaded

    teacher = Shape.of_config(config(case.teacher, case.vocab), "plan_check")
    student = Shape.of_config(config(case.student, case.vocab), "plan_check")
    se_kd = case.variant == "selective_se_kd"  # top 20% by student entropy: 3 [C,V] temporaries per chunk
    return (
        cpu_above_loaded(
            teacher,
            student,
            micro_batch=case.batch,
            seq_len=case.seq,
            chunk=chunk,
            selected=0.2 if se_kd else 1.0,
            score_blocks=3 if se_kd else 0,
        )
        / GIB
    )


def measure(case: Case, chunk: int, threads: int, live: bool = True) -> dict:
    """One fresh process: its peak above the loaded baseline over 3 steps (kd_step.peak_above_baseline).
    live: glibc's mmap threshold pinned (MALLOC_MMAP_THRESHOLD_=65536), so a freed tensor leaves the
    resident set as it goes back to a GPU's caching allocator, and VmHWM is the peak of live tensors; with
    glibc's default (dynamic) threshold freed heap stays resident and VmHWM also holds what it could not
    reuse."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    if live:
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "peak.json"
        spec = json.dumps({"case": asdict(case), "chunk": chunk, "threads": threads, "out": str(out)})
        res = subprocess.run([sys.executable, __file__, "--child", spec], capture_output=True, text=True, env=env)
        if res.returncode != 0:
            raise RuntimeError(f"plan_check child failed:\n{res.stderr[-4000:]}")
        return json.loads(out.read_text())


def child(spec: str) -> None:
    import torch

    from kd_step import Bench, Shape, peak_above_baseline

    s = json.loads(spec)
    torch.set_num_threads(s["threads"])
    c = s["case"]
    case = Case(Body(**c["teacher"]), Body(**c["student"]), c["vocab"], c["batch"], c["seq"], c["variant"])
    shape = Shape(
        case.teacher, case.student, vocab=case.vocab, batch=case.batch, seq=case.seq, device="cpu", dtype="float32"
    )
    bench = Bench(
        shape,
        batch=case.batch,
        seq=case.seq,
        device="cpu",
        dtype="float32",
        optimizer="adamw",
        chunk_size=s["chunk"],
        variants=(case.variant,),
    )
    peak, base = peak_above_baseline(bench, case.variant)
    Path(s["out"]).write_text(json.dumps({"peak_above_gib": peak, "baseline_gib": base}))


def check(name: str, case: Case, threads: int = 1, default_malloc: bool = False) -> dict:
    """Predicted against measured for one case (and, with default_malloc, glibc's default allocator's peak)."""
    from sekd.kd.flows import auto_chunk_size

    chunk = auto_chunk_size(case.vocab, "cpu")
    got = measure(case, chunk, threads)
    pred = predicted(case, chunk)
    extra = {}
    if default_malloc:
        extra["measured_default_malloc_gib"] = measure(case, chunk, threads, live=False)["peak_above_gib"]
    return {
        **extra,
        "shape": name,
        "variant": case.variant,
        "vocab": case.vocab,
        "d_s": case.student.hidden,
        "layers_s": case.student.layers,
        "d_t": case.teacher.hidden,
        "layers_t": case.teacher.layers,
        "micro_batch": case.batch,
        "seq_len": case.seq,
        "chunk": chunk,
        "predicted_gib": pred,
        "measured_gib": got["peak_above_gib"],
        "baseline_gib": got["baseline_gib"],
        "ratio": pred / got["peak_above_gib"] if got["peak_above_gib"] > 0 else float("inf"),
    }


def table(rows: list[dict]) -> str:
    from tabulate import tabulate

    return tabulate(
        [
            [
                r["shape"],
                r["variant"],
                f"V={r['vocab']} d={r['d_s']} L={r['layers_s']}",
                f"{r['micro_batch']} x {r['seq_len']}",
                f"{r['predicted_gib']:.3f}",
                f"{r['measured_gib']:.3f}",
                f"{r['ratio']:.2f}",
            ]
            + ([f"{r['measured_default_malloc_gib']:.3f}"] if "measured_default_malloc_gib" in r else [])
            for r in rows
        ],
        headers=[
            "shape",
            "variant",
            "student",
            "micro-batch",
            "predicted GiB",
            "measured GiB",
            "predicted / measured",
            "measured, glibc default malloc",
        ],
    )


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default=",".join(CASES), help=f"comma-separated, of: {', '.join(CASES)}")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=Path)
    p.add_argument(
        "--default-malloc",
        action="store_true",
        help="also measure each shape under glibc's default allocator (freed heap stays resident)",
    )
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args.child)
        return []
    names = [n.strip() for n in args.shapes.split(",") if n.strip()]
    unknown = [n for n in names if n not in CASES]
    if unknown:
        raise SystemExit(f"plan_check: unknown shapes {unknown}; known: {', '.join(CASES)}")
    rows = []
    for n in names:
        rows.append(check(n, CASES[n], args.threads, args.default_malloc))
        print(
            f"{n}: predicted {rows[-1]['predicted_gib']:.3f} GiB, measured {rows[-1]['measured_gib']:.3f} GiB",
            file=sys.stderr,
        )
    print(table(rows))
    worst = max(abs(r["ratio"] - 1) for r in rows)
    print(f"worst |predicted / measured - 1| = {worst:.1%} (target {TOLERANCE:.0%})")
    if args.json:
        import platform

        import torch
        import transformers

        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                {
                    "machine": {
                        "cpu_count": os.cpu_count(),
                        "threads": args.threads,
                        "torch": torch.__version__,
                        "transformers": transformers.__version__,
                        "python": platform.python_version(),
                    },
                    "tolerance": TOLERANCE,
                    "worst_abs_error": worst,
                    "results": rows,
                },
                indent=2,
            )
            + "\n"
        )
    return rows


if __name__ == "__main__":
    main()
