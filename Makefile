# The two commands of the README. Both set everything up first (scripts/setup.sh; a no-op when done).
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup run test lint bench clean

setup:
	@scripts/setup.sh

## The main job: a daemon on the offline tiny model with ./embeddings, and the REPL attached to it.
run: setup
	@$(PY) -m sdrepl --model tiny --embeddings embeddings $(ARGS)

## The whole test suite (and the linter).
test: setup
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q $(ARGS)

lint: setup
	$(VENV)/bin/ruff check .

bench: setup
	@for b in bench/bench_*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build *.egg-info
