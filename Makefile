# The README's two commands: `make demo` (install, then run the CPU demo) and `make test`.
# Everything installs into .venv inside the clone, at the versions in locks/dev.txt (the
# set the tests passed with; setup.py keeps ranges for users of the library).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
LOCK := locks/dev.txt

.PHONY: setup demo test test-fast lint services sglang lock check-latest

$(STAMP): setup.py pyproject.toml $(LOCK)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --constraint $(LOCK) --upgrade pip
	$(PY) -m pip install --quiet --constraint $(LOCK) -e '.[test]'
	$(PY) scripts/lock_versions.py prune $(LOCK)
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

# Re-resolve the newest versions setup.py allows into a scratch venv (.venv-lock, and
# the SGLang venv into .venv-lock-sglang), run every test with them, and only then
# rewrite locks/dev.txt and locks/sglang.txt. Commit the new locks after reading the diff.
lock:
	bash scripts/resolve_latest.sh --write

# What a new user would get today: the newest allowed versions in a scratch venv
# (.venv-latest) and the fast tests. Not part of CI (.ci/run installs the lock); run it
# on a schedule so that an upstream release that breaks us is seen the day it lands.
check-latest:
	bash scripts/resolve_latest.sh
