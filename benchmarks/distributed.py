"""Tokens/s and peak memory per device of one selective SE-KD training step, per way of spanning devices.

    python benchmarks/distributed.py --shape tiny --device cpu --json tiny.json                # here, one process
    torchrun --nproc_per_node 2 benchmarks/distributed.py --mode ddp --shape tiny --device cpu  # 2 CPU ranks, gloo
    python benchmarks/distributed.py --mode none --json none.json                               # one GPU
    python benchmarks/distributed.py --mode placed --json placed.json                           # teacher on cuda:1
    torchrun --nproc_per_node 8 benchmarks/distributed.py --mode ddp --json ddp.json            # a GPU node
    torchrun --nproc_per_node 8 benchmarks/distributed.py --mode fsdp --json fsdp.json

The step is kd_step.py's `selective_se_kd` (chunked flow, top_k 20% by student entropy, forward KL) at a
kd_step.py shape, default the paper's pair (Qwen3-8B -> Qwen3-1.7B, random weights, nothing downloads),
with --batch sequences per rank (train.micro_batch_size is per rank). Modes:
  none    one process, teacher and student on one device
  placed  one process, the teacher on --teacher-device (sekd.models.loading.PlacedTeacher: its hidden states move to
          the student's device, a copy of its head runs there)
  ddp     every rank holds the student and a frozen teacher replica; gradients are summed across ranks
          (all_reduce), as the training loop does
  fsdp    sharded exactly as train.distributed=fsdp trains (sekd.distributed.fsdp's shard_teacher / shard_student): the
          teacher's decoder layers and decoder (embeddings, norm) resharded after each forward, its head
          replicated; the student's decoder layers, then its root unit, the module whose forward is the whole
          loss (sekd.training.trainer.StudentLoss), holding the embeddings, norm and head; gradients summed (reduce-scatter);
          bf16 layers gathered in bf16, reduced in float32; --fsdp-mesh is train.fsdp.mesh (flat | hybrid | RxS)

Tokens/s per device: the step's tokens over all ranks / the median step time / the devices used (every
rank's; `placed` uses two). Peak memory per device: torch.cuda.max_memory_allocated on each rank (on CPU,
each process's ru_maxrss). Under fsdp each rank also reports, after the timed steps, how much of the student
and of the teacher's decoder it holds (`sharding`: parameters that are sharded DTensors, and the fraction
of their elements held locally). Rank 0 prints the table and writes --json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from typing import Any
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT.parent))

from kd_step import GIB, SHAPES, machine, qwen3, se_kd  # noqa: E402

from sekd.kd.flows import auto_chunk_size  # noqa: E402
from sekd.kd.objective import IGNORE, LossInputs  # noqa: E402
from sekd.training.trainer import StudentLoss  # noqa: E402

MODES = ("none", "placed", "ddp", "fsdp")
LAUNCHED = ("ddp", "fsdp")  # the modes whose ranks torchrun starts


def refuse(message: str) -> None:
    print(f"distributed: {message}", file=sys.stderr)
    sys.exit(2)


def check(args) -> None:
    """One line and exit 2 for what this machine or launch cannot run, before any model is built."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.device(args.device).type == "cuda"
    if cuda and not torch.cuda.is_available():
        given = f"--device {args.asked}" if args.asked else f"--shape {args.shape} (a GPU shape)"
        refuse(
            f"{given} needs CUDA, but this machine has no CUDA device; run it on a GPU node, or pass "
            "--shape tiny --device cpu to run it here"
        )
    if args.mode in LAUNCHED and "RANK" not in os.environ:
        refuse(
            f"--mode {args.mode} needs the ranks torchrun starts: torchrun --nproc_per_node N "
            f"benchmarks/distributed.py --mode {args.mode} ..."
        )
    if args.mode not in LAUNCHED and world > 1:
        refuse(f"--mode {args.mode} runs one process, but this is one of {world} ranks; use --mode ddp or fsdp")
    if args.mode == "fsdp":
        from sekd.distributed.fsdp import fsdp_support

        why = fsdp_support(torch.__version__)
        if why:
            refuse(why)
    if args.mode == "fsdp" and world < 2:
        refuse("--mode fsdp shards over ranks: start at least 2 (torchrun --nproc_per_node 2 or more)")
    if cuda and args.mode in LAUNCHED and torch.cuda.device_count() < int(os.environ.get("LOCAL_WORLD_SIZE", world)):
        refuse(
            f"{os.environ.get('LOCAL_WORLD_SIZE', world)} ranks on this node but {torch.cuda.device_count()} "
            "CUDA device(s): one rank per GPU"
        )
    if args.mode == "placed":
        teacher = torch.device(args.teacher_device)
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if teacher.type == "cuda" and (teacher.index or 0) >= gpus:
            refuse(
                f"--teacher-device {args.teacher_device}: this machine has {gpus} CUDA "
                "device(s); --mode placed needs two (or --teacher-device cpu)"
            )


def join(args) -> tuple[int, int, torch.device]:
    """(rank, world size, this rank's device): the process group for ddp / fsdp (nccl on CUDA, gloo on CPU)."""
    device = torch.device(args.device)
    if args.mode not in LAUNCHED:
        return 0, 1, device
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def held(params) -> dict:
    """How much of `params` this rank holds: how many are sharded DTensors, and the fraction of all their
    elements stored locally (1.0: every weight whole on every rank)."""
    from torch.distributed.tensor import DTensor

    params = list(params)
    local = sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in params)
    return {
        "params": len(params),
        "sharded": sum(isinstance(p, DTensor) for p in params),
        "local_fraction": local / max(1, sum(p.numel() for p in params)),
    }


class Step:
    """The models, batch and optimizer of one rank; `run()` is one training step, timed."""

    def __init__(self, args, shape, rank: int, device: torch.device):
        torch.manual_seed(0)  # every rank builds the same weights, as rank 0's broadcast would give
        self.args, self.device, self.V = args, device, shape.vocab
        self.dtype = getattr(torch, args.dtype)
        teacher_device = torch.device(args.teacher_device) if args.mode == "placed" else device
        self.student = qwen3(shape.student, self.V, torch.float32, str(device)).train()
        self.teacher = qwen3(shape.teacher, self.V, self.dtype, str(teacher_device)).eval().requires_grad_(False)
        self.chunk = auto_chunk_size(self.V, device.type)
        # the student's per-micro-batch loss as one module (the training loop's): under fsdp, the root unit
        self.objective = StudentLoss(self.student, vocab=self.V, chunk_size=self.chunk, flow="chunked")
        self.sel = se_kd()
        self.sync_params = []
        if args.mode == "fsdp":  # as the Trainer shards: the teacher first, then the student (summed gradients)
            from sekd.distributed.fsdp import shard_student, shard_teacher

            shard_teacher(self.teacher, device, dtype=self.dtype, mesh=args.fsdp_mesh)
            shard_student(self.objective, self.student, device, dtype=self.dtype, mesh=args.fsdp_mesh)
        elif args.mode == "ddp":
            self.sync_params = [p for p in self.student.parameters() if p.requires_grad]
        if args.mode == "placed":
            from sekd.models.loading import PlacedTeacher

            self.teacher = PlacedTeacher(self.teacher, device)
        params = [p for p in self.student.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(params, lr=1e-5)
        g = torch.Generator().manual_seed(1 + rank)  # each rank its own slice of the global batch
        self.x = torch.randint(0, self.V, (args.batch, args.seq), generator=g).to(device)  # [B,L]
        self.y = torch.full_like(self.x, IGNORE)
        self.y[:, :-1] = self.x[:, 1:]
        self.gen = torch.Generator().manual_seed(2)

    def loss(self) -> torch.Tensor:
        on = self.dtype != torch.float32
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=on):
            with torch.no_grad():  # the teacher outside the student's loss module, as in training
                h_t = self.teacher.get_decoder()(input_ids=self.x, use_cache=False).last_hidden_state  # [B,L,d_t]
            loss_sum, out = self.objective(
                self.x,
                self.y,
                h_t,
                self.teacher.get_output_embeddings(),
                LossInputs(self.sel, lam=1.0, temperature=1.0, generator=self.gen),
            )
        return loss_sum / max(out.weight, 1e-12)

    def run(self) -> float:
        self.sync()
        t0 = time.perf_counter()
        self.loss().backward()
        # ddp: every gradient (fsdp reduce-scattered them in the backward)
        for p in self.sync_params:
            if p.grad is not None:
                dist.all_reduce(p.grad)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.sync()
        return time.perf_counter() - t0

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        if self.args.mode in LAUNCHED:
            dist.barrier()  # a step ends when the slowest rank's does


def peak_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / GIB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB  # Linux reports KiB


def measure(args) -> dict | None:
    """Every rank steps; rank 0 returns the report (None on the others)."""
    shape = SHAPES[args.shape]
    rank, world, device = join(args)
    try:
        step = Step(args, shape, rank, device)
        for _ in range(args.warmup):
            step.run()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times = [step.run() for _ in range(args.steps)]
        mine: dict[str, Any] = {
            "rank": rank,
            "device": str(device),
            "median_s": statistics.median(times),
            "step_s": times,
            "peak_gib": peak_gib(device),
        }
        if args.mode == "fsdp":  # after the steps: what stays sharded (the teacher's layers too)
            mine["sharding"] = {
                "student": held(step.student.parameters()),
                "teacher_decoder": held(step.teacher.get_decoder().parameters()),
            }
        if args.mode == "placed":
            mine["teacher_device"] = args.teacher_device
            mine["teacher_peak_gib"] = peak_gib(torch.device(args.teacher_device))
        ranks: list[Any] = [mine]
        if world > 1:
            ranks = [None] * world  # all_gather_object fills in every rank's
            dist.all_gather_object(ranks, mine)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if rank != 0:
        return None
    devices = world * (2 if args.mode == "placed" and args.teacher_device != str(device) else 1)
    slowest = max(r["median_s"] for r in ranks)
    tokens = args.batch * args.seq * world
    summary = {
        "mode": args.mode,
        "world_size": world,
        "devices": devices,
        "tokens_per_step": tokens,
        "median_step_s": slowest,
        "tokens_per_s": tokens / slowest,
        "tokens_per_s_per_device": tokens / slowest / devices,
        "peak_gib_per_device": max(r["peak_gib"] for r in ranks),
    }
    return {"summary": summary, "ranks": ranks}


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", choices=MODES, default="none")
    p.add_argument("--shape", choices=sorted(SHAPES), default="qwen3_8b_to_1.7b")
    p.add_argument("--batch", type=int, help="sequences per rank (default: the shape's)")
    p.add_argument("--seq", type=int, help="default: the shape's")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", help="cpu or cuda (default: the shape's; ranks take cuda:LOCAL_RANK)")
    p.add_argument(
        "--dtype", choices=["float32", "bfloat16"], help="the teacher's and autocast's (default: the shape's)"
    )
    p.add_argument(
        "--fsdp-mesh", default="flat", help="--mode fsdp: train.fsdp.mesh, flat | hybrid | RxS (default: flat)"
    )
    p.add_argument("--teacher-device", default="cuda:1", help="--mode placed: the teacher's device (default: cuda:1)")
    p.add_argument("--threads", type=int, help="torch CPU threads per process (default: torch's)")
    p.add_argument("--json", type=Path, help="rank 0 writes machine info, options and results here")
    return p.parse_args(argv)


def main(argv=None) -> dict | None:
    args = parse(argv)
    shape = SHAPES[args.shape]
    args.asked = args.device
    args.device, args.dtype = args.device or shape.device, args.dtype or shape.dtype
    args.batch, args.seq = args.batch or shape.batch, args.seq or shape.seq
    check(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    info = machine(args.device)
    report = measure(args)
    if report is None:
        return None
    s = report["summary"]
    print(
        f"mode={s['mode']} shape={args.shape} world_size={s['world_size']} devices={s['devices']} "
        f"B/rank={args.batch} L={args.seq} dtype={args.dtype}: {s['tokens_per_s_per_device']:,.0f} tokens/s per "
        f"device, median step {s['median_step_s']:.4f} s, peak {s['peak_gib_per_device']:.3f} GiB per device"
    )
    if args.json:
        opts = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "asked"}
        args.json.write_text(json.dumps({"machine": info, "options": opts, **report}, indent=2))
    return report


if __name__ == "__main__":
    main()
