"""Composing adapters at inference: composition blocks (Stack, Parallel, Average, Fuse),
routing over frozen experts (a trained gate, LoraHub) and retrieval from an adapter library."""

from splice.compose.blocks import Average, Block, CompositionError, Fuse, Parallel, Stack
from splice.compose.fusion import AdapterFusion, FusionConfig, add_fusion
from splice.compose.fusion_io import load_fusion, save_fusion
from splice.compose.library import AdapterLibrary, RetrievalError
from splice.compose.lorahub import LoraHubError, lorahub, lorahub_search
from splice.compose.mixture import Mixture
from splice.compose.mixture_config import MixtureError
from splice.compose.mixture_io import load_mixture, save_mixture
from splice.compose.parse import parse_composition
from splice.compose.retrieval import Retriever, retrieve_forward

__all__ = [
    "AdapterFusion",
    "AdapterLibrary",
    "Average",
    "Block",
    "CompositionError",
    "Fuse",
    "FusionConfig",
    "LoraHubError",
    "Mixture",
    "MixtureError",
    "Parallel",
    "RetrievalError",
    "Retriever",
    "Stack",
    "add_fusion",
    "load_fusion",
    "load_mixture",
    "lorahub",
    "lorahub_search",
    "parse_composition",
    "retrieve_forward",
    "save_fusion",
    "save_mixture",
]
