# The two commands of the README: `make demo` (the local job) and `make test` (the suite).
# Each installs what it needs into .venv from the pinned constraints.txt.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test lint bench bench-gpu install system-deps

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	touch $@

demo: $(VENV)/.installed
	$(PY) launch/demo.py

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# Every system package the suite uses, installed before pytest starts so that no test depends on
# what an earlier test installed: Debian's SLURM + munge + mariadb (the launcher tests start and stop
# their 2-node cluster with tests/slurm/start_local_slurm.sh) and chromium (the browser test).
# Idempotent (a second run takes well under a second). Without root each script prints what to run
# and the tests that need it skip and say why; as root a failed install stops `make test`.
system-deps:
	bash tests/system/install_slurm.sh
	bash tests/system/install_browser.sh

test: $(VENV)/.installed lint system-deps
	$(PY) -m pytest

bench: $(VENV)/.installed
	$(PY) bench/model.py
	$(PY) bench/data.py
	$(PY) bench/train.py

# One GPU node, one command: the table of bench/gpu.py (issue 17) in under 8 minutes.
bench-gpu: $(VENV)/.installed
	$(PY) bench/gpu.py --out runs/gpu_bench.md
