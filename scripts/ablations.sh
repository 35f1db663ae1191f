#!/usr/bin/env bash
# Every ablation of params.yaml's `ablation.variants` (aliases such as ws_1 skipped: the report
# shows their target) as a DVC experiment `abl-<name>`, run one after another in the workspace,
# then reports/ablations.md + reports/ablations.png from `dvc exp show --json`.
#
#   scripts/ablations.sh                 # all variants (small default: ~8 min on 2 CPU cores)
#   scripts/ablations.sh rfdb clr        # only these (the report still lists all)
#   ABLATION_ARGS='-S ablation.base.iterations=200000 ...' scripts/ablations.sh   # full scale
#
# One variant alone: dvc exp run experiments/dvc.yaml:ablate -S ablation.name=rfdb -n abl-rfdb -f
# params.yaml is restored afterwards (dvc exp run -S edits it in the workspace).
set -euo pipefail
cd "$(dirname "$0")/.."
mapfile -t all < <(python - <<'PY'
import yaml
v = yaml.safe_load(open("params.yaml"))["ablation"]["variants"]
print("\n".join(n for n, s in v.items() if "same_as" not in (s or {})))
PY
)
names=("$@")
[ ${#names[@]} -eq 0 ] && names=("${all[@]}")
for n in "${names[@]}"; do   # a wrong name: a clear error before anything runs
  if ! printf '%s\n' "${all[@]}" | grep -qx -- "$n"; then
    echo "error: unknown ablation '$n'; known: ${all[*]}" >&2
    exit 2
  fi
done
cp params.yaml .params.yaml.ablations-backup
trap 'mv -f .params.yaml.ablations-backup params.yaml' EXIT
t0=$(date +%s)
for n in "${names[@]}"; do
  echo "=== ablation $n ($(( ($(date +%s) - t0) / 60 )) min so far)"
  # shellcheck disable=SC2086  # ABLATION_ARGS holds several -S options
  dvc exp run experiments/dvc.yaml:ablate -S "ablation.name=$n" ${ABLATION_ARGS:-} \
    --name "abl-$n" --force
done
mkdir -p reports
dvc exp show --json --all-commits > reports/ablations_exp_show.json
python -m pipeline.ablation_report --input reports/ablations_exp_show.json
echo "ablations: ${#names[@]} experiment(s) + report in $(( ($(date +%s) - t0 + 30) / 60 )) min"
