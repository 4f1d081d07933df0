# Everything a fresh machine with Python 3 and make needs. Both entry points are
# idempotent: the venv is rebuilt only when pyproject.toml changes.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test check check-top check-dirs lint typecheck pytest bench screenshots clean

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

# The whole suite, slow tests and browser included: what CI runs (.ci/run).
test: lint typecheck pytest

# The day-to-day loop, in under a minute: ruff, mypy and the fast tests. Not run here:
# the `slow` tests (each takes more than a few seconds: processes killed and forked,
# outages, the benchmark smoke test) and the browser tests (a Chromium per module).
# `make test` runs them all before a push.
#
# The fast tests run as two pytest processes at once, each printing when it ends: they
# spend much of their time waiting on sockets, subprocesses and timers, so two of them
# share two cores well. tests/*.py in one; the subdirectories in CHECK_DIRS in the
# other (a new subdirectory runs in the first until it is listed).
CHECK_DIRS := tests/extension tests/reliability
CHECK_PYTEST := $(BIN)/pytest -q -m "not slow" $(PYTEST_ARGS)

check: lint typecheck
	@$(MAKE) --no-print-directory -j2 --output-sync=target check-top check-dirs

check-top: $(STAMP)
	$(CHECK_PYTEST) tests $(addprefix --ignore=,tests/browser $(CHECK_DIRS))

check-dirs: $(STAMP)
	$(CHECK_PYTEST) $(CHECK_DIRS)

screenshots: $(STAMP)
	MMOLOVE_SCREENSHOTS=1 $(BIN)/pytest -q tests/browser

bench: $(STAMP)
	@command -v wrk >/dev/null 2>&1 || echo "note: wrk is not installed (apt-get install -y wrk): the gunicorn + wrk part of the overhead benchmark and the sandbox's ceiling in the throughput benchmark are skipped" >&2
	@command -v valgrind >/dev/null 2>&1 || echo "note: valgrind is not installed (apt-get install -y valgrind): the instruction counts of the overhead benchmark are skipped" >&2
	$(BIN)/python -m bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build dist .mypy_cache .ruff_cache
