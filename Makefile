# The two commands: `make run` (demo stack + gateway) and `make test` (set-up + whole suite).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test setup system lint bench clean

run: setup
	$(BIN)/tenant-proxy dev --config config/dev.yaml --dir .dev

test: setup
	$(BIN)/ruff check proxy tests
	$(BIN)/mypy
	$(BIN)/pytest

setup: system $(STAMP)

system:
	@deploy/dev/install-system.sh

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

lint: setup
	$(BIN)/ruff check proxy tests
	$(BIN)/mypy

clean:
	rm -rf .dev $(VENV) *.egg-info .pytest_cache .mypy_cache .ruff_cache

# Benchmarks (not part of `make test`): each writes its figures to benchmarks/RESULTS.md.
bench: setup
	$(BIN)/python -m benchmarks.metrics_scrape
	$(BIN)/python -m benchmarks.noisy_neighbour
