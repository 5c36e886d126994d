"""Write LoRA factors as a PEFT LoRA adapter folder, atomically.

Output: `adapter_config.json` + `adapter_model.safetensors` with PEFT's saved key names
(`base_model.model.<module>.lora_A.weight` / `.lora_B.weight`, or `.lora_embedding_A` /
`.lora_embedding_B` for embeddings), loadable by `peft.PeftModel.from_pretrained`.

Scaling: each module's scale is folded into B and its lora_alpha set to its rank r, so PEFT's
scaling alpha / r is 1 (use_rslora is switched off). The config's `r` / `lora_alpha` is the
most common rank (ties: the smallest); modules of another rank get `rank_pattern` and
`alpha_pattern` entries keyed by their escaped full module name (PEFT matches a pattern P
with `re.match(rf"(.*\\.)?({P})$", key)`, so the escaped name matches that module only).
Other config fields (target_modules, base_model_name_or_path, task_type, ...) come from the
template config, with modules_to_save and lora_bias cleared.

Atomicity: `write_lora_adapter` writes through `splice.io.output_folder.OutputFolder` (lock,
`<out>.splice-partial/`, overwrite rule, permissions, rename into place); commands that do
heavy work first open the `OutputFolder` themselves, before that work, and call
`write_adapter_files` into its partial folder (the files themselves: `files`).
"""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from splice.delta import LowRank
from splice.io.output_folder import OutputFolder
from splice.peft.files import write_adapter_folder_files
from splice.peft.lora_keys import factor_keys


def adapter_tensors(
    modules: dict[str, LowRank], embedding: dict[str, bool], dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """PEFT's saved tensors for the factors (scale folded into B)."""
    out: dict[str, torch.Tensor] = {}
    for module, f in sorted(modules.items()):
        a_key, b_key = factor_keys(module, embedding.get(module, False))
        out[a_key] = f.a.to(dtype).contiguous()
        out[b_key] = (f.b * f.scaling).to(dtype).contiguous()
    return out


def adapter_config(template: dict[str, Any], ranks: dict[str, int]) -> dict[str, Any]:
    """The template config with r / lora_alpha / rank_pattern / alpha_pattern for `ranks`."""
    counts = Counter(ranks.values())
    top = max(counts.values())
    r = min(k for k, v in counts.items() if v == top)
    pattern = {re.escape(m): k for m, k in sorted(ranks.items()) if k != r}
    config = dict(template)
    config.update(
        peft_type="LORA",
        r=r,
        lora_alpha=r,
        use_rslora=False,
        rank_pattern=pattern,
        alpha_pattern=dict(pattern),
        modules_to_save=None,
        lora_bias=False,
        use_dora=False,
    )
    return config


def write_adapter_files(
    folder: Path,
    modules: dict[str, LowRank],
    embedding: dict[str, bool],
    template: dict[str, Any],
    *,
    dtype: torch.dtype = torch.float32,
    extra_files: dict[str, bytes] | None = None,
    metadata: dict[str, str] | None = None,
    allow_nonfinite: bool = False,
) -> None:
    """Write the factors' PEFT files into `folder` (an `OutputFolder`'s partial folder).
    A saved tensor holding NaN / ±inf (after the cast to ``dtype``) is a NonFiniteError,
    raised before anything is written, unless ``allow_nonfinite``."""
    ranks = {m: max(f.rank, 1) for m, f in modules.items()}
    fixed = {
        m: f
        if f.rank > 0
        else LowRank(f.b.new_zeros(f.b.shape[0], 1), f.a.new_zeros(1, f.a.shape[1]))
        for m, f in modules.items()
    }
    write_adapter_folder_files(
        folder,
        adapter_config(template, ranks),
        adapter_tensors(fixed, embedding, dtype),
        metadata=metadata,
        extra_files=extra_files,
        allow_nonfinite=allow_nonfinite,
    )


def write_lora_adapter(
    out_dir: str | os.PathLike[str],
    modules: dict[str, LowRank],
    embedding: dict[str, bool],
    template: dict[str, Any],
    *,
    dtype: torch.dtype = torch.float32,
    overwrite: int | bool = False,
    extra_files: dict[str, bytes] | None = None,
    metadata: dict[str, str] | None = None,
    inputs: Iterable[str | os.PathLike[str]] = (),
    allow_nonfinite: bool = False,
) -> Path:
    """Write the factors as a PEFT adapter folder at `out_dir` (atomic rename at the end)."""
    with OutputFolder(out_dir, overwrite=overwrite, inputs=inputs) as tmp:
        write_adapter_files(
            tmp,
            modules,
            embedding,
            template,
            dtype=dtype,
            extra_files=extra_files,
            metadata=metadata,
            allow_nonfinite=allow_nonfinite,
        )
    return Path(out_dir)
