# The two commands of the README. Both set up .venv/ first (quick when it is already there).
PY := .venv/bin/python

.PHONY: env demo test
env:
	bash tools/setup_env.sh

demo: env
	$(PY) tools/run_demo.py

test: env
	$(PY) -m pytest tests
