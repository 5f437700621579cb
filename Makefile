# `make demo` and `make test` prepare .venv on first use (CPU torch, the package with its HF and Ray extras, test
# tools).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test bench lint

$(VENV)/.ready: pyproject.toml
	$(PYTHON) -m venv --system-site-packages $(VENV)
	@# keep a torch the user already has (>= 2.5); otherwise the CPU build, never the CUDA one
	$(BIN)/python -c "import torch, sys; sys.exit(tuple(map(int, torch.__version__.split('.')[:2])) < (2, 5))" \
		2>/dev/null || $(BIN)/python -m pip install torch==2.13.0
	$(BIN)/python -m pip install -e '.[dev,hf,ray]'
	touch $@

demo: $(VENV)/.ready
	$(BIN)/posttrain demo

test: $(VENV)/.ready
	$(BIN)/python -m pytest -q

bench: $(VENV)/.ready
	$(BIN)/python bench/rollout.py

lint: $(VENV)/.ready
	$(BIN)/ruff check .
