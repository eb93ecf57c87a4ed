#!/usr/bin/env bash
# The package as a user installs it: sekd's wheel built from this checkout's files, installed (not editable)
# with its dependencies into a fresh virtual environment outside the checkout, then used from an empty folder:
# `sekd-train --version`, a shipped sweep found by name, one tiny run (its record carries the version), the
# demo grid on the embedded default and sekd-report over it; then the example plugin (examples/sekd_lab)
# installed beside it: its tests on sekd.testing, its sweep and its report. `make wheel-check`; CI runs it
# after `make test` (about 15 minutes on 2 cores, most of it the demo grid).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH=${TORCH:-torch==2.13.0}  # CPU torch from local disk first, as `make install` does
WORK=$(mktemp -d "${TMPDIR:-/tmp}/sekd-wheel.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=offline OMP_NUM_THREADS=1

say() { echo "wheel-check: $*"; }
say "building the wheel from this checkout's files"
mkdir -p "$WORK/src" "$WORK/user"
git ls-files -z --cached --others --exclude-standard | xargs -0 cp --parents -t "$WORK/src"
"$PY" -m venv "$WORK/venv"
V="$WORK/venv/bin"
"$V/pip" install -q --upgrade pip
"$V/pip" wheel -q --no-deps -w "$WORK/dist" "$WORK/src"
say "installing $(basename "$WORK"/dist/sekd-*.whl) and its dependencies into a fresh environment"
"$V/pip" install -q "$TORCH"
"$V/pip" install -q -c constraints.txt "$WORK"/dist/sekd-*.whl

cd "$WORK/user"  # no conf/, no sweeps/, no checkout
want="sekd $("$V/python" -c 'import sekd; print(sekd.__version__)')"
got=$("$V/sekd-train" --version)
[[ "$got" == "$want" ]] || { say "sekd-train --version printed '$got', not '$want'"; exit 1; }
"$V/python" - "$WORK/venv" <<'PY'
import sys
from pathlib import Path

import sekd
from sekd.config.folders import CONF, SWEEPS

venv = Path(sys.argv[1]).resolve()
for what, path in (("sekd", sekd.__file__), ("conf", CONF), ("sweeps", SWEEPS)):
    assert Path(path).resolve().is_relative_to(venv), f"{what} is read from {path}, not the installed package"
assert (Path(CONF) / "config.yaml").is_file() and (Path(SWEEPS) / "demo.yaml").is_file()
PY
say "a shipped sweep by name (sekd-train --config-name demo)"
"$V/sekd-train" --config-name demo --cfg hydra | grep -q "experiment: student,teacher,full_kd" \
  || { say "the demo sweep was not found by name"; exit 1; }
say "one tiny run from an empty folder, then sekd-report"
"$V/sekd-train" experiment=se_kd model=tiny train.steps=2 train.threads=1 data.seq_len=64 eval=none logging=disabled
record=$(ls outputs/runs/*/eval-*/record.json)
"$V/python" -c "import json, sekd, sys; r = json.load(open(sys.argv[1])); assert r['sekd_version'] == sekd.__version__, r" "$record"
"$V/sekd-report" outputs/runs --out outputs/report >/dev/null
ls outputs/report/*.csv >/dev/null
say "the demo grid by name, on the embedded default (sekd-train --config-name demo), then sekd-report"
"$V/sekd-train" --config-name demo
"$V/sekd-report" outputs/demo --out outputs/demo >/dev/null
for row in "Full KD" "SE-KD3X" "Teacher"; do
  grep -q "$row" outputs/demo/table.md || { say "the demo's table has no '$row' row"; exit 1; }
done
say "the example plugin (examples/sekd_lab): installed, its tests on sekd.testing, its sweep, its report"
"$V/pip" install -q "$WORK/src/examples/sekd_lab[test]"
"$V/python" -m pytest -q -p no:cacheprovider "$WORK/src/examples/sekd_lab/tests"
"$V/sekd-train" --config-name lab_sweep
"$V/sekd-report" outputs/lab --out outputs/lab >/dev/null
for row in "Full KD" "Disagreement margin, top-p 50%"; do
  grep -q "$row" outputs/lab/table.md || { say "the lab's table has no '$row' row"; exit 1; }
done
"$V/python" - <<'PY'
import json
from pathlib import Path

[rec] = [json.loads(p.read_text()) for p in Path("outputs/lab/runs").glob("lab_margin*/eval-*/record.json")]
modules = {p["key"]: (p["module"], p["version"]) for p in rec["plugins"]}
assert modules == {"position.signal": ("sekd_lab.pieces", "0.1.0"), "position.policy": ("sekd_lab.pieces", "0.1.0")}, rec["plugins"]
PY
say "ok: the installed package runs, finds its configs and sweeps, records its version, and runs a plugin's pieces"
