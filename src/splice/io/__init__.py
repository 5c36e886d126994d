"""Checkpoint input and output: lazy readers, a streaming sharded writer (LoRA folding:
`splice.peft`)."""

from splice.io.base import CheckpointReader, TensorInfo
from splice.io.gguf_reader import GgufReader
from splice.io.open import model_dir_of, open_path
from splice.io.safetensors_reader import SafetensorsReader
from splice.io.shard_plan import ShardPlan, plan_shards
from splice.io.sharded_reader import ShardedReader
from splice.io.sizes import SizeError, parse_size
from splice.io.torch_reader import TorchReader
from splice.io.writer import ShardedWriter

__all__ = [
    "CheckpointReader",
    "GgufReader",
    "SafetensorsReader",
    "ShardPlan",
    "ShardedReader",
    "ShardedWriter",
    "SizeError",
    "TensorInfo",
    "TorchReader",
    "model_dir_of",
    "open_path",
    "parse_size",
    "plan_shards",
]
