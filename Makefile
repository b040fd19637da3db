# Every target sets up what it needs first (scripts/setup.sh is idempotent and fast when nothing is missing).
PY := .venv/bin/python
PYTEST_ARGS ?=

.PHONY: setup run test test-all test-slow lint format bench chaos clean

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

# 100 SIGKILLs of rollout servers, reward replicas, the learner and Redis during a quick-start run, then the audit
# (<run_dir>/chaos/summary.json). CHAOS_ARGS adds options, e.g. CHAOS_ARGS="--appendfsync everysec".
chaos: setup
	.venv/bin/dipo chaos configs/quickstart.yaml --kills 100 --seed 0 $(CHAOS_ARGS)

clean:
	rm -rf .pytest_cache .mypy_cache .ruff_cache build *.egg-info
