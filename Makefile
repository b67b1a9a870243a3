# The README's commands. Each installs what it needs into .venv first (re-installing only when
# pyproject.toml changes).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test test-fast test-docker lint bench clean chromium

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

## demo: synthetic data -> torchrun training (2 CPU processes) -> artifact -> index -> service
demo: install
	bash scripts/demo.sh

## test: the whole suite (unit, integration, end-to-end), except the Docker test
test: install chromium
	$(BIN)/python -m pytest -m "not docker"

## chromium: the headless browser of the web page's end-to-end test (installed with apt as root)
chromium:
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; \
	else \
		echo "error: tests/e2e/test_web_page.py needs chromium: run 'sudo apt-get install -y chromium'" >&2; \
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
