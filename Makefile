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

.PHONY: install demo test test-fast lint wheel-check clean-demo slurm slurm-install

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -c constraints.txt -e '.[dev,bench]'
	touch $@

demo: install
	$(BIN)/sekd-train --config-dir sweeps --config-name demo $(DEMO_ARGS)
	$(BIN)/sekd-report outputs/demo/runs --out outputs/demo

# The tests run in TEST_WORKERS pytest-xdist workers (default: one per CPU, at most 4), one torch thread each;
# tests/conftest.py keeps what must share a worker together (the Slurm cluster's tests, a module's shared
# fixture) through --dist loadgroup. TEST_WORKERS=0 runs them in this process. pytest's temp folders are under
# the checkout: another pytest session's cleanup never deletes them.
TEST_WORKERS ?= $(shell n=$$(nproc 2>/dev/null || echo 2); echo $$(( n < 4 ? n : 4 )))
PYTEST := OMP_NUM_THREADS=1 $(BIN)/pytest -q -n $(TEST_WORKERS) --dist loadgroup --basetemp=$(CURDIR)/.pytest_tmp

test: install slurm-install
	$(PYTEST)

# The fast tier, for iterating: every test that starts no process (the CLI, torchrun, Slurm, a notebook) and
# is not marked slow (tests/conftest.py marks them). `make test` still runs everything.
test-fast: install
	$(PYTEST) -m "not e2e and not slow"

# ruff's lint and format check (pyproject.toml [tool.ruff]), then mypy over the folders [tool.mypy] names;
# CI runs it before the tests, and `pre-commit install` runs the same on every commit (.pre-commit-config.yaml)
lint: install
	$(BIN)/ruff check sekd hydra_plugins analysis benchmarks tests examples
	$(BIN)/ruff format --check sekd hydra_plugins analysis benchmarks tests examples
	$(BIN)/mypy

# The package as a user installs it (not editable, outside the checkout, from an empty folder): its wheel, a
# fresh environment, --version, a shipped sweep by name, a tiny run and sekd-report (scripts/wheel-check.sh)
wheel-check: install
	bash scripts/wheel-check.sh

# What tests/test_slurm.py needs: Slurm installed (its fixture starts and stops the one-node cluster).
# Installed where this can (root with apt-get); elsewhere those tests skip and say how to run them
# (SEKD_REQUIRE_SLURM=1, as CI sets, makes that a failure).
slurm-install:
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  bash scripts/slurm-local.sh install || { echo "make: could not install Slurm (output above):" \
	    "tests/test_slurm.py will skip"; [ "$${SEKD_REQUIRE_SLURM:-0}" != 1 ]; }; \
	elif ! command -v sbatch >/dev/null 2>&1; then \
	  echo "make: Slurm is not installed and installing it needs root with apt-get: tests/test_slurm.py will" \
	    "skip (as root: scripts/slurm-local.sh install, then make test)"; \
	fi

# A one-node Slurm cluster on this machine (Debian, as root) for `hydra/launcher=slurm`; stop it with
# `scripts/slurm-local.sh stop`.
slurm:
	bash scripts/slurm-local.sh install
	bash scripts/slurm-local.sh start

clean-demo:
	rm -rf outputs/demo
