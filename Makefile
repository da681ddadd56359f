# famviz: `make app` installs what is missing and serves the app on the bundled model;
# `make test` installs what is missing and runs the whole test suite.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.famviz-installed
HOST ?= 127.0.0.1
PORT ?= 7860

.PHONY: setup app test lint format fast-test browser-test bench-app clean-cache

setup: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml scripts/setup.sh
	bash scripts/setup.sh "$(VENV)" "$(PYTHON)"
	touch $(STAMP)

app: setup
	$(PY) app.py --host $(HOST) --port $(PORT)

test: setup
	$(PY) -m pytest -q

# Lint: ruff's checks as configured in pyproject.toml, the formatter's layout, and the package's layers
# (import-linter's contract in pyproject.toml); CI runs all three before the tests.
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports --no-cache

format: setup
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

fast-test: setup
	$(PY) -m pytest -q -m "not slow"

browser-test: setup
	$(PY) -m pytest -q tests/app/test_browser.py tests/viz/test_export.py

# App figures for the closing note: Start -> first plotted block, overhead per block, long-document responsiveness.
bench-app: setup
	$(PY) scripts/bench_app.py

clean-cache:
	rm -rf "$${FAMVIZ_CACHE_DIR:-$${XDG_CACHE_HOME:-$$HOME/.cache}/famviz}"
