"""The low-rank merge driver: N PEFT LoRA adapter folders in, one PEFT LoRA adapter folder out.

Thin I/O around a registered low-rank method (`splice.lora_merge.methods`): check the output
folder, load and cross-check the adapters (`adapters.py`), resolve every module's parameters
before any arithmetic, run the method on each module's factors with a
`MergeContext(tensor_name=module, seed=seed)`, and write a PEFT adapter folder atomically from
the first adapter's config. Holds all adapters' factors in memory (adapters are small); the
methods that sparsify form one module's out×in delta at a time.

This module is the one place the LoRA merge path touches the PEFT folder format (reading,
writing, telling an adapter folder from a checkpoint).
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
from splice.errors import CheckpointError, SpliceError
from splice.io.finite import numerical_errors
from splice.io.output_folder import OutputFolder
from splice.io.peft_adapter import CONFIG_NAME
from splice.io.safe_paths import member
from splice.io.textfile import load_json_object
from splice.lora_merge.adapters import load_adapters
from splice.lora_merge.peft_writer import write_adapter_files
from splice.merge.registry import MergeContext, MergeMethod


def adapter_type(ref: str) -> str | None:
    """The `peft_type` of a bare PEFT adapter folder (None: not an adapter folder, e.g. a
    checkpoint or a `BASE+ADAPTER` reference). A config without peft_type reads as LORA."""
    if not Path(ref).is_dir() or not (Path(ref) / CONFIG_NAME).exists():
        return None
    try:
        path = member(Path(ref), CONFIG_NAME)
        raw = load_json_object(path, CheckpointError) if path is not None else {}
    except SpliceError:
        return "LORA"  # the loader reports what is wrong with it
    return str(raw.get("peft_type", "LORA"))


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
    adapters = load_adapters(adapter_dirs, allow_nonfinite=allow_nonfinite)
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
