# The README's commands. Each installs what it needs into .venv first (re-installing only when
# pyproject.toml changes).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test test-fast test-docker lint bench clean system-packages

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

## demo: synthetic data -> torchrun training (2 CPU processes) -> artifact -> index -> service
demo: install
	bash scripts/demo.sh

## test: the whole suite (unit, integration, end-to-end), except the Docker test
test: install system-packages
	$(BIN)/python -m pytest -m "not docker"

## system-packages: what some tests need from Debian, installed with apt (as root) when missing:
## chromium, the headless browser of tests/e2e/test_web_page.py, and g++, with which
## torch.compile builds its CPU kernels (tests/integration/test_compile.py)
system-packages:
	@missing=""; \
	command -v chromium >/dev/null || command -v chromium-browser >/dev/null || missing="chromium"; \
	command -v g++ >/dev/null || missing="$$missing g++"; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	else \
		echo "error: the tests need:$$missing; run 'sudo apt-get install -y $$missing'" >&2; \
		exit 1; \
	fi

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
