# Every target does its own set-up: a fresh clone needs only `make train` or `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# the exact versions the suite passed with; CONSTRAINTS= installs from the ranges in pyproject.toml alone
CONSTRAINTS ?= constraints.txt

.PHONY: install train test test-fast lint format constraints clean peers bench-peers

install: $(STAMP)

# Re-installs only when pyproject.toml or the constraints change; `pip install -e` keeps src/ live.
$(STAMP): pyproject.toml $(CONSTRAINTS)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(if $(CONSTRAINTS),-c $(CONSTRAINTS)) -e ".[dev]"
	@touch $(STAMP)

train: install  ## train the small SETR on the built-in synthetic dataset (CPU, a few minutes)
	$(PY) src/train.py $(ARGS)

test: install  ## the whole suite (what CI runs, after `make lint`)
	$(PY) -m pytest -n 2 --dist loadfile -q $(ARGS)

peers: install  ## mmsegmentation 1.2.2 for benchmarks/peers.py, offline (benchmarks/peers/site; not a dependency)
	$(PY) benchmarks/peers/install.py

bench-peers: peers  ## this project vs mmseg's SETR, ViT-B MLA 256 and 512 on this machine (benchmarks/README.md)
	$(PY) benchmarks/record.py cpu_peers_vitb_mla_256 -- $(PY) benchmarks/peers.py --device cpu --crop 256 $(ARGS)
	$(PY) benchmarks/record.py cpu_peers_vitb_mla_512 -- $(PY) benchmarks/peers.py --device cpu --crop 512 $(ARGS)

test-fast: install  ## skip the end-to-end runs
	$(PY) -m pytest -q -m "not slow" $(ARGS)

lint: install  ## ruff: lint rules and import order (configured in pyproject.toml)
	$(VENV)/bin/ruff check src tests notebooks

format: install  ## apply ruff's safe fixes
	$(VENV)/bin/ruff check --fix src tests notebooks

constraints: install  ## re-pin constraints.txt to what is installed now
	@{ sed -n '1,3p' constraints.txt; $(PY) -m pip freeze --exclude-editable | grep -v '^-e'; } > constraints.txt.new
	@mv constraints.txt.new constraints.txt

clean:
	rm -rf logs outputs multirun .pytest_cache wandb
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
