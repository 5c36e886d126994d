"""Multi-task compression: N fine-tuned checkpoints stored as one shared task vector plus
bit-packed per-task masks (TALL masks, EMR-Merging), and restoring any task's model."""

from splice.compress.emr import compress_emr
from splice.compress.packed import Manifest
from splice.compress.stream import CompressReport, restore
from splice.compress.tall import compress_tall

__all__ = ["CompressReport", "Manifest", "compress_emr", "compress_tall", "restore"]
