# The two commands of the README. Each sets up .venv/ first when it is missing or stale.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup serve test test-fast lint clean

setup:
	@bash scripts/setup_env.sh

serve: setup
	$(VENV)/bin/mode-cotd serve $(ARGS)

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check mode_cotd training serving benchmarks tests

clean:
	rm -rf $(VENV) .pytest_cache
