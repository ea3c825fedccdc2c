# The two commands: `make demo` and `make test`. Both install everything first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# Offline at run time: never let the demo or the tests reach a model hub.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1

.PHONY: setup demo test test-all reproduce clean

setup: $(VENV)/.installed

# --system-site-packages: a torch the user already has (e.g. a CUDA build) is kept.
# Without one: the CPU build torch==2.13.0 when no NVIDIA GPU is present, else pip's default build.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv --system-site-packages $(VENV)
	$(PY) -c "import torch" 2>/dev/null || { \
	  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then $(PIP) install torch; \
	  else $(PIP) install torch==2.13.0; fi; }
	$(PIP) install -e ".[dev]"
	touch $@

demo: setup
	$(VENV)/bin/safe train --config configs/demo.yaml --output-dir runs/demo --overwrite

test: setup
	$(PY) -m pytest -q

test-all: setup
	$(PY) -m pytest -q -m "slow or not slow"

reproduce: setup
	$(VENV)/bin/safe reproduce --output-dir runs/reproduce

clean:
	rm -rf runs .pytest_cache
