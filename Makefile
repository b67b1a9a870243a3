# The README's commands. Each installs what it needs into .venv first (re-installing only when
# pyproject.toml changes).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test test-fast test-docker lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

## demo: synthetic data -> torchrun training (2 CPU processes) -> artifact -> index -> service
demo: install
	bash scripts/demo.sh

## test: the whole suite (unit, integration, end-to-end), except the Docker test
test: install
	$(BIN)/python -m pytest -m "not docker"

## test-fast: unit tests only
test-fast: install
	$(BIN)/python -m pytest tests/unit -m "not slow"

## test-docker: build the serve image, run it, query it, remove it (docs/operations.md).
## Starts dockerd if needed (as root), builds the debootstrap base image if missing; the image
## builds with the host's CA bundle. Elsewhere: make test-docker DOCKER_BASE=python:3.11-slim-bookworm
DOCKER_BASE ?= duet-local/python:3.11-bookworm
CA_BUNDLE ?= $(wildcard /etc/ssl/certs/ca-certificates.crt)
test-docker: install
	bash docker/dockerd.sh
	case "$(DOCKER_BASE)" in duet-local/*) bash docker/local-base.sh "$(DOCKER_BASE)" ;; esac
	DUET_DOCKER_BASE="$(DOCKER_BASE)" DUET_DOCKER_CA_BUNDLE="$(CA_BUNDLE)" \
		$(BIN)/python -m pytest -m docker -s tests/docker

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

bench: install
	$(BIN)/python bench/synth.py

clean:
	rm -rf runs data .pytest_cache .ruff_cache .mypy_cache
