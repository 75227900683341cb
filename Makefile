# The README's two commands: `make demo` (install, then run the CPU demo) and `make test`.
# Everything installs into .venv inside the clone.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-fast lint services sglang

$(STAMP): setup.py pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

# The real Prometheus, Pushgateway, Slurm and munge the integration tests start on
# 127.0.0.1 (Debian packages; needs root or sudo). Without them those tests skip
# locally and fail under CI=true.
services:
	-bash scripts/install_services.sh

# The real SGLang 0.5.23 server (+ sglang-router 0.3.2) in a venv of its own under
# ~/.cache/archer-mcore (CPU build, cached; 330 s and 1.9 GB the first time) for
# tests/sglang_real. Without it those tests skip locally and fail under CI=true.
sglang:
	-bash scripts/install_sglang.sh

demo: $(STAMP)
	$(VENV)/bin/archer train configs/demo_cpu.yaml

lint: $(STAMP)
	$(VENV)/bin/ruff check .

test: $(STAMP) lint services sglang
	$(PY) -m pytest

# Developers: skip the slow multi-process tests (CI runs them all).
test-fast: $(STAMP) lint
	$(PY) -m pytest -m "not slow"
