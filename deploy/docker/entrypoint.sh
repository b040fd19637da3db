#!/bin/sh
# Entry point of the dipo images. A role name runs that service with the mounted run config; anything else is
# executed as given, so `docker run IMAGE dipo config show /etc/dipo/run.yaml` works too.
#   learner            torchrun --nproc_per_node ${NPROC:-1} -m learner --config $DIPO_CONFIG
#   reward             python -m reward_service --config $DIPO_CONFIG
#   rollout            python -m rollout_server --config $DIPO_CONFIG
#   healthcheck PORT   exit 0 when http://127.0.0.1:PORT/health answers 200 (compose healthchecks call this)
# Extra arguments after a role are passed on (e.g. `reward --set reward.verifier_workers=4`).
set -eu

CONFIG="${DIPO_CONFIG:-/etc/dipo/run.yaml}"

case "${1:-}" in
  learner)
    shift
    exec torchrun --nproc_per_node "${NPROC:-1}" -m learner --config "$CONFIG" "$@"
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
  "")
    echo "usage: dipo-entrypoint learner|reward|rollout|healthcheck PORT|COMMAND [ARGS...]" >&2
    exit 2
    ;;
  *)
    exec "$@"
    ;;
esac
