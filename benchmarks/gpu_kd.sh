#!/usr/bin/env bash
# The KD loss and step benchmarks at the paper's pair on one GPU, as one prepared command (benchmarks/README.md):
#
#     bash benchmarks/gpu_kd.sh [OUT]        # default OUT: benchmarks/results/
#
# (1) benchmarks/kd_loss.py at the Qwen3-8B -> 1.7B hidden sizes and vocabulary (B = 2, L = 512, bf16 inputs):
# plain torch, TRL (where installed) and sekd's losses, interleaved, peaks per fresh process; (2)
# benchmarks/kd_step.py --shape qwen3_8b_to_1.7b: every variant's training step with random-weight Qwen3-8B and
# Qwen3-1.7B (the floor, the plain torch reference, the cache build against the teacher's bare forward).
# JSON lands in OUT as kd_loss_qwen3_gpu.json and kd_step_qwen3_gpu.json. Refuses in one line (exit 2)
# on a machine without CUDA.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-benchmarks/results}
PY=${PYTHON:-python}
if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_kd: needs a CUDA device, and this machine has none (torch.cuda.is_available() is False)" >&2
    exit 2
fi
mkdir -p "$OUT"
"$PY" benchmarks/kd_loss.py --shape qwen3_8b_to_1.7b --device cuda --rounds 5 --json "$OUT/kd_loss_qwen3_gpu.json"
"$PY" benchmarks/kd_step.py --shape qwen3_8b_to_1.7b --device cuda --rounds 3 --fresh-process \
    --json "$OUT/kd_step_qwen3_gpu.json"
