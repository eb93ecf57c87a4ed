#!/usr/bin/env bash
# One-command GPU smoke run (README "Scaling out", benchmarks/README.md):
#
#     bash benchmarks/gpu_smoke.sh [OUT]        # default OUT: gpu-smoke/
#
# On a machine with CUDA: (1) the embedded pair trained and scored on one GPU (SE-KD); (2) with two GPUs
# tests/test_placement.py (its cuda:0/cuda:1 tests run) and the same run with the teacher on its own GPU
# (model.teacher_device=cuda:1), else the one-line refusal of a
# teacher device this machine lacks; (3) with two or more GPUs, a 2-rank ddp run through torchrun;
# (4) benchmarks/distributed.py at the Qwen3-8B -> 1.7B shapes (random weights) for every mode the GPUs
# allow. Every record and benchmark JSON lands under OUT; a summary line per step goes to OUT/smoke.log.
# Refuses in one line (exit 2) on a machine without CUDA.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-gpu-smoke}
PY=${PYTHON:-python}
if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_smoke: needs a CUDA device, and this machine has none (torch.cuda.is_available() is False)" >&2
    exit 2
fi
GPUS=$("$PY" -c "import torch; print(torch.cuda.device_count())")
mkdir -p "$OUT"
LOG="$OUT/smoke.log"
: >"$LOG"
say() { echo "gpu_smoke: $*" | tee -a "$LOG"; }
RUN=(experiment=se_kd logging=disabled "paths.cache=$OUT/cache" train.device=cuda eval.device=cuda)

say "$GPUS CUDA device(s): $("$PY" -c "import torch; print(torch.cuda.get_device_name(0))")"
"$PY" -m sekd.train "${RUN[@]}" "paths.root=$OUT/one_gpu"
say "one GPU: $(find "$OUT/one_gpu" -name record.json | head -1)"

if [ "$GPUS" -ge 2 ]; then
    "$PY" -m pytest -q tests/test_placement.py | tee -a "$LOG"   # teacher on cuda:1 == beside the student
    "$PY" -m sekd.train "${RUN[@]}" model.teacher_device=cuda:1 "paths.root=$OUT/teacher_gpu"
    say "teacher on cuda:1: $(find "$OUT/teacher_gpu" -name record.json | head -1)"
    "$PY" -m torch.distributed.run --standalone --nproc_per_node 2 -m sekd.train "${RUN[@]}" train.distributed=ddp "paths.root=$OUT/ddp2"
    say "ddp, 2 ranks: $(find "$OUT/ddp2" -name record.json | head -1)"
else
    set +e
    line=$("$PY" -m sekd.train "${RUN[@]}" model.teacher_device=cuda:$GPUS "paths.root=$OUT/refused" 2>&1 >/dev/null)
    rc=$?
    set -e
    say "model.teacher_device=cuda:$GPUS refused (exit $rc): $line"
    [ "$rc" -eq 2 ] || exit 1
fi

"$PY" benchmarks/distributed.py --mode none --json "$OUT/bench_none.json" | tee -a "$LOG"
if [ "$GPUS" -ge 2 ]; then
    "$PY" benchmarks/distributed.py --mode placed --json "$OUT/bench_placed.json" | tee -a "$LOG"
    for mode in ddp fsdp; do
        "$PY" -m torch.distributed.run --standalone --nproc_per_node "$GPUS" benchmarks/distributed.py --mode "$mode" --json "$OUT/bench_$mode.json" \
            | tee -a "$LOG"
    done
fi
say "done: $OUT"
