"""`splice.peft`: the PEFT adapter folder format, read and written in one place.

Layered above `splice.io` and `splice.delta`, below `splice.adapters`, `splice.lora_merge` and
`splice.reference`:

    files            the folder's files and names: adapter_config.json, the weights file,
                     `saved_key`, `write_adapter_folder_files` (the one writer)
    lora_config      a LoRA config's fields: targets, rank/alpha patterns, scale, DoRA, ...
    lora_keys        LoRA saved key names, in both directions
    lora_reader      a LoRA folder as typed deltas (LowRank, Folded DoRA, Dense lora_bias)
    lora_writer      LowRank deltas written as a LoRA folder PEFT loads
    checkpoint_keys  module paths to base checkpoint keys, as transformers renames them
    fold             BASE+ADAPTER for LoRA / DoRA: PEFT's merge_and_unload, tensor by tensor
"""

from splice.peft.files import read_config
from splice.peft.fold import LoraFoldedReader
from splice.peft.lora_reader import LoadedAdapter, LoraFolder, read_lora_adapter, read_lora_adapters
from splice.peft.lora_writer import write_adapter_files, write_lora_adapter

__all__ = [
    "LoadedAdapter",
    "LoraFoldedReader",
    "LoraFolder",
    "read_config",
    "read_lora_adapter",
    "read_lora_adapters",
    "write_adapter_files",
    "write_lora_adapter",
]
