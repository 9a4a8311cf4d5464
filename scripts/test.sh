#!/usr/bin/env bash
# The test suite: lint, then pytest. Exits non-zero when anything fails.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check lmforge tests benchmarks
exec .venv/bin/python -m pytest -q "$@"
