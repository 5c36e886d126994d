"""LoRA-native merging, LoRA extraction and reversible merging of PEFT LoRA adapters.

Each target is kept as factors ΔW = s · B @ A (`splice.delta.LowRank`); methods (`concat`, `svd`,
`ties`, `dare`, `dare_ties`, `knots`, `knots_dare`, `lego`) live in one registry
(`get_lora_method`) and write PEFT adapter folders that `peft.PeftModel.from_pretrained` loads.
"""

from splice.lora_merge.adapters import LoadedAdapter, load_adapter, load_adapters
from splice.lora_merge.merge import LoraMergeReport, merge_adapters
from splice.lora_merge.peft_writer import write_lora_adapter
from splice.lora_merge.registry import (
    LoraMergeMethod,
    LoraMergeOptions,
    all_lora_methods,
    get_lora_method,
)

__all__ = [
    "LoadedAdapter",
    "LoraMergeMethod",
    "LoraMergeOptions",
    "LoraMergeReport",
    "all_lora_methods",
    "get_lora_method",
    "load_adapter",
    "load_adapters",
    "merge_adapters",
    "write_lora_adapter",
]
