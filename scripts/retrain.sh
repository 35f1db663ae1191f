#!/usr/bin/env bash
# Retrain a git ref of this project: what .github/workflows/retrain.yml runs, one command.
#   bash scripts/retrain.sh [REF] [--force]        (REF: a branch, tag or commit; default main)
# With PREFECT_API_URL set (team mode: the team's Prefect server), dispatches the deployment
# rlfn-retrain/retrain to it and watches the flow run to its end: a worker of the pool
# rlfn-pool trains, on the team's compute; the exit code is the flow run's. Without it, runs
# the same flow in this process (`python -m pipeline.retrain`: the embedded sample on a CI
# runner). Either way the flow checks out REF, dvc pull, dvc repro, dvc push, lets the promote
# stage decide and pushes the results to the branch retrain/<flow-run-id> (pipeline/retrain.py).
# RLFN_RETRAIN_SUMMARY=FILE: the summary (markdown) written there, from the worker's flow
# run in the dispatched mode (the workflow's step summary).
set -euo pipefail
cd "$(dirname "$0")/.."
ref="main"
force=false
for a in "$@"; do
  case "$a" in
    --force) force=true ;;
    --force=true|--force=false) force="${a#--force=}" ;;
    --force=) force=false ;;
    -h|--help) sed -n 2,12p "$0"; exit 0 ;;
    -*) echo "retrain.sh: unknown option $a (usage: scripts/retrain.sh [REF] [--force])" >&2; exit 2 ;;
    *) ref="$a" ;;
  esac
done
py=python3
[ -x .venv/bin/python ] && py=.venv/bin/python
summary="${RLFN_RETRAIN_SUMMARY:-}"
[ -n "$summary" ] && rm -f "$summary"
if [ -n "${PREFECT_API_URL:-}" ]; then
  echo "retrain: dispatching rlfn-retrain/retrain (ref=$ref, force=$force) to $PREFECT_API_URL"
  out=$(mktemp)
  rc=0
  "$py" -m prefect deployment run rlfn-retrain/retrain --watch \
    --param "ref=$ref" --param "force=$force" 2>&1 | tee "$out" || rc=$?
  id=$(grep -oE 'UUID: [0-9a-f-]{36}' "$out" | head -1 | cut -d' ' -f2 || true)
  rm -f "$out"
  if [ -n "$summary" ] && [ -n "$id" ]; then  # the worker's summary, from Prefect
    "$py" -m pipeline.retrain --summary-of "$id" > "$summary" || true
  fi
else
  echo "retrain: no PREFECT_API_URL: running the flow here (ref=$ref, force=$force)"
  args=(--ref "$ref")
  [ "$force" = true ] && args+=(--force)
  rc=0
  "$py" -m pipeline.retrain "${args[@]}" || rc=$?
fi
if [ -n "$summary" ] && [ ! -s "$summary" ]; then
  echo "# Retrain of \`$ref\`: failed (exit $rc) before writing its summary; see the log" > "$summary"
fi
exit "$rc"
