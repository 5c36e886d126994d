#!/usr/bin/env python
"""Adapter training speed and memory: splice against PEFT, same model, data and settings.

Run by hand (not in CI), from the repository root with the dev environment active:

    python benchmarks/adapter_train.py                      # LoRA and DoRA, 3 runs each
    python benchmarks/adapter_train.py --methods lora --runs 1 --steps 5   # a quick check

Setup (the issue's): SmolLM2-135M-Instruct (float32, from the packaged GGUF, converted once
to an HF folder by `splice.train.models`), LoRA r=8, alpha 16 on q_proj and v_proj (and the
same with DoRA), sequence length 64, batch --batch (default 8), AdamW lr 1e-4. The batches
are real text: BBC news articles (`splice.data`) tokenized and cut to 64 tokens; every
step sees the same batches in both tools.

Each (tool, method, run) is a fresh subprocess (imports, model load, adapter injection,
--warmup untimed steps, then --steps timed optimizer steps), so peak RSS (the kernel's
ru_maxrss of that process) is its own. Runs are interleaved (splice, PEFT, splice, ...) so
drift in machine load hits both tools alike. The table reports the median steps/s and
peak RSS per tool and the ratios splice / PEFT. Results go to --out (JSON).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path


def child(
    tool: str, method: str, steps: int, warmup: int, batch: int, seq: int, threads: int
) -> dict:
    import torch

    torch.set_num_threads(threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from splice.data import load_task
    from splice.train.models import resolve_model

    folder = resolve_model("smollm2")
    tok = AutoTokenizer.from_pretrained(folder)
    texts = list(load_task("bbc_news").texts[: batch * 4])
    enc = tok(texts, truncation=True, max_length=seq, padding="max_length", return_tensors="pt")
    batches = [
        {
            "input_ids": enc["input_ids"][i : i + batch],
            "attention_mask": enc["attention_mask"][i : i + batch],
            "labels": enc["input_ids"][i : i + batch],
        }
        for i in range(0, len(texts), batch)
    ]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    targets = ["q_proj", "v_proj"]
    dora = method == "dora"
    if tool == "peft":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(
            model, LoraConfig(r=8, lora_alpha=16, target_modules=targets, use_dora=dora)
        )
    else:
        from splice.adapters import AdapterModel, LoraConfig

        model = AdapterModel(model)
        model.add_adapter(
            "default", LoraConfig(r=8, lora_alpha=16, target_modules=targets, use_dora=dora)
        )
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step(i: int) -> float:
        loss = model(**batches[i % len(batches)]).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.item()

    for i in range(warmup):
        step(i)
    start = time.perf_counter()
    losses = [step(warmup + i) for i in range(steps)]
    seconds = time.perf_counter() - start
    return {
        "tool": tool,
        "method": method,
        "steps_per_s": steps / seconds,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "trainable": sum(p.numel() for p in params),
        "first_loss": losses[0],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default="lora,dora")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=".bench/adapter_train.json")
    ap.add_argument("--child", nargs=2, metavar=("TOOL", "METHOD"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(*a.child, a.steps, a.warmup, a.batch, a.seq, a.threads)))
        return
    results: list[dict] = []
    for method in a.methods.split(","):
        for run in range(a.runs):
            for tool in ("splice", "peft") if run % 2 == 0 else ("peft", "splice"):
                cmd = [sys.executable, __file__, "--child", tool, method]
                cmd += ["--steps", str(a.steps), "--warmup", str(a.warmup), "--batch", str(a.batch)]
                cmd += ["--seq", str(a.seq), "--threads", str(a.threads)]
                out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
                r = json.loads(out.strip().splitlines()[-1])
                print(
                    f"{method} run {run} {tool}: {r['steps_per_s']:.3f} steps/s, "
                    f"{r['peak_rss_mb']:.0f} MB",
                    flush=True,
                )
                results.append(r)
    head = ["method", "splice steps/s", "PEFT steps/s", "speed", "splice peak RSS"]
    head += ["PEFT peak RSS", "memory"]
    print("\n| " + " | ".join(head) + " |")
    print("|---" * len(head) + "|")
    for method in a.methods.split(","):

        def med(tool: str, key: str, method: str = method) -> float:
            rows = [r for r in results if r["tool"] == tool and r["method"] == method]
            return statistics.median(r[key] for r in rows)

        s, p = med("splice", "steps_per_s"), med("peft", "steps_per_s")
        sm, pm = med("splice", "peak_rss_mb"), med("peft", "peak_rss_mb")
        cells = [method, f"{s:.3f}", f"{p:.3f}", f"{s / p:.2f}×", f"{sm:.0f} MB", f"{pm:.0f} MB"]
        print("| " + " | ".join([*cells, f"{sm / pm:.2f}×"]) + " |")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"args": vars(a), "results": results}, indent=2))


if __name__ == "__main__":
    main()
