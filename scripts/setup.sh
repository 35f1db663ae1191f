#!/usr/bin/env bash
# Create .venv (Python 3.11) and install the project with its dev, pipeline and infer extras.
# Idempotent. torch is pinned to 2.13.0 in pyproject.toml: the CPU wheel on local disk.
#
# The installer is uv when it can be had (a wheel from the registry, into .venv): it resolves,
# downloads and compiles byte code in parallel, about 4x faster than pip here (30 s vs 2 min on
# a 2-core machine, bench/main_job.py's setup phase). RLFN_SETUP_PIP=1, or no uv, uses pip.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3.11}
command -v "$py" >/dev/null 2>&1 || py=python3
if [ ! -x .venv/bin/python ]; then
  "$py" -m venv .venv
fi
spec='.[dev,pipeline,infer]'
log=$(mktemp)
trap 'rm -f "$log"' EXIT
fail() { cat "$log" >&2; echo "setup: $1" >&2; exit 1; }

# Local wheel folders pip knows (PIP_FIND_LINKS, pip's config): uv does not read pip's config,
# so they are passed on; the torch pin must come from one of them, never from the registry
# (a plain torch there is a multi-GB CUDA build).
links=()
for d in ${PIP_FIND_LINKS:-} $(.venv/bin/python -m pip config get global.find-links 2>/dev/null || true); do
  [ -d "$d" ] && links+=(--find-links "$d")
done
have_local_torch() {
  local d
  for d in ${PIP_FIND_LINKS:-} $(.venv/bin/python -m pip config get global.find-links 2>/dev/null || true); do
    compgen -G "$d/torch-2.13.0*.whl" >/dev/null && return 0
  done
  return 1
}

use_uv=0
if [ "${RLFN_SETUP_PIP:-0}" != 1 ]; then
  if [ -x .venv/bin/uv ] || .venv/bin/python -m pip install -q --disable-pip-version-check uv >"$log" 2>&1; then
    use_uv=1
  else
    echo "setup: uv not available ($(tail -1 "$log")); installing with pip" >&2
  fi
fi
if [ "$use_uv" = 1 ]; then
  if ! .venv/bin/python -c "import torch" 2>/dev/null && ! have_local_torch; then
    # no local torch wheel uv could see: let pip (its own config and caps) install the pin
    .venv/bin/python -m pip install -q --disable-pip-version-check torch==2.13.0 >"$log" 2>&1 \
      || fail "pip install torch==2.13.0 failed"
  fi
  .venv/bin/uv pip install -q --python .venv/bin/python --compile-bytecode "${links[@]}" \
      -e "$spec" >"$log" 2>&1 || fail "uv pip install -e '$spec' failed (RLFN_SETUP_PIP=1 uses pip)"
else
  .venv/bin/python -m pip install -q --disable-pip-version-check -e "$spec" >"$log" 2>&1 \
    || fail "pip install -e '$spec' failed"
  # drop the local package index's noise; keep anything else pip said
  grep -v "is ignored: it is neither a file nor a directory" "$log" || true
fi
.venv/bin/python -c "import rlfn, torch; print(f'rlfn {rlfn.__version__}, torch {torch.__version__}')"
