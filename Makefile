# One entry point for every check; CI (.ci/run) calls `make check`.
# The virtualenv is created on first use and refreshed when pyproject.toml changes.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install demo lint format types test test-fast check bench clean soak

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

## demo: seed an SQLite file with long demo streams, compact them, print a summary
demo: $(STAMP)
	$(BIN)/eskit-tasks demo --database sqlite:///eskit-demo.db

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

types: $(STAMP)
	$(BIN)/mypy

## test: the whole test suite (needs PostgreSQL; see README)
test: $(STAMP)
	$(BIN)/pytest

## test-fast: the fast tier, logic only: no PostgreSQL, Redis or worker processes (< 60 s)
test-fast: $(STAMP)
	$(BIN)/pytest -m "not services and not slow" -q

## check: lint, types and tests — what CI runs
check: lint types test

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis eskit-demo.db*

## bench: run every benchmark at full size, print the table, write bench/results/latest.json
bench: $(STAMP)
	$(BIN)/python -m bench.run --scale full

## soak: writers, readers and fan-outs under random faults for MINUTES (default 10), then
## check every invariant; prints the report, writes tests/soak/results/latest.json, exits 1
## on a violation (needs PostgreSQL and redis-server; see tests/soak/__init__.py)
MINUTES ?= 10
soak: $(STAMP)
	$(BIN)/python -m tests.soak --minutes $(MINUTES) --json tests/soak/results/latest.json
