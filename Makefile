# The two commands of the README: `make demo` and `make test`. Both set up .venv if needed.
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test test-docs lint bench docs

setup:
	@bash scripts/setup.sh

demo: setup
	$(PY) -m neco_loss.app.cli demo

test: setup
	$(PY) -m pytest -q -m "not docs" --durations=30

# Every command of README.md and docs/*.md that runs here, verbatim (~30 min on 2 cores).
test-docs: setup
	$(PY) -m pytest -q -m docs tests/test_docs_verbatim.py

lint: setup
	$(VENV)/bin/ruff check neco_loss integrations examples tests benchmarks
	$(VENV)/bin/ruff format --check neco_loss integrations examples tests benchmarks
	$(VENV)/bin/mypy neco_loss integrations

bench: setup
	$(PY) benchmarks/sorting.py

docs: setup
	$(VENV)/bin/mkdocs build --strict
