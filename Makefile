# Everything a fresh machine with Python 3 and make needs. Both entry points are
# idempotent: the venv is rebuilt only when pyproject.toml changes.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test check lint typecheck pytest bench screenshots clean

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
	$(BIN)/lint-imports

typecheck: $(STAMP)
	$(BIN)/mypy

pytest: $(STAMP)
	$(BIN)/pytest $(PYTEST_ARGS)

# The whole suite, slow tests and browser included: what CI runs (.ci/run).
test: lint typecheck pytest

# The day-to-day loop, in under a minute: ruff, the import layers, mypy and the fast
# tests on two workers (pytest-xdist). Not run here: the `slow` tests (processes killed
# and forked, outages, the benchmark smoke test) and the browser tests (a Chromium per
# module). `make test` runs them all before a push.
check: lint typecheck
	$(BIN)/pytest -q -n 2 -m "not slow" --ignore=tests/browser $(PYTEST_ARGS)

screenshots: $(STAMP)
	MMOLOVE_SCREENSHOTS=1 $(BIN)/pytest -q tests/browser

bench: $(STAMP)
	@command -v wrk >/dev/null 2>&1 || echo "note: wrk is not installed (apt-get install -y wrk): the gunicorn + wrk part of the overhead benchmark and the sandbox's ceiling in the throughput benchmark are skipped" >&2
	@command -v valgrind >/dev/null 2>&1 || echo "note: valgrind is not installed (apt-get install -y valgrind): the instruction counts of the overhead benchmark are skipped" >&2
	$(BIN)/python -m bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build dist .mypy_cache .ruff_cache
