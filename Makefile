# The two commands: `make demo` (the main job on the embedded default) and `make test`.
# Each sets itself up on a fresh machine: a virtual environment, CPU torch first, then the package.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# A GPU user sets TORCH to their own build (or installs torch into the venv first).
TORCH  ?= torch==2.13.0

export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export WANDB_MODE ?= offline
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install demo test clean-demo slurm

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	touch $@

demo: install
	$(BIN)/sekd-train --config-dir sweeps --config-name demo $(DEMO_ARGS)
	$(BIN)/sekd-report outputs/demo/runs --out outputs/demo

test: install
	$(BIN)/pytest -q

# A one-node Slurm cluster on this machine (Debian, as root) for `hydra/launcher=slurm`; stop it with
# `scripts/slurm-local.sh stop`.
slurm:
	bash scripts/slurm-local.sh install
	bash scripts/slurm-local.sh start

clean-demo:
	rm -rf outputs/demo
