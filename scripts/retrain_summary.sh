#!/usr/bin/env bash
# Markdown summary of a retrain (.github/workflows/retrain.yml): the promotion decision that
# the promote stage wrote to reports/promotion.json (pipeline/promote.py, keys from
# pipeline.mlflow_registry.promote) and the `dvc metrics diff BASE --md` table. Writes to stdout; the
# workflow appends it to $GITHUB_STEP_SUMMARY and posts it as a PR comment.
#
#   usage: scripts/retrain_summary.sh PROMOTE_JSON DIFF_MD BASE [NOTE]
#     PROMOTE_JSON  reports/promotion.json
#     DIFF_MD       a file with the output of `dvc metrics diff BASE --md` (empty/missing: no diff)
#     BASE          the git revision the diff compares against (shown in the heading)
#     NOTE          optional warning shown first (e.g. the decision is not this run's)
#
# A missing or unreadable decision is reported, not an error: the summary is also written after
# a failed `dvc repro`. Needs python3 (or $PYTHON) for the JSON.
set -euo pipefail

if [ "$#" -lt 3 ] || [ "$#" -gt 4 ]; then
  echo "usage: $0 PROMOTE_JSON DIFF_MD BASE [NOTE]" >&2
  exit 2
fi
promote_json=$1
diff_md=$2
base=$3
note=${4:-}
py=${PYTHON:-python3}

echo "## RLFN retrain"
echo
if [ -n "$note" ]; then
  echo "> **Note:** $note"
  echo
fi
"$py" - "$promote_json" <<'PY'
import json
import sys

path = sys.argv[1]
try:
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    d = data["decision"]
    if not isinstance(d, dict):
        raise TypeError("'decision' is not an object")
except FileNotFoundError:
    print(f"**Promotion: no decision**: `{path}` not found (the promote stage did not run).")
    sys.exit(0)
except (OSError, ValueError, KeyError, TypeError) as e:
    print(f"**Promotion: no decision**: `{path}` is unreadable ({type(e).__name__}: {e}).")
    sys.exit(0)

def md(x):
    return str(x).replace("|", "\\|").replace("\n", " ")

promoted = bool(d.get("promoted", data.get("promoted")))
reason = md(d.get("reason") or "no reason given")
name = d.get("registered_model", "?")
alias = d.get("alias", "champion")
cand, champ = d.get("candidate_version"), d.get("champion_version")
if promoted:
    print(f"**Promotion: promoted**: `{name}` v{cand} is now `@{alias}`: {reason}")
else:
    kept = f"v{champ}" if champ is not None else "unset"
    print(f"**Promotion: not promoted: {reason}** (`{name}@{alias}` stays {kept})")
print()
gate = d.get("gate_metric", "?")
budget = d.get("runtime_budget_ms")
print(f"Gate: `{gate}` must beat the champion by more than {d.get('margin', '?')} dB"
      + (f", CPU runtime at most {budget} ms" if budget is not None else "")
      + f". Decided {d.get('decided_at', '?')} (lock: {d.get('lock', '?')}).")
cf, hf = d.get("candidate_figures") or {}, d.get("champion_figures") or {}
keys = sorted(set(cf) | set(hf), key=lambda k: (k != gate, k != "runtime_ms_cpu", k))
if keys:
    print()
    print(f"| figure | candidate v{cand} | champion " + (f"v{champ}" if champ is not None else "(none)") + " |")
    print("| --- | --- | --- |")
    for k in keys:
        print(f"| {md(k)} | {md(cf.get(k, '-'))} | {md(hf.get(k, '-'))} |")
PY
echo
echo "### Metrics vs \`$base\` (\`dvc metrics diff\`)"
echo
if [ -s "$diff_md" ]; then
  cat "$diff_md"
else
  echo "No metric changed (or no diff was available)."
fi
