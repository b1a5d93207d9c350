# Every target does its own set-up: a fresh clone needs only `make train` or `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install train test test-fast clean

install: $(STAMP)

# Re-installs only when pyproject.toml changes; `pip install -e` keeps src/ live.
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	@touch $(STAMP)

train: install  ## train the small SETR on the built-in synthetic dataset (CPU, a few minutes)
	$(PY) src/train.py $(ARGS)

test: install  ## the whole suite (what CI runs)
	$(PY) -m pytest -n 2 --dist loadfile -q $(ARGS)

test-fast: install  ## skip the end-to-end runs
	$(PY) -m pytest -q -m "not slow" $(ARGS)

clean:
	rm -rf logs outputs multirun .pytest_cache wandb
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
