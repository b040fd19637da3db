# Every target sets up what it needs first (scripts/setup.sh is idempotent and fast when nothing is missing).
PY := .venv/bin/python
PYTEST_ARGS ?=

.PHONY: setup run test test-all test-slow lint format bench clean

setup:
	@bash scripts/setup.sh

run: setup
	.venv/bin/dipo run configs/quickstart.yaml $(RUN_ARGS)

test: setup
	$(PY) -m pytest -m "not slow and not gpu" $(PYTEST_ARGS)

test-slow: setup
	$(PY) -m pytest -m "slow" $(PYTEST_ARGS)

test-all: setup
	$(PY) -m pytest -m "not gpu" $(PYTEST_ARGS)

lint: setup
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	.venv/bin/mypy

format: setup
	.venv/bin/ruff check --fix .
	.venv/bin/ruff format .

bench: setup
	@mkdir -p bench/results
	@for script in bench/bench_*.py; do echo "== $$script"; $(PY) $$script || exit 1; done
	@echo "results in bench/results/"

clean:
	rm -rf .pytest_cache .mypy_cache .ruff_cache build *.egg-info
