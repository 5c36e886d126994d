"""Composing adapters at inference: composition blocks (Stack, Parallel, Average, Fuse),
routing over frozen experts (a trained gate, LoraHub) and retrieval from an adapter library."""

from splice.compose.blocks import Average, Block, CompositionError, Fuse, Parallel, Stack
from splice.compose.fusion import AdapterFusion, FusionConfig, add_fusion
from splice.compose.fusion_io import load_fusion, save_fusion
from splice.compose.parse import parse_composition

__all__ = [
    "AdapterFusion",
    "Average",
    "Block",
    "CompositionError",
    "Fuse",
    "FusionConfig",
    "Parallel",
    "Stack",
    "add_fusion",
    "load_fusion",
    "parse_composition",
    "save_fusion",
]
