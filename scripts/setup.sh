#!/usr/bin/env bash
# Creates .venv (if missing) and installs lmforge with its test extras. Safe to run again: it skips
# the install when pyproject.toml has not changed since the last one.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 10))' || { echo "lmforge needs Python >= 3.10" >&2; exit 1; }
# The web chat test (tests/test_serve_browser.py) drives Debian's chromium; CI installs it, elsewhere the test skips.
if [ "${CI:-}" = "true" ] && ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
  echo "[setup] installing chromium for the browser test"
  apt-get install -y -q chromium chromium-driver >/dev/null 2>&1 \
    || { apt-get update -q && apt-get install -y -q chromium chromium-driver; } \
    || echo "[setup] could not install chromium; the browser test will skip" >&2
fi
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.lmforge-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && .venv/bin/python -c 'import lmforge, torch' 2>/dev/null; then
  exit 0
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1
# torch first and pinned: an unpinned torch (or a range, via a dependency) pulls GBs of CUDA wheels.
if ! .venv/bin/python -c 'import torch' 2>/dev/null; then
  echo "[setup] installing torch==2.13.0 (CPU)"
  .venv/bin/python -m pip install -q "torch==2.13.0"
fi
echo "[setup] installing lmforge and its test extras"
.venv/bin/python -m pip install -q "torch==$(.venv/bin/python -c 'import torch; print(torch.__version__.split("+")[0])')" -e ".[dev]"
echo "$want" > "$stamp"
