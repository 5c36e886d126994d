"""Multi-task compression: N fine-tuned checkpoints stored as one shared task vector plus
bit-packed per-task masks (TALL masks, EMR-Merging: methods of `splice.compress.registry`),
and restoring any task's model."""

from splice.compress.packed import Manifest
from splice.compress.registry import all_compression_methods, compress, get_compression_method
from splice.compress.stream import CompressReport, restore

__all__ = [
    "CompressReport",
    "Manifest",
    "all_compression_methods",
    "compress",
    "get_compression_method",
    "restore",
]
