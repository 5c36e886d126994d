#!/usr/bin/env bash
# Idempotent setup: a virtual environment in .venv with the CPU build of torch first
# (a bare `torch` requirement would pull a multi-GB CUDA build), then splice itself.
# Usage: scripts/setup.sh [EXTRAS]   e.g. scripts/setup.sh dev
# SPLICE_VENV=DIR puts the environment elsewhere (default .venv; CI's user-install check
# builds a second one, .venv-user, with only the demo's extras).
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-hf}"
venv="${SPLICE_VENV:-.venv}"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
. "$venv/bin/activate"
python -m pip install -q --disable-pip-version-check --upgrade pip >/dev/null 2>&1 || true
python -c "import torch" 2>/dev/null || python -m pip install -q --disable-pip-version-check torch==2.13.0
python -m pip install -q --disable-pip-version-check -e ".[${extras}]"
