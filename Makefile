# The README's commands. Each sets up .venv/ first (quick when it is already there).
PY := .venv/bin/python

.PHONY: env demo test test-fast lint
env:
	bash tools/setup_env.sh

# Trains and evaluates DAT on the built-in shapes set; figures in work_dirs/demo/results.md.
demo: env
	$(PY) tools/run_demo.py

# What CI runs (.ci/run): the linter, then every test.
test: env lint
	$(PY) -m pytest tests

# For development: the tests not marked slow (no end-to-end trainings).
test-fast: env lint
	$(PY) -m pytest tests -m "not slow"

lint: env
	$(PY) -m ruff check .
