# Everything a fresh machine with Python 3 and make needs. Both entry points are
# idempotent: the venv is rebuilt only when pyproject.toml changes.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint typecheck pytest bench screenshots clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test,demo]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m example_app

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

pytest: $(STAMP)
	$(BIN)/pytest $(PYTEST_ARGS)

test: lint typecheck pytest

screenshots: $(STAMP)
	MMOLOVE_SCREENSHOTS=1 $(BIN)/pytest -q tests/browser

bench: $(STAMP)
	@command -v wrk >/dev/null 2>&1 || echo "note: wrk is not installed (apt-get install -y wrk): the gunicorn + wrk part of the overhead benchmark and the sandbox's ceiling in the throughput benchmark are skipped" >&2
	@command -v valgrind >/dev/null 2>&1 || echo "note: valgrind is not installed (apt-get install -y valgrind): the instruction counts of the overhead benchmark are skipped" >&2
	$(BIN)/python -m bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build dist .mypy_cache .ruff_cache
