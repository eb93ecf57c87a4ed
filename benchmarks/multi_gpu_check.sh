#!/usr/bin/env bash
# The checks only two or more cards can make, for a user with them (benchmarks/README.md, "On a borrowed
# GPU"); one PASS or FAIL line per item, and multi_gpu_check.json in OUT (default multi-gpu-check/):
#
#     bash benchmarks/multi_gpu_check.sh [OUT]
#
#   scoring   2 ranks (torchrun, nccl) train the embedded SE-KD run and rank 0 scores it: the run ends (no
#             hang at lm-eval's first gather), the record is written and lm-eval saw one process.
#   ddp_fp32  2 ranks x micro-batch 2 end with the weights of 1 process x micro-batch 4 within 1e-5, in fp32
#             (train.precision=fp32: the bound holds in fp32 only; docs/method.md §9).
#   fsdp_fp32 the same under train.distributed=fsdp.
#   fsdp_peak benchmarks/distributed.py at the paper's shapes: fsdp's peak per card is below ddp's (the
#             teacher and the student stay sharded; ddp holds both whole on every card).
#   overlap   benchmarks/distributed.py --mode placed (teacher on cuda:1) takes less time per step than
#             --mode none (both on cuda:0): the two cards work at once.
# Needs CUDA with two or more cards (exit 2 otherwise); sekd's packages installed (or .whl carried, as
# benchmarks/gpu_check.sh installs them).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-multi-gpu-check}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false
if ! "$PY" -c "import hydra, omegaconf, submitit, lm_eval" 2>/dev/null && [ -d .whl ]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/sekd-site .whl/*.whl
    export PYTHONPATH=/tmp/sekd-site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
GPUS=$("$PY" -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)")
if [ "$GPUS" -lt 2 ]; then
    echo "multi_gpu_check: needs two or more CUDA devices, and this machine has $GPUS" >&2
    exit 2
fi
TORCHRUN=("$PY" -m torch.distributed.run --standalone --nproc_per_node 2)
RUN=(experiment=se_kd logging=disabled train.device=cuda eval.device=cuda train.steps=4 "paths.cache=$OUT/cache")
STATUS="$OUT/multi_gpu_check.json"
: >"$STATUS"
failed=0
verdict() {  # verdict ITEM RC DETAIL
    local word=PASS; [ "$2" -eq 0 ] || { word=FAIL; failed=1; }
    echo "$word $1: $3"
    echo "{\"item\": \"$1\", \"pass\": $([ "$2" -eq 0 ] && echo true || echo false), \"detail\": \"$3\"}" >>"$STATUS"
}

# scoring: a 2-rank run with the embedded eval on ends, and rank 0's lm-eval saw a world of one
timeout 900 "${TORCHRUN[@]}" -m sekd.train "${RUN[@]}" train.distributed=ddp "paths.root=$OUT/scoring" \
    >"$OUT/scoring.log" 2>&1
rc=$?
world=$("$PY" -c "import json,glob; print(json.load(open(glob.glob('$OUT/scoring/runs/*/eval-*/lm_eval/results.json')[0]))['sekd']['eval_world_size'])" 2>/dev/null)
[ $rc -eq 0 ] && [ "$world" = 1 ]; verdict scoring $? "exit $rc (124: timed out), lm-eval world size ${world:-none}"

# ddp_fp32 / fsdp_fp32: 2 ranks equal 1 process within 1e-5 in fp32
for mode in ddp fsdp; do
    FP32=(experiment=se_kd logging=disabled train.device=cuda train.precision=fp32 train.steps=2 eval=none
          "paths.cache=$OUT/cache")
    "${TORCHRUN[@]}" -m sekd.train "${FP32[@]}" train.micro_batch_size=2 train.distributed=$mode \
        "paths.root=$OUT/${mode}_two" >"$OUT/${mode}_two.log" 2>&1 \
    && "$PY" -m sekd.train "${FP32[@]}" train.micro_batch_size=4 "paths.root=$OUT/${mode}_one" >"$OUT/${mode}_one.log" 2>&1
    rc=$?
    diff=$("$PY" - "$OUT/${mode}_two" "$OUT/${mode}_one" <<'EOF' 2>/dev/null
import glob, sys
from safetensors.torch import load_file
a, b = (load_file(glob.glob(f"{root}/runs/*/model/model.safetensors")[0]) for root in sys.argv[1:3])
print(max(float((a[k].double() - b[k].double()).abs().max()) for k in a))
EOF
)
    [ $rc -eq 0 ] && "$PY" -c "import sys; sys.exit(0 if float('${diff:-inf}') <= 1e-5 else 1)"
    verdict ${mode}_fp32 $? "exit $rc, max |w_2 - w_1| = ${diff:-none} (bound 1e-5)"
done

# fsdp_peak: fsdp's per-card peak below ddp's at the paper's shapes
for mode in ddp fsdp; do
    "${TORCHRUN[@]}" benchmarks/distributed.py --mode $mode --json "$OUT/bench_$mode.json" >"$OUT/bench_$mode.log" 2>&1
done
peaks=$("$PY" - "$OUT" <<'EOF' 2>/dev/null
import json, sys
peak = {m: max(r["peak_gib"] for r in json.load(open(f"{sys.argv[1]}/bench_{m}.json"))["ranks"]) for m in ("ddp", "fsdp")}
print(f"{peak['fsdp']:.2f} {peak['ddp']:.2f}")
EOF
)
read -r fsdp_peak ddp_peak <<<"${peaks:-inf 0}"
"$PY" -c "import sys; sys.exit(0 if float('$fsdp_peak') < float('$ddp_peak') else 1)"
verdict fsdp_peak $? "peak per card: fsdp ${fsdp_peak} GiB, ddp ${ddp_peak} GiB"

# overlap: the teacher on cuda:1 makes a step faster than both models on cuda:0
"$PY" benchmarks/distributed.py --mode none --json "$OUT/bench_none.json" >"$OUT/bench_none.log" 2>&1
"$PY" benchmarks/distributed.py --mode placed --teacher-device cuda:1 --json "$OUT/bench_placed.json" \
    >"$OUT/bench_placed.log" 2>&1
times=$("$PY" - "$OUT" <<'EOF' 2>/dev/null
import json, sys
t = {m: json.load(open(f"{sys.argv[1]}/bench_{m}.json"))["ranks"][0]["median_s"] for m in ("none", "placed")}
print(f"{t['placed']:.4f} {t['none']:.4f}")
EOF
)
read -r placed_s none_s <<<"${times:-inf 0}"
"$PY" -c "import sys; sys.exit(0 if float('$placed_s') < 0.95 * float('$none_s') else 1)"
verdict overlap $? "median step: teacher on cuda:1 ${placed_s} s, both on cuda:0 ${none_s} s (pass below 0.95x)"

echo "multi_gpu_check: $([ $failed -eq 0 ] && echo all passed || echo some failed); details in $OUT" >&2
exit $failed
