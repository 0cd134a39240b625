# One command each: `make demo` (install + run the offline demo) and `make test` (install + tests).
PYTHON ?= python3
VENV ?= .venv
# torch is pinned to 2.13.0. Where a CPU wheel of it is available locally (PIP_FIND_LINKS, as on this project's
# machines) pip takes it; on other Linux CPU machines PyPI's default is the multi-GB CUDA build, which
# `make install TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu"` avoids.
# GPU users: `make install TORCH_SPEC=torch` to take the newest CUDA build.
TORCH_SPEC ?= torch==2.13.0
TORCH_PIP_ARGS ?=
BIN := $(VENV)/bin
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install demo test quality style bench

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH_PIP_ARGS) "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

demo: install
	$(BIN)/sophon-hf demo --output demo_output

test: install
	$(BIN)/python -m pytest -q

quality: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

style: install
	$(BIN)/ruff check --fix . && $(BIN)/ruff format .

bench: install
	$(BIN)/python benchmarks/run_all.py
