#!/usr/bin/env bash
# The one-card GPU checks, as one prepared command for a borrowed GPU machine (benchmarks/README.md, "On a
# borrowed GPU"): it installs the wheels benchmarks/gpu_wheels.sh gathered (when sekd's packages are missing),
# then
#   (1) smoke: the embedded SE-KD run trained and scored on the card (bf16), its record;
#   (2) kd:    benchmarks/kd_loss.py and kd_step.py at the Qwen3-8B -> 1.7B shapes, one round each;
#   (3) paper: a 3-step se_kd at qwen3_8b_to_1.7b shapes (random weights, benchmarks/paper_pair.py), micro-batch
#              2 x 512, AdamW: its record (max_memory_allocated per card) and a profiler trace of steps 2-3
#              (train.profile_steps=2: the selected head under autocast and the bf16 sample pre-pass show there);
#   (4) plan:  `sekd-train ... --plan` of the same run, against what (3) measured.
# Every JSON, record and trace lands in OUT (default gpu-check/), with gpu_check.json, one line per step.
#
#     bash benchmarks/gpu_wheels.sh                     # here, with PyPI: .whl/ (git-ignored)
#     bash benchmarks/gpu_check.sh "$OUT"               # there, with .whl carried
#     SHAPE=tiny DEVICE=cpu bash benchmarks/gpu_check.sh /tmp/dry   # the same steps at a tiny shape, on a CPU
#
# Exit status: 0 when every step passed, 1 otherwise (each step's status is in gpu_check.json either way).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-gpu-check}
SHAPE=${SHAPE:-qwen3_8b_to_1.7b}
DEVICE=${DEVICE:-cuda}
PY=${PYTHON:-python3}
CARD=${CARD:-80GB}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false
export PYTHONUNBUFFERED=1

if ! "$PY" -c "import hydra, omegaconf, submitit, lm_eval" 2>/dev/null; then
    [ -d .whl ] || { echo "gpu_check: sekd's packages are missing and there is no .whl/ (bash benchmarks/gpu_wheels.sh)" >&2; exit 2; }
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/sekd-site .whl/*.whl \
        || exit 2
    export PYTHONPATH=/tmp/sekd-site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
if [ "$DEVICE" = cuda ] && ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: DEVICE=cuda, and this machine has no CUDA device (torch.cuda.is_available() is False)" >&2
    exit 2
fi

STATUS="$OUT/gpu_check.json"
: >"$STATUS"
failed=0
step() {  # step NAME COMMAND...: run it, time it, one JSON line with its status
    local name=$1; shift
    local t0=$(date +%s)
    echo "gpu_check: $name ..." >&2
    "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    echo "{\"step\": \"$name\", \"rc\": $rc, \"seconds\": $(( $(date +%s) - t0 ))}" | tee -a "$STATUS"
    [ $rc -eq 0 ] || { failed=1; tail -5 "$OUT/$name.log" >&2; }
}

TINY=()
[ "$SHAPE" = tiny ] && TINY=(model=tiny train.steps=2 eval.limit=8)
step smoke "$PY" -m sekd.train experiment=se_kd logging=disabled "train.device=$DEVICE" "eval.device=$DEVICE" \
    "${TINY[@]}" "paths.root=$OUT/smoke" "paths.cache=${SEKD_CACHE:-.sekd_cache}"

step kd_loss "$PY" benchmarks/kd_loss.py --shape "$SHAPE" --device "$DEVICE" --rounds 1 --json "$OUT/kd_loss.json"
step kd_step "$PY" benchmarks/kd_step.py --shape "$SHAPE" --device "$DEVICE" --rounds 1 --json "$OUT/kd_step.json"

PAIR=${PAIR:-/tmp/sekd-pair-$SHAPE}
[ -f "$PAIR/pair.json" ] || step pair "$PY" benchmarks/paper_pair.py --shape "$SHAPE" --device "$DEVICE" --out "$PAIR"
SEQ=$("$PY" -c "import sys; sys.path.insert(0, 'benchmarks'); from kd_step import SHAPES; print(SHAPES['$SHAPE'].seq)")
PAPER=(experiment=se_kd model=qwen3_8b_to_1.7b "model.teacher=$PAIR/teacher" "model.student=$PAIR/student"
       "data.seq_len=$SEQ" train.micro_batch_size=2 train.grad_accum=1 train.steps=3 train.optimizer=adamw
       "train.device=$DEVICE" eval=none logging=disabled)
step paper "$PY" -m sekd.train "${PAPER[@]}" train.profile_steps=2 "paths.root=$OUT/paper" "paths.cache=$OUT/cache"
for f in $(find "$OUT/paper" -name 'profile-*.json' -o -name train_stats.json); do cp "$f" "$OUT/"; done

step plan "$PY" -m sekd.train "${PAPER[@]}" --plan --card "$CARD" --json "$OUT/plan.json"
step plan_vs_measured "$PY" - "$OUT" "$DEVICE" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
plan = json.loads((out / "plan.json").read_text())
measured = json.loads((out / "train_stats.json").read_text())["peak_memory_mb_per_device"]  # max_memory_allocated
rows = []
for (device, mib), planned in zip(measured.items(), plan["devices"]):  # one process: the student's card first
    predicted = planned["allocated_gib"] * 1024  # the plan's peak less its runtime reserve (context, slack)
    rows.append({"device": device, "plan_device": planned["name"], "measured_mib": round(mib),
                 "predicted_mib": round(predicted), "predicted_over_measured": round(predicted / mib, 3)})
    print(f"{device}: measured {mib:.0f} MiB, planned {predicted:.0f} MiB ({planned['phase']}), "
          f"ratio {predicted / mib:.3f}")
(out / "plan_vs_measured.json").write_text(json.dumps(rows, indent=2))
if sys.argv[2] == "cpu":  # a CPU's peak is the process's resident set, weights and libraries included
    sys.exit(0)  # (benchmarks/plan_check.py compares the plan with CPU peaks above the loaded baseline)
sys.exit(0 if rows and all(0.8 <= r["predicted_over_measured"] <= 1.2 for r in rows) else 1)
EOF
echo "gpu_check: done ($([ $failed -eq 0 ] && echo all passed || echo some failed)): $OUT" >&2
exit $failed
