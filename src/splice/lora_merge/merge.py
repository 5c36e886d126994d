"""The low-rank merge driver: N PEFT LoRA adapter folders in, one PEFT LoRA adapter folder out.

Thin I/O around a registered low-rank method (`splice.lora_merge.methods`): check the output
folder, load and cross-check the adapters (`splice.peft.lora_reader`), resolve every module's
parameters before any arithmetic, run the method on each module's factors with a
`MergeContext(tensor_name=module, seed=seed)`, and write a PEFT adapter folder atomically from
the first adapter's config. Holds all adapters' factors in memory (adapters are small); the
methods that sparsify form one module's out×in delta at a time.

Reading and writing the folders: `splice.peft`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from splice.delta import LowRank
from splice.io.finite import numerical_errors
from splice.io.output_folder import OutputFolder
from splice.merge.registry import MergeContext, MergeMethod
from splice.peft import read_lora_adapters, write_adapter_files


@dataclass(frozen=True)
class LoraMergeReport:
    out_dir: Path
    method: str
    modules: int
    ranks: dict[str, int]


def merge_adapters(
    adapter_dirs: list[str],
    method: MergeMethod,
    out_dir: str | os.PathLike[str],
    params_for: Callable[[str], dict[str, Any]],
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    overwrite: int | bool = False,
    allow_nonfinite: bool = False,
    info: dict[str, Any] | None = None,
) -> LoraMergeReport:
    """Merge the adapters with the low-rank ``method`` into a PEFT adapter folder at
    ``out_dir``. ``params_for(module)`` gives a module's parameters (recipe names, validated,
    per-model ones as lists). NaN / ±inf in an adapter's factors or in the result is a
    NonFiniteError unless ``allow_nonfinite``; ``info`` is stored in the weights' metadata."""
    assert method.representation == "low_rank", method.label
    folder = OutputFolder(out_dir, overwrite=overwrite, inputs=adapter_dirs).check()
    adapters = read_lora_adapters(adapter_dirs, allow_nonfinite=allow_nonfinite)
    first = adapters[0]
    params = {module: params_for(module) for module in sorted(first.modules)}
    merged: dict[str, LowRank] = {}
    for module, values in params.items():
        loras = [ad.modules[module] for ad in adapters]
        ctx = MergeContext(tensor_name=module, seed=seed)
        with numerical_errors(f"module '{module}': method '{method.label}'"):
            merged[module] = method(None, loras, ctx, **values)
    with folder as tmp:
        write_adapter_files(
            tmp,
            merged,
            first.embedding,
            first.raw_config,
            dtype=dtype,
            metadata={"splice_lora_merge": json.dumps(info or {})},
            allow_nonfinite=allow_nonfinite,
        )
    ranks = {k: max(f.rank, 1) for k, f in merged.items()}
    return LoraMergeReport(Path(out_dir), method.label, len(merged), ranks)
