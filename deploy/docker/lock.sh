#!/usr/bin/env bash
# Regenerates the images' lockfiles from pyproject.toml with `uv pip compile` (exact pins and sha256 hashes, resolved
# from PyPI for Linux x86_64). Run it after changing a dependency; tests/unit/test_deploy.py checks that every lock
# still satisfies pyproject.toml.
#
#   requirements-reward.lock   requirements-reward.txt (the reward image: no torch)
#   requirements-cpu.lock      the project with its `tracking` extra, Python 3.11; torch itself is left out: the cpu
#                              image installs torch==2.13.0 from the PyTorch CPU index first, and the lock holds torch's
#                              own dependencies as the CPU wheel declares them (no CUDA packages)
#   requirements-gpu.lock      the project with its `vllm` and `tracking` extras, Python 3.12 (the vLLM image's), less
#                              what vLLM 0.32.0 itself resolves to at the same versions: those come with the
#                              vllm/vllm-openai base image (torch with its CUDA stack, vLLM), whose tag pins them
#
# Needs uv (pip install uv) and the CPU torch wheel: from the PyTorch CPU index (the default), or from a folder
# given as TORCH_FIND_LINKS=/path/to/wheels on a machine without that index.
set -euo pipefail
cd "$(dirname "$0")/../.."

UV="${UV:-uv}"
OUT=deploy/docker
PLATFORM=x86_64-manylinux_2_28
TORCH_INDEX_URL="${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}"
compile=("$UV" pip compile --quiet --python-platform "$PLATFORM" --no-header --generate-hashes)
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

"${compile[@]}" --python-version 3.11 "$OUT/requirements-reward.txt" -o "$OUT/requirements-reward.lock"

if [ -n "${TORCH_FIND_LINKS:-}" ]; then
  torch_source=(--find-links "$TORCH_FIND_LINKS")
else
  torch_source=(--extra-index-url "$TORCH_INDEX_URL" --index-strategy unsafe-best-match)
fi
"${compile[@]}" --python-version 3.11 "${torch_source[@]}" --no-emit-package torch --extra tracking \
  pyproject.toml -o "$OUT/requirements-cpu.lock"

# The vLLM image's own stack: what vllm==0.32.0 with torch==2.13.0 resolves to without the project.
printf 'vllm==0.32.0\ntorch==2.13.0\n' > "$tmp/vllm.txt"
"$UV" pip compile --quiet --python-platform "$PLATFORM" --python-version 3.12 --no-header "$tmp/vllm.txt" \
  -o "$tmp/vllm.lock"
"$UV" pip compile --quiet --python-platform "$PLATFORM" --python-version 3.12 --no-header --extra vllm \
  --extra tracking pyproject.toml "$tmp/vllm.txt" -o "$tmp/project.lock"
mapfile -t provided < <(python3 - "$tmp/vllm.lock" "$tmp/project.lock" <<'PY'
import re, sys
def pins(path):
    found = {}
    for line in open(path):
        match = re.match(r"^([A-Za-z0-9_.\-]+)==(\S+)", line)
        if match:
            found[match.group(1).lower()] = match.group(2)
    return found
image, project = pins(sys.argv[1]), pins(sys.argv[2])
# the image provides a package when the project resolves it to the version vLLM alone does
print("\n".join(sorted(name for name, version in project.items() if image.get(name) == version)))
PY
)
no_emit=()
for name in "${provided[@]}"; do no_emit+=(--no-emit-package "$name"); done
"${compile[@]}" --python-version 3.12 --extra vllm --extra tracking "${no_emit[@]}" pyproject.toml "$tmp/vllm.txt" \
  -o "$OUT/requirements-gpu.lock"
echo "lock.sh: wrote $OUT/requirements-{reward,cpu,gpu}.lock"
