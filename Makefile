# The README's commands. Each installs what it needs into .venv first (re-installing only when
# pyproject.toml changes).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test test-fast lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

## demo: synthetic data -> torchrun training (2 CPU processes) -> artifact -> index -> service
demo: install
	bash scripts/demo.sh

## test: the whole suite (unit, integration, end-to-end)
test: install
	$(BIN)/python -m pytest

## test-fast: unit tests only
test-fast: install
	$(BIN)/python -m pytest tests/unit -m "not slow"

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

bench: install
	$(BIN)/python bench/synth.py

clean:
	rm -rf runs data .pytest_cache .ruff_cache .mypy_cache
