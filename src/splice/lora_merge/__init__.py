"""LoRA-native merging, LoRA extraction and reversible merging of PEFT LoRA adapters.

Each target is kept as factors ΔW = s · B @ A (`splice.delta.LowRank`); methods (`concat`, `svd`,
`ties`, `dare`, `dare_ties`, `knots`, `knots_dare`, `lego`) live in one registry
(`get_lora_method`) and write PEFT adapter folders that `peft.PeftModel.from_pretrained` loads
(reading and writing the folders: `splice.peft`).
"""

from splice.lora_merge.merge import LoraMergeReport, merge_adapters
from splice.lora_merge.registry import (
    LoraMergeMethod,
    LoraMergeOptions,
    all_lora_methods,
    get_lora_method,
)

__all__ = [
    "LoraMergeMethod",
    "LoraMergeOptions",
    "LoraMergeReport",
    "all_lora_methods",
    "get_lora_method",
    "merge_adapters",
]
