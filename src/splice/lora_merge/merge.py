"""Merge N PEFT LoRA adapter folders into one, module by module, with a registered method.

Thin I/O around the pure methods: load and cross-check the adapters
(`splice.peft.lora_reader`), check the options before any arithmetic, run the method on each
module's factors with a `MergeContext(tensor_name=module, seed=seed)`, and write a PEFT adapter
folder atomically (`splice.peft.lora_writer`) from the first adapter's config. Holds all
adapters' factors in memory (adapters are small); the dense methods form one module's out×in
delta at a time.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from splice.delta import LowRank
from splice.io.finite import numerical_errors
from splice.io.output_folder import OutputFolder
from splice.lora_merge.registry import LoraMergeOptions, get_lora_method
from splice.merge.registry import MergeContext
from splice.peft import read_lora_adapters, write_adapter_files


@dataclass(frozen=True)
class LoraMergeReport:
    out_dir: Path
    method: str
    modules: int
    ranks: dict[str, int]


def merge_adapters(
    adapter_dirs: list[str | Path],
    method: str,
    out_dir: str | Path,
    *,
    weights: list[float] | None = None,
    opts: LoraMergeOptions | None = None,
    overwrite: int | bool = False,
    dtype: torch.dtype = torch.float32,
    allow_nonfinite: bool = False,
) -> LoraMergeReport:
    """Merge the adapters with `method` and write the result to `out_dir`. NaN / ±inf in
    an adapter's factors or in the result is a NonFiniteError unless ``allow_nonfinite``."""
    opts = opts or LoraMergeOptions()
    m = get_lora_method(method)
    weights = [1.0] * len(adapter_dirs) if weights is None else list(weights)
    m.validate(opts, len(adapter_dirs), weights)
    folder = OutputFolder(out_dir, overwrite=overwrite, inputs=adapter_dirs).check()
    adapters = read_lora_adapters(adapter_dirs, allow_nonfinite=allow_nonfinite)
    first = adapters[0]
    merged: dict[str, LowRank] = {}
    for module in sorted(first.modules):
        loras = [ad.modules[module] for ad in adapters]
        ctx = MergeContext(tensor_name=module, seed=opts.seed)
        with numerical_errors(f"module '{module}': method '{method}'"):
            merged[module] = m.fn(loras, weights, opts, ctx)
    info = {
        "method": method,
        "adapters": [str(ad.path) for ad in adapters],
        "weights": weights,
        "rank": opts.rank,
        "density": opts.density,
        "lambda": opts.lambda_,
        "seed": opts.seed,
    }
    with folder as tmp:
        write_adapter_files(
            tmp,
            merged,
            first.embedding,
            first.raw_config,
            dtype=dtype,
            metadata={"splice_lora_merge": json.dumps(info)},
            allow_nonfinite=allow_nonfinite,
        )
    out = Path(out_dir)
    return LoraMergeReport(out, method, len(merged), {k: max(f.rank, 1) for k, f in merged.items()})
