#!/usr/bin/env bash
# The main job: the whole lifecycle on a corpus built from this machine's Python stdlib.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/lmforge quickstart "$@"
