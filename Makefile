# The two commands of the README: `make demo` (the local job) and `make test` (the suite).
# Each installs what it needs into .venv from the pinned constraints.txt.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test lint bench install system-deps

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

# Debian's chromium for the browser test (root). The launcher tests install and start their 2-node
# SLURM cluster themselves (tests/slurm/start_local_slurm.sh) and stop it afterwards. Without root
# those tests skip and say why; everything else still runs.
system-deps:
	-bash tests/system/install_browser.sh

test: $(VENV)/.installed lint system-deps
	$(PY) -m pytest

bench: $(VENV)/.installed
	$(PY) bench/model.py
	$(PY) bench/data.py
	$(PY) bench/train.py
