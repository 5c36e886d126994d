#!/usr/bin/env python
"""Mixed-adapter forward: another git revision's code (before) against the working tree's
(after), interleaved in one process on the same model and inputs.

Run by hand from the repository root (needs git and the packaged SmolLM2, as
`benchmarks/mixed_batch.py`):

    python benchmarks/mixed_batch_ab.py --ref main --types lora,loha --counts 1,32
    python benchmarks/mixed_batch_ab.py --ref main --decode     # 16 rows x 1 token, 64 LoRAs

The revision's `splice/adapters/mixed_batch.py`, `mixed_kernels.py` and `mixed_structured.py`
are loaded as separate modules (`before_mixed_batch` importing `before_mixed_kernels` and
`before_mixed_structured`); both versions run on the same
`AdapterModel` (`plan_rows` + `mixed_forward` of each), after a check that their logits agree
(1e-3: float32 summation order). Per configuration: one warm-up each, then --reps rounds with
the order rotated; medians (wall time, or with --clock cpu --threads 1 this thread's CPU time:
on a shared machine the steadier one); ratios to the base model alone. Prefill: --rows x
--tokens random ids, row r names adapter r mod n (adapters as in `benchmarks/mixed_batch.py`).
Decode: 64 LoRA r8 adapters on q/k/v/o loaded, 16 rows of one token, 16 distinct adapters vs
one.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import mixed_batch as mb


def load_before(ref: str, folder: Path):
    """The revision's mixed_batch / mixed_kernels / mixed_structured (where it has one) as
    modules ``before_*``."""
    for name in ("mixed_structured", "mixed_kernels", "mixed_batch"):
        shown = subprocess.run(
            ["git", "show", f"{ref}:src/splice/adapters/{name}.py"],
            capture_output=True, text=True,
        )  # fmt: skip
        if shown.returncode != 0 and name == "mixed_structured":
            continue  # older revisions: no structured kernels
        shown.check_returncode()
        src = shown.stdout
        for dep in ("mixed_kernels", "mixed_structured"):
            src = src.replace(f"from splice.adapters.{dep} import", f"from before_{dep} import")
        (folder / f"before_{name}.py").write_text(src)
    sys.path.insert(0, str(folder))
    import before_mixed_batch

    return before_mixed_batch


def run(module, am, names: list[str], **inputs):
    plan = module.plan_rows(am, names, len(names))
    with module.mixed_forward(am, plan):
        return am.model(**inputs)


def bench(variants: dict, reps: int, clock=time.perf_counter) -> dict[str, float]:
    keys = list(variants)
    times: dict[str, list[float]] = {k: [] for k in keys}
    with torch.no_grad():
        for k in keys:
            variants[k]()
        for rep in range(reps):
            for k in keys[rep % len(keys) :] + keys[: rep % len(keys)]:
                start = clock()
                variants[k]()
                times[k].append(clock() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def check(before, after, am, names: list[str], **inputs) -> None:
    with torch.no_grad():
        a = run(before, am, names, **inputs).logits
        b = run(after, am, names, **inputs).logits
    diff = (a - b).abs().max().item()
    assert diff < 1e-3, f"before and after differ by {diff:.3g}"


def main() -> None:
    from splice.adapters import AdapterModel, make_config
    from splice.adapters import mixed_batch as after

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ref", default="main")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--types", default="lora,dora,ia3,vera,loha,lokr,oft,hra,mix")
    ap.add_argument("--counts", default="1,32")
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--decode", action="store_true")
    ap.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="cpu: this thread's CPU time (time.thread_time), with --threads 1 only: all "
        "compute then runs on this thread, and time spent descheduled by other processes on "
        "a shared machine is not counted",
    )
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if a.clock == "cpu" and a.threads != 1:
        ap.error("--clock cpu needs --threads 1 (other threads' work is not counted)")
    clock = time.thread_time if a.clock == "cpu" else time.perf_counter
    with tempfile.TemporaryDirectory() as tmp:
        before = load_before(a.ref, Path(tmp))
    base = mb.load_base()
    if a.decode:
        am = AdapterModel(copy.deepcopy(base)).eval()
        targets = ["q_proj", "k_proj", "v_proj", "o_proj"]
        cfg = make_config("lora", {"r": 8, "lora_alpha": 16, "target_modules": targets})
        for i in range(64):
            am.add_adapter(f"a{i}", cfg)
            mb.perturb(am.adapter_parameters(f"a{i}"), seed=i)
        ids = torch.randint(0, 1000, (16, 1), generator=torch.Generator().manual_seed(0))
        many, one = [f"a{i * 4}" for i in range(16)], ["a0"] * 16
        check(before, after, am, many, input_ids=ids)
        t = bench({
            "base": lambda: base(input_ids=ids),
            "before_one": lambda: run(before, am, one, input_ids=ids),
            "after_one": lambda: run(after, am, one, input_ids=ids),
            "before_many": lambda: run(before, am, many, input_ids=ids),
            "after_many": lambda: run(after, am, many, input_ids=ids),
        }, a.reps, clock)  # fmt: skip
        print(", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in t.items()))
        print(f"16 distinct / 1 adapter: before {t['before_many'] / t['before_one']:.2f}x, "
              f"after {t['after_many'] / t['after_one']:.2f}x")  # fmt: skip
        return
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, base.config.vocab_size, (a.rows, a.tokens), generator=gen)
    counts = [int(c) for c in a.counts.split(",")]
    for label in a.types.split(","):
        am = mb.splice_model(base, label, max(counts))
        for n in counts:
            names = [f"a{r % n}" for r in range(a.rows)]
            check(before, after, am, names, input_ids=ids)
            t = bench({
                "base": lambda: base(input_ids=ids),
                "before": lambda m=am, r=names: run(before, m, r, input_ids=ids),
                "after": lambda m=am, r=names: run(after, m, r, input_ids=ids),
            }, a.reps, clock)  # fmt: skip
            b = t["base"]
            print(f"{label} x{n}: base {b * 1e3:.0f} ms, before {t['before'] / b:.3f}x, "
                  f"after {t['after'] / b:.3f}x; after/before {t['after'] / t['before']:.3f}",
                  flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
