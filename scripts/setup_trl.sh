#!/usr/bin/env bash
# Idempotent set-up of a separate virtualenv with Hugging Face TRL, for `make bench-trl` (bench/bench_trl.py runs
# bench/trl_grpo.py in it). TRL is never a dependency of the project: it lives only in this venv.
# Usage: scripts/setup_trl.sh [VENV]   (default .venv-trl). Re-running it does only what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
VENV="${1:-.venv-trl}"
STAMP="$VENV/.dipo-trl-setup-stamp"

# Versions verified together on the 2-core CPU machine (torch 2.13.0 CPU wheel, fp32, no vLLM).
TORCH_VERSION="2.13.0"
TRL_VERSION="1.16.0"
TRANSFORMERS_VERSION="5.23.0"
ACCELERATE_VERSION="1.15.0"
DATASETS_VERSION="5.2.0"
REASONING_GYM_VERSION="0.1.25"
MATH_VERIFY_VERSION="0.9.0"
PSUTIL_VERSION="7.2.2"

"$PYTHON" - <<'PY'
import sys
if sys.version_info < (3, 11):
    sys.exit(f"the TRL venv needs Python >= 3.11, found {sys.version.split()[0]}: set PYTHON=/path/to/python3.11")
PY

if [ ! -x "$VENV/bin/python" ]; then
  echo "setup_trl: creating $VENV"
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
fi

if [ ! -f "$STAMP" ] || [ scripts/setup_trl.sh -nt "$STAMP" ]; then
  echo "setup_trl: installing torch==$TORCH_VERSION, trl==$TRL_VERSION, transformers==$TRANSFORMERS_VERSION into $VENV"
  # torch first and alone, so pip takes the local CPU wheel rather than resolving a CUDA build through trl.
  "$VENV/bin/python" -m pip install --quiet "torch==$TORCH_VERSION"
  "$VENV/bin/python" -m pip install --quiet \
    "torch==$TORCH_VERSION" \
    "trl==$TRL_VERSION" \
    "transformers==$TRANSFORMERS_VERSION" \
    "accelerate==$ACCELERATE_VERSION" \
    "datasets==$DATASETS_VERSION" \
    "reasoning-gym==$REASONING_GYM_VERSION" \
    "math-verify[antlr4_13_2]==$MATH_VERIFY_VERSION" \
    "psutil==$PSUTIL_VERSION"
  # PyPI's torchvision/torchaudio/torchcodec break beside torch 2.13.0 ("operator torchvision::nms does not exist").
  "$VENV/bin/python" -m pip uninstall --quiet --yes torchvision torchaudio torchcodec >/dev/null 2>&1 || true
  "$VENV/bin/python" -c "import torch, transformers, trl; print('setup_trl: torch', torch.__version__, \
'transformers', transformers.__version__, 'trl', trl.__version__)"
  touch "$STAMP"
fi
echo "setup_trl: ready ($VENV)"
