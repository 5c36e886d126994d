#!/usr/bin/env bash
# The README's second command: install with the dev extras, lint, run the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev
. .venv/bin/activate
ruff check .
HF_HUB_OFFLINE=1 python -m pytest "$@"
