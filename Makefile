# tenantflow — every target documents itself: `make help`.
.DEFAULT_GOAL := help
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: help  # List the targets and what they do
help:
	@grep -E '^\.PHONY: [a-z-]+  # ' $(MAKEFILE_LIST) | sed -E 's/\.PHONY: ([a-z-]+)  # (.*)/  make \1\t\2/' | expand -t 24

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	@touch $(STAMP)

.PHONY: install  # Create .venv and install tenantflow with its dev tools
install: $(STAMP)

.PHONY: run  # Start the supervisor on tenants_example/ with embedded SQLite and show a workflow running
run: $(STAMP)
	$(BIN)/python -m runtime.demo --tenants tenants_example --db sqlite:///./tenantflow.db

.PHONY: test  # Run the whole suite, as CI does (PostgreSQL tests need TENANTFLOW_TEST_POSTGRES_URL)
test: $(STAMP)
	$(BIN)/python -m pytest -q

.PHONY: test-fast  # Quick loop: the suite without the slow soak tests
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" -x

$(VENV)/.installed-bench: $(STAMP) pyproject.toml
	$(BIN)/python -m pip install -q -e '.[dev,bench]'
	@touch $@

.PHONY: bench  # Measure speed and memory; prints a table and writes bench/results.json (FULL=1 for large sizes)
bench: $(VENV)/.installed-bench
	$(BIN)/python -m bench $(if $(FULL),--full,)

.PHONY: lint  # ruff: style and likely bugs
lint: $(STAMP)
	$(BIN)/ruff check runtime sandbox loader tests bench
	$(BIN)/ruff format --check runtime sandbox loader tests bench

.PHONY: format  # Rewrite the code in ruff's format
format: $(STAMP)
	$(BIN)/ruff format runtime sandbox loader tests bench
	$(BIN)/ruff check --fix runtime sandbox loader tests bench

.PHONY: typecheck  # mypy --strict on runtime, sandbox and loader
typecheck: $(STAMP)
	$(BIN)/mypy

.PHONY: check  # lint + typecheck + test
check: lint typecheck test

.PHONY: clean  # Remove the virtualenv, caches and local databases
clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache *.egg-info build tenantflow.db tenantflow.db-wal tenantflow.db-shm
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
