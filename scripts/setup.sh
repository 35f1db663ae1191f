#!/usr/bin/env bash
# Create .venv (Python 3.11) and install the project with its dev, pipeline and infer extras. Idempotent.
# torch is pinned to 2.13.0 in pyproject.toml: pip takes the CPU wheel from local disk.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3.11}
command -v "$py" >/dev/null 2>&1 || py=python3
if [ ! -x .venv/bin/python ]; then
  "$py" -m venv .venv
fi
log=$(mktemp)
if ! .venv/bin/python -m pip install -q --disable-pip-version-check -e '.[dev,pipeline,infer]' >"$log" 2>&1; then
  cat "$log" >&2; rm -f "$log"; echo "setup: pip install failed" >&2; exit 1
fi
# drop the local package index's noise; keep anything else pip said
grep -v "is ignored: it is neither a file nor a directory" "$log" || true
rm -f "$log"
.venv/bin/python -c "import rlfn, torch; print(f'rlfn {rlfn.__version__}, torch {torch.__version__}')"
