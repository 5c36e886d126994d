"""LoRA-native merging, LoRA extraction and reversible merging of PEFT LoRA adapters.

Each target is kept as factors ΔW = s · B @ A (`splice.delta.LowRank`). The low-rank merge
methods (`concat`, `svd`, `ties`, `dare`, `dare_ties`, `knots`, `knots_dare`, `lego`) are
registered in the one merge registry with ``representation="low_rank"`` (importing this
package registers them; `get_method("lora:svd")`); a recipe over PEFT LoRA adapter folders
runs them (`recipe.route`) and writes a PEFT adapter folder that
`peft.PeftModel.from_pretrained` loads.
"""

import splice.lora_merge.methods  # noqa: F401  (registers the low-rank merge methods)
from splice.lora_merge.merge import LoraMergeReport, merge_adapters
from splice.lora_merge.recipe import RoutedRecipe, merge_low_rank_recipe, route

__all__ = [
    "LoraMergeReport",
    "RoutedRecipe",
    "merge_adapters",
    "merge_low_rank_recipe",
    "route",
]
