#!/usr/bin/env bash
# Team mode's service stack on 127.0.0.1: PostgreSQL, MLflow server (basic auth), Prefect server
# (API auth) with the work pool rlfn-pool, prefect.yaml's deployments and a worker, and an sshd
# for the DVC remote `stack`; the served endpoint `serve` (nginx in front of mlflow models serve
# of the champion) and the `webhooks` receiver that rolls it when the champion moves. State
# under .stack/ (RLFN_STACK_DIR). See scripts/stack/ (its table: scripts/stack/services.py).
#   scripts/stack.sh up [--host ADDR]  start what is not running (idempotent); non-zero if any
#                             fails; off 127.0.0.1 (--host, RLFN_STACK_HOST) over TLS, see README
#   scripts/stack.sh env [--bundle FILE]  export lines for a shell: eval "$(scripts/stack.sh env)"
#   scripts/stack.sh bundle FILE  the team's bundle (owner-only) for other hosts
#   scripts/stack.sh status   each service, its URL and health; non-zero if any is down
#   scripts/stack.sh down     stop them all, keeping the data
#   scripts/stack.sh rotate NAME...|all  new values for those secrets, applied, every service
#                             restarted; other hosts then need a new bundle
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
py="$root/.venv/bin/python"
if [ ! -x "$py" ]; then  # the servers and the stack's own code (rlfn.io) live in the venv
  echo "error: $py: no project environment (run: bash scripts/setup.sh)" >&2
  exit 2
fi
exec "$py" "$root/scripts/stack" "$@"
