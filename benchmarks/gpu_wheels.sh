#!/usr/bin/env bash
# The wheels sekd needs on a GPU machine that reaches no package registry and has its own Python 3.12 with
# torch and transformers (benchmarks/README.md, "On a borrowed GPU"). Run here, where pip reaches PyPI:
#
#     bash benchmarks/gpu_wheels.sh [DIR]        # default DIR: .whl/ (git-ignored)
#
# It gathers, for CPython 3.12 on x86-64 Linux, every package of sekd's install (pinned by constraints.txt)
# that the GPU machine's image lacks, or holds at a version sekd's stack does not run with: Hydra,
# OmegaConf, submitit, lm-eval and their needs, and the Hugging Face stack pinned together (transformers,
# tokenizers, huggingface_hub, datasets). Packages that exist only as source (antlr4-python3-runtime,
# rouge_score, sqlitedict, word2number) are built here into pure-Python wheels first. wandb is left out (its
# wheel alone is 20 MB; the GPU checks run with logging=disabled). There, benchmarks/gpu_check.sh installs
# them with `pip install --no-index --no-deps --target`, before anything imports sekd.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-.whl}
PY=${PYTHON:-python3}
mkdir -p "$DIR"
TARGET=(--python-version 3.12 --implementation cp --abi cp312
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
pin() { grep -i "^$1==" constraints.txt | head -1; }

# (1) the source-only packages, as pure-Python wheels built here
for name in antlr4-python3-runtime rouge_score sqlitedict word2number; do
    "$PY" -m pip wheel -q --no-deps --no-binary :all: -w "$DIR" "$(pin "$name")"
done

# (2) the rest, with every dependency resolved for the GPU machine's Python, from wheels only
WANT=(hydra-core omegaconf hydra-submitit-launcher submitit "lm_eval[hf]" datasets evaluate transformers tokenizers
      huggingface_hub)
"$PY" -m pip download -q --only-binary=:all: "${TARGET[@]}" --find-links "$DIR" -c constraints.txt -d "$DIR" "${WANT[@]}"

# (3) what the GPU machine's image already holds, at versions sekd runs with: not carried (the 64 MiB budget)
PRESENT=(torch triton nvidia_ numpy pandas pyarrow scipy scikit_learn matplotlib pillow accelerate safetensors
         filelock fsspec tqdm PyYAML pyyaml regex requests urllib3 certifi idna charset_normalizer packaging
         psutil six python_dateutil pytz tzdata typing_extensions sympy mpmath networkx jinja2 Jinja2 MarkupSafe
         markupsafe aiohttp aiosignal aiohappyeyeballs attrs frozenlist multidict yarl propcache xxhash
         cloudpickle peft sacrebleu portalocker colorama lxml tabulate joblib threadpoolctl absl_py rich
         pygments Pygments markdown_it_py mdurl click hf_xet contourpy cycler fonttools kiwisolver pyparsing
         h11 httpcore httpx anyio sniffio setuptools pybind11 protobuf cuda_ typer shellingham annotated_doc)
for prefix in "${PRESENT[@]}"; do
    rm -f "$DIR/${prefix}"-*.whl "$DIR/${prefix}"*.whl 2>/dev/null || true
done
# the Hugging Face stack travels whole (it must agree with itself); keep exactly one version of each package
ls "$DIR"/*.whl | sed 's#.*/##' | awk -F- '{print tolower($1)}' | sort | uniq -d | while read -r dup; do
    echo "gpu_wheels: two versions of $dup in $DIR; pip would refuse them" >&2
    exit 1
done
echo "gpu_wheels: $(ls "$DIR"/*.whl | wc -l) wheels, $(du -sh "$DIR" | cut -f1) in $DIR"
