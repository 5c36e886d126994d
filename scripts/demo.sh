#!/usr/bin/env bash
# The README's first command: install, then run the embedded default job (`splice demo`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh hf
. .venv/bin/activate
HF_HUB_OFFLINE=1 splice demo "$@"
